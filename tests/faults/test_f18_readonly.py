"""F18: a read-only cache location (permissions as `nobody`, lock.mdb absent, RO bind mount).

kvcache falls back (read-write -> read-only -> read-only without LMDB's lock file), warns
exactly once that write-back is off, serves hits, computes misses from the source without
writing them, and creates no file. (tests/test_paths.py covers a read-only bind mount with
lock.mdb present; this covers the permission variants and a missing lock.mdb.)
"""

import os
import shutil
import subprocess
import tempfile

import pytest
from _fault_helpers import ArraySource, check_child, run_child, snapshot
from conftest import need_root

import kvcache

# Runs as root until the cache is opened, then as `nobody` (uid 65534) where asked: the
# interpreter lives under /root, which nobody cannot traverse, so it cannot be exec'd as
# nobody; dropping privileges after the imports gives the same file-permission checks.
CHILD = r"""
import json, os, sys, warnings
from _fault_helpers import *
import kvcache
path, as_nobody = sys.argv[1], sys.argv[2] == "1"
sample_for(0)  # import numpy.random and the like while the stdlib is still reachable
if as_nobody:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    assert os.geteuid() == 65534
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = kvcache.LmdbCachedDataset(ArraySource(100), path)
    ok = [i for i in range(100) if not same(ds[i], sample_for(i))]
    again = [i for i in range(50, 100) if not same(ds[i], sample_for(i))]
    st = ds.stats()
    ds.close()
print(json.dumps({"wrong": ok + again, "msgs": [f"{w.category.__name__}: {w.message}" for w in caught],
                  "stats": st.as_dict()}))
"""


def _prepare(root, lock):
    """A cache holding samples 0..49 of ArraySource(100) in ``root/c``, made read-only."""
    path = os.path.join(root, "c")
    with kvcache.LmdbCachedDataset(ArraySource(100), path) as ds:
        for i in range(50):
            ds[i]
    if lock == "absent":
        os.unlink(os.path.join(path, "lock.mdb"))
    for name in os.listdir(path):
        mode = 0o666 if (name == "lock.mdb" and lock == "0666") else 0o444
        os.chmod(os.path.join(path, name), mode)
    os.chmod(path, 0o555)
    return path


def _check(path, before, out):
    assert out["wrong"] == [], out
    assert len(out["msgs"]) == 1, out["msgs"]  # exactly one warning
    assert "not writable" in out["msgs"][0] or "read-only" in out["msgs"][0], out["msgs"]
    st = out["stats"]
    assert st["hits"] >= 50 and st["misses"] == 100 and st["writes"] == 0, st  # misses: 50 twice
    after = snapshot(path)
    assert after.keys() == before.keys(), (sorted(before), sorted(after))  # no file created
    assert after == before  # and no byte changed


@pytest.mark.root
@pytest.mark.parametrize("lock", ["absent", pytest.param("0444", marks=pytest.mark.slow),
                                  pytest.param("0666", marks=pytest.mark.slow)])
def test_f18_permissions_as_nobody(lock):
    need_root()
    root = tempfile.mkdtemp(prefix="kvcache-f18-", dir="/tmp")
    try:
        os.chmod(root, 0o755)
        path = _prepare(root, lock)
        before = snapshot(path)
        out = check_child(run_child(CHILD, path, "1"))
        _check(path, before, out)
    finally:
        for d, _, files in os.walk(root):
            os.chmod(d, 0o755)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.root
def test_f18_ro_bind_mount_without_lock_file(tmp_path):
    need_root()
    src = tmp_path / "src"
    src.mkdir()
    path = _prepare(str(src), "absent")
    ro = tmp_path / "ro"
    ro.mkdir()
    m = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True, check=False)
    if m.returncode:
        pytest.skip(f"cannot bind-mount here: {m.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, text=True, check=False)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        rpath = str(ro / "c")
        before = snapshot(rpath)
        out = check_child(run_child(CHILD, rpath, "0"))  # root: only the mount says no
        _check(rpath, before, out)
        assert snapshot(path) == before
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
