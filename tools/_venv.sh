# Sourced by tools/demo.sh and tools/test.sh: make ./.venv with what kvcache needs.
# torch is pinned to the local CPU wheel: any other spec downloads GBs of CUDA packages.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
if [ -n "${KVCACHE_EXTRAS:-}" ]; then
  .venv/bin/pip install -q -e ".[${KVCACHE_EXTRAS}]"
else
  .venv/bin/pip install -q -e .
fi
