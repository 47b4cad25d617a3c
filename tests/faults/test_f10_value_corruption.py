"""F10: corrupted record bytes are detected by the checksum, recomputed, rewritten, counted."""

import os

import pytest
from _fault_helpers import check_child, file_bytes, patch, record_place, run_child

READ = r"""
import json, sys, warnings
from _fault_helpers import *
import kvcache
path, n, size, idx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ds = kvcache.LmdbCachedDataset(ArraySource(n, size), path)
    ok = same(ds[idx], sample_for(idx, size)) and same(ds[idx], sample_for(idx, size))
    wrong = [i for i in range(n) if not same(ds[i], sample_for(i, size))]
    ds.close()
    st = ds.stats()
ds2 = kvcache.LmdbCachedDataset(ArraySource(n, size), path)
again = same(ds2[idx], sample_for(idx, size))
st2 = ds2.stats()
ds2.close()
print(json.dumps({"ok": ok, "wrong": wrong, "corrupt": st.corrupt, "writes": st.writes,
                  "warnings": [str(x.message) for x in w], "again": again,
                  "corrupt2": st2.corrupt, "hits2": st2.hits}))
"""

NOSOURCE = r"""
import json, sys
import kvcache
path, idx = sys.argv[1], int(sys.argv[2])
ds = kvcache.LmdbCachedDataset(None, path)
try:
    ds[idx]
    print(json.dumps({"raised": None}))
except kvcache.CorruptRecordError as exc:
    print(json.dumps({"raised": "CorruptRecordError", "msg": str(exc)}))
"""


def _damage(path, idx, how):
    place = record_place(path, idx)
    off, size = place["data_off"], place["dsize"]
    data = file_bytes(path)
    if how == "bit":
        patch(path, off + size - 5, bytes([data[off + size - 5] ^ 0x10]))
    elif how == "64bytes":
        patch(path, off + size - 80, os.urandom(64))
    else:  # rewrite the npy header in place so it parses as another valid shape
        rec = data[off: off + size]
        h = rec.find(b"'shape': (")
        assert h > 0
        end = rec.index(b")", h)
        old = rec[h:end + 1]
        new = b"'shape': (2, " + old[len(b"'shape': ("):].replace(b",)", b")")
        new = new[: len(old)].ljust(len(old), b" ")
        patch(path, off + h, new)
    return place


SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind,how", [
    ("inline", "bit"), ("overflow", "64bytes"),
    pytest.param("inline", "64bytes", marks=SLOW), pytest.param("inline", "npy_header", marks=SLOW),
    pytest.param("overflow", "bit", marks=SLOW), pytest.param("overflow", "npy_header", marks=SLOW),
])
def test_f10_corrupt_record_recomputed(request, kind, how):
    path = request.getfixturevalue("cache" if kind == "inline" else "big_cache")
    n, size = (100, 64) if kind == "inline" else (8, 16384)
    idx = 5
    place = _damage(path, idx, how)
    assert (place["overflow"] is not None) == (kind == "overflow")
    out = check_child(run_child(READ, path, n, size, idx))
    assert out["ok"] and out["wrong"] == []
    assert out["corrupt"] == 1 and out["writes"] == 1
    assert len([m for m in out["warnings"] if "damaged" in m]) == 1, out["warnings"]
    assert out["again"] and out["corrupt2"] == 0 and out["hits2"] == 1  # rewritten


def test_f10_corrupt_without_source_raises(cache):
    _damage(cache, 7, "64bytes")
    out = check_child(run_child(NOSOURCE, cache, 7))
    assert out["raised"] == "CorruptRecordError"
    assert "7" in out["msg"] and "kvcache verify --repair" in out["msg"]


def test_f10_verify_lists_and_repairs(cache):
    maintenance = pytest.importorskip("kvcache.maintenance")
    _damage(cache, 9, "bit")
    rep = maintenance.verify(cache)
    assert not rep.ok and 9 in rep.bad and rep.signal is None
    check_child(run_child(READ, cache, 100, 64, 9))  # self-heal through the dataset
    assert maintenance.verify(cache).ok
