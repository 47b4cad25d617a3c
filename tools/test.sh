#!/usr/bin/env bash
# One command on a fresh machine: set up ./.venv and run the tests.
# Extra arguments go to pytest (e.g. `-m "slow or not slow"` runs the slow tests too).
KVCACHE_EXTRAS="test" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest "$@"
