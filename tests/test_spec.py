"""``kvcache build`` with each documented spec form yields the cache training uses.

The installed ``kvcache`` console script builds from the module's own folder (no
PYTHONPATH), then a training script that imports the module the ordinary way reads every
sample from the cache: zero source calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kvcache.maintenance import load_spec, module_for_file

KVCACHE = os.path.join(os.path.dirname(sys.executable), "kvcache")

MODULE = textwrap.dedent("""
    import os, torch
    from torch.utils.data import Dataset

    class Folder(Dataset):
        def __init__(self, n, log):
            self.n, self.log = n, log
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            with open(self.log, "a") as f:
                f.write(f"{i}\\n")
            return torch.full((3, 4, 4), float(i)), i

    def make():
        return Folder(300, os.environ["CALLS"])
""")

TRAIN = textwrap.dedent("""
    import os, sys
    from torch.utils.data import DataLoader
    from kvcache import LmdbCachedDataset
    import myds

    if __name__ == "__main__":
        ds = LmdbCachedDataset(myds.make(), sys.argv[1])
        for x, y in DataLoader(ds, batch_size=50, num_workers=2):
            assert bool((x[:, 0, 0, 0] == y.float()).all())
        print("trained", len(ds))
""")


def _calls(log) -> int:
    return len(log.read_text().split()) if log.exists() else 0


@pytest.mark.parametrize("form", ["myds.py:make", "myds:make", pytest.param("./myds.py:make", marks=pytest.mark.slow),
                                  pytest.param("ABS", marks=pytest.mark.slow)])
def test_cli_build_then_training_calls_the_source_zero_times(tmp_path, form):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "myds.py").write_text(MODULE)
    (proj / "train.py").write_text(TRAIN)
    log = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CALLS": str(log)}
    spec = f"{proj / 'myds.py'}:make" if form == "ABS" else form
    cache = str(tmp_path / "cache")
    r = subprocess.run([KVCACHE, "build", spec, cache, "--workers", "2"], cwd=proj, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "computed 300" in r.stdout
    assert _calls(log) == 300
    r = subprocess.run([sys.executable, "train.py", cache], cwd=proj, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "trained 300"
    assert r.stderr == ""  # no stale warning
    assert _calls(log) == 300  # training called the source zero times


def test_file_in_a_package_gets_its_dotted_name(tmp_path, monkeypatch):
    pkg = tmp_path / "root" / "data"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pkgds.py").write_text("class S:\n    pass\n\ndef make():\n    return S()\n")
    assert module_for_file(str(pkg / "pkgds.py")) == (str(tmp_path / "root"), "data.pkgds")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    try:
        obj = load_spec("root/data/pkgds.py:make")
        assert type(obj).__module__ == "data.pkgds"
    finally:
        for name in ("data.pkgds", "data"):
            sys.modules.pop(name, None)


def test_module_spec_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "here_mod_i15.py").write_text("def make():\n    return 7\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    try:
        assert load_spec("here_mod_i15:make") == 7
    finally:
        sys.modules.pop("here_mod_i15", None)


def test_two_files_of_one_name_in_one_process(tmp_path, monkeypatch):
    # as two CLI runs would: each spec gets its own file's module (the later one replaces
    # the earlier one in sys.modules)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d, v in ((a, 1), (b, 2)):
        (d / "twin_i15.py").write_text(f"def make():\n    return {v}\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert load_spec(f"{a / 'twin_i15.py'}:make") == 1
        assert load_spec(f"{b / 'twin_i15.py'}:make") == 2
        assert load_spec(f"{a / 'twin_i15.py'}:make") == 1
    finally:
        sys.modules.pop("twin_i15", None)


def test_spec_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="module:callable"):
        load_spec("nocolon")
    with pytest.raises(ValueError, match="no file"):
        load_spec(str(tmp_path / "missing.py") + ":make")
    with pytest.raises(ValueError, match="current directory"):
        load_spec("no_such_module_i15:make")
