"""F21: compaction while the cache is in use is refused; once free, it shrinks the file.

A helper process holds the cache open (idle, no transaction). ``kvcache compact`` must
exit non-zero with CacheBusyError and move nothing. After the helper writes a sample and
exits, ``kvcache compact`` shrinks the file to about the live size, ``verify`` is OK and
the helper's sample is there.
"""

import hashlib
import os
import subprocess
import sys

import pytest
from _fault_helpers import ArraySource, Holder, build, same, sample_for

import kvcache
from kvcache.errors import CacheBusyError
from kvcache.store import Store

N, SIZE, KEEP = 400, 1024, 100


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kvcache", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def _digest(path):
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_f21_compact_while_in_use(tmp_path):
    import kvcache.maintenance as m

    path = str(tmp_path / "c")
    build(path, n=N, size=SIZE)
    with Store(path) as st:  # three quarters become free pages
        assert st.delete_keys(range(KEEP, N)) == N - KEEP
    h = Holder(path)
    try:
        h.ok(f"ds = kvcache.LmdbCachedDataset(ArraySource({N}, {SIZE}), path); res = int(ds[0][1])")
        before = _digest(path)
        names = sorted(os.listdir(tmp_path))
        r = _cli("compact", path)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "in use" in r.stderr and "1 process" in r.stderr, r.stderr
        with pytest.raises(CacheBusyError, match="in use"):
            m.compact(path)
        assert _digest(path) == before and sorted(os.listdir(tmp_path)) == names  # nothing moved
        # the helper keeps working, and writes a sample after the refused compaction
        assert h.ok(f"res = bool(same(ds[1], sample_for(1, {SIZE})))")
        assert h.ok("ds[250]; res = ds.flush()") == 1
    finally:
        assert h.close() == 0
    rep = vars(m.compact(path))  # the CLI's exit code 0 path is tests/test_cli.py's
    ref = str(tmp_path / "ref")  # the live size: a fresh cache of the same 101 samples
    with kvcache.LmdbCachedDataset(ArraySource(N, SIZE), ref) as ds:
        for i in [*range(KEEP), 250]:
            ds[i]
    with kvcache.open_cache(ref) as v:
        live = v.info().file_bytes
    assert rep["bytes_after"] < rep["bytes_before"] / 2, rep
    assert rep["bytes_after"] <= live * 1.1 + (64 << 10), (rep, live)
    assert rep["entries"] == KEEP + 1
    assert m.verify(path).ok
    with kvcache.open_cache(path) as v:
        assert list(v.keys()) == [*range(KEEP), 250]
        assert same(v.get(250), sample_for(250, SIZE)) and same(v.get(7), sample_for(7, SIZE))
    with kvcache.LmdbCachedDataset(ArraySource(N, SIZE), path) as ds:  # reopens and writes after the swap
        assert same(ds[300], sample_for(300, SIZE)) and ds.flush() == 1
    assert m.verify(path).ok
