"""The wheel a user installs: its files, and the CLI working from a non-editable install.

The test venv has kvcache installed in editable mode, whose import hook would quietly
supply any module a broken wheel left out (``kvcache.maintenance`` once was). So the wheel
goes into a fresh venv that sees the test venv's packages through a ``.pth`` line, which
puts their directory on ``sys.path`` without running the ``.pth`` files in it (the
editable hook is one), and every command checks that kvcache came from that venv.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "kvcache")

# A small cache, made and read by the installed kvcache (it also prints where it came from).
MAKE = r"""
import json, sys
import torch
import kvcache
from kvcache.maintenance import verify  # a subpackage: absent from a wheel that misses it

class Source(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.full((4,), i, dtype=torch.int16), i

with kvcache.LmdbCachedDataset(Source(), sys.argv[1]) as ds:
    ds.build()
with kvcache.open_cache(sys.argv[1]) as view:
    keys, n = list(view), len(view)
print(json.dumps({"kvcache": kvcache.__file__, "verify": verify.__module__, "keys": keys, "len": n}))
"""


def source_files() -> set[str]:
    """The package as a wheel should hold it: every ``kvcache/**/*.py`` and ``py.typed``."""
    out = {"kvcache/py.typed"}
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                out.add(os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/"))
    return out


def _has_wheel_backend() -> bool:
    """Whether setuptools here can build a wheel without fetching anything (its own
    ``bdist_wheel`` since 70.1, or the ``wheel`` package)."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return major >= 61


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path) -> str:
    """Build the wheel from a copy of the project (the checkout stays free of build/)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(PKG, src / "kvcache", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    isolation = [] if _has_wheel_backend() else ["--use-pep517"]  # else pip fetches setuptools
    no_iso = ["--no-build-isolation"] if not isolation else []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *no_iso, *isolation, "-q",
         "--disable-pip-version-check", "-w", str(out), str(src)], cwd=str(tmp_path))
    wheels = [p for p in os.listdir(out) if p.endswith(".whl")]
    assert len(wheels) == 1, wheels
    return str(out / wheels[0])


def fresh_venv(tmp_path) -> tuple[str, str]:
    """A venv without pip whose ``sys.path`` ends with this interpreter's site
    directories; returns ``(python, bin_dir)``."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    purelib = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "_test_venv_packages.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(ours)) + "\n")  # paths only: their .pth files do not run
    return py, str(venv / "bin")


def test_wheel_installs_a_working_cli(tmp_path):
    whl = build_wheel(tmp_path)
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    package = {n for n in names if not n.startswith(info + "/")}
    assert package == source_files(), (
        f"missing from the wheel: {sorted(source_files() - package)}; "
        f"extra in the wheel: {sorted(package - source_files())}")
    assert "kvcache = kvcache.cli:main" in entry_points

    py, bindir = fresh_venv(tmp_path)
    run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q",
         "--disable-pip-version-check", whl])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    cwd = str(tmp_path)  # not the checkout: `python -m` puts the cwd first on sys.path
    venv = os.path.dirname(bindir)
    cache = str(tmp_path / "cache")

    made = json.loads(run([py, "-c", MAKE, cache], env=env, cwd=cwd).stdout.strip().splitlines()[-1])
    assert made["kvcache"].startswith(venv + os.sep), made  # not the editable checkout
    assert made["verify"] == "kvcache.maintenance.verify"
    assert made["keys"] == list(range(20)) and made["len"] == 20

    console = os.path.join(bindir, "kvcache")
    assert os.path.exists(console), os.listdir(bindir)
    with open(console) as f:
        assert f.readline().strip() == "#!" + py  # the script runs the fresh venv's python
    helped = run([console, "--help"], env=env, cwd=cwd).stdout
    assert "inspect" in helped and "verify" in helped

    inspected = json.loads(run([console, "inspect", "--json", cache], env=env, cwd=cwd).stdout)
    assert inspected["entries"] == 20, inspected

    verified = json.loads(run([py, "-m", "kvcache", "verify", "--json", cache], env=env, cwd=cwd).stdout)
    assert verified["ok"] and verified["checked"] == 20, verified

    where = run([py, "-c", "import kvcache.cli, kvcache.maintenance as m; print(m.__file__)"],
                env=env, cwd=cwd).stdout.strip()
    assert where.startswith(venv + os.sep), where


@pytest.fixture(autouse=True)
def _no_stray_build_dirs():
    """Building must not leave build/ or *.egg-info in the checkout."""
    before = set(os.listdir(ROOT))
    yield
    assert not {n for n in set(os.listdir(ROOT)) - before if n == "build" or n.endswith(".egg-info")}
