"""F25: a batch that does not fit (map at max_map_size, disk full) commits what fits.

Issue 11, item 2: a write-back batch used to commit as one transaction, so a batch that
did not fit was dropped whole and a full cache kept nothing. Now the batch is halved
until its parts fit. Each case is compared with a writer that commits one record at a
time (``write_batch=1``) under the same limits: the batched writer keeps at least 90% of
what that one keeps, and ``writes + write_errors`` accounts for every computed sample.
"""

import subprocess
import warnings

import pytest
from _fault_helpers import ArraySource, check_child, run_child, same, sample_for
from conftest import need_root

import kvcache
import kvcache.maintenance


def _fill(path, n, write_batch, **kw):
    """Read ``n`` samples of 64 KiB once, close; return (stats, cached indices, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = kvcache.LmdbCachedDataset(ArraySource(n, 16384), path, write_batch=write_batch, **kw)
        ok = all(same(ds[i], sample_for(i, 16384)) for i in range(n))
        ds.close()
    assert ok, "a sample returned while the cache was full was wrong"
    st = ds.stats()
    with kvcache.open_cache(path) as v:
        cached = set(v.keys())
    assert all(isinstance(w.message, kvcache.KvCacheWarning) for w in caught)
    return st, cached, [str(w.message) for w in caught]


def test_f25_map_at_max_keeps_what_fits(tmp_path):
    """map_size=1 MiB, max_map_size=4 MiB, 200 samples of 64 KiB read once, then close()
    (the issue's case: it used to leave 0 samples cached, write_errors=200)."""
    limits = dict(map_size=1 << 20, max_map_size=4 << 20)
    one_st, one, _ = _fill(str(tmp_path / "one"), 200, 1, **limits)
    st, cached, msgs = _fill(str(tmp_path / "batched"), 200, 4096, **limits)
    assert len(one) > 20, one_st  # the reference writer did fill the map
    assert len(cached) >= 0.9 * len(one), (len(cached), len(one), st)
    assert st.writes == len(cached) and st.writes + st.write_errors == 200, st
    assert len(msgs) == 1 and "max_map_size" in msgs[0], msgs
    rep = kvcache.maintenance.verify(str(tmp_path / "batched"))
    assert rep.ok, rep


TMPFS_CHILD = r"""
import json, sys, warnings
from _fault_helpers import *
import kvcache
import kvcache.maintenance
path, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = kvcache.LmdbCachedDataset(ArraySource(n, 16384), path, write_batch=batch)
    ok = all(same(ds[i], sample_for(i, 16384)) for i in range(n))
    ds.close()
st = ds.stats()
with kvcache.open_cache(path) as v:
    keys = sorted(v.keys())
    bad = [i for i in keys if not same(v.get(i), sample_for(i, 16384))]
print(json.dumps({"ok": ok, "writes": st.writes, "write_errors": st.write_errors, "keys": keys,
                  "bad": bad, "msgs": [str(w.message) for w in caught]}))
"""


def _tmpfs_run(mnt, n, batch):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        return check_child(run_child(TMPFS_CHILD, str(mnt / "c"), n, batch, timeout=300))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_f25_full_tmpfs_keeps_what_fits(tmp_path):
    """An 8 MiB tmpfs, 300 samples of 64 KiB (the issue's case: it used to keep 0)."""
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    one = _tmpfs_run(mnt, 300, 1)
    out = _tmpfs_run(mnt, 300, 4096)
    assert out["ok"] and out["bad"] == [], out
    assert len(one["keys"]) > 20, one
    assert len(out["keys"]) >= 0.9 * len(one["keys"]), (len(out["keys"]), len(one["keys"]))
    assert out["writes"] == len(out["keys"]) and out["writes"] + out["write_errors"] == 300, out
    assert len(out["msgs"]) == 1 and "disk full" in out["msgs"][0], out["msgs"]


def test_f25_halving_accounts_for_every_row(tmp_path):
    """write_what_fits on a map at its cap: rows written in order, the rest counted, none twice."""
    from kvcache.store import Store
    from kvcache.writeback import write_what_fits

    path = str(tmp_path / "c")
    ds = kvcache.LmdbCachedDataset(ArraySource(1, 16384), path, map_size=1 << 20, max_map_size=2 << 20)
    ds[0]
    fp = ds._fp_id
    ds.close()
    rows = []
    for i in range(1, 60):
        rec, layout, cs = kvcache.codec.encode(sample_for(i, 16384), fp)
        rows.append((i, rec, kvcache.codec.meta_row(fp, cs, len(rec), layout)))
    with Store(path, map_size=1 << 20, max_map_size=2 << 20) as st:
        written, dropped, exc = write_what_fits(st, rows, fp)
    assert isinstance(exc, kvcache.CacheFullError)
    assert 0 < written < 59 and written + dropped == 59
    with kvcache.open_cache(path) as v:
        keys = set(v.keys())
    assert keys == set(range(written + 1)), keys  # a prefix: parts are committed in order


def test_misses_after_a_permanent_failure_are_counted(tmp_path):
    """Once write-back stops for good (the map at max_map_size), every later computed
    sample is a write error too: ``writes + write_errors`` is every computed sample
    (it used to stop counting at the failure), here one record per commit, over two passes."""
    limits = dict(map_size=1 << 20, max_map_size=2 << 20)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = kvcache.LmdbCachedDataset(ArraySource(100, 16384), str(tmp_path / "c"), write_batch=1, **limits)
        for _ in range(2):
            assert all(same(ds[i], sample_for(i, 16384)) for i in range(100))
        ds.close()
    st = ds.stats()
    assert st.write_errors > 0 and st.writes > 0, st
    assert st.writes + st.write_errors == st.misses, st
    assert st.hits + st.misses == 200, st
