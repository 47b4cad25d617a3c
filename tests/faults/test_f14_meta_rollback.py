"""F14: the older meta page made current (a rollback): consistent, misses recomputed."""

import struct

import pytest
from _fault_helpers import check_child, metas, patch, run_child
from test_f11_structural_corruption import READ

ORPHANS = r"""
import json, sys
import lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=4)
s, m = env.open_db(b"samples", create=False), env.open_db(b"meta", create=False)
with env.begin() as txn:
    ks = {bytes(k) for k, _ in txn.cursor(db=s)}
    km = {bytes(k) for k, _ in txn.cursor(db=m)}
print(json.dumps({"samples": len(ks), "meta": len(km), "orphans": len(ks ^ km)}))
"""


def test_f14_rollback_is_consistent(tmp_path):
    path = str(tmp_path / "c")
    from _fault_helpers import ArraySource

    import kvcache

    with kvcache.LmdbCachedDataset(ArraySource(100), path) as ds:
        [ds[i] for i in range(50)]
        ds.flush()
        [ds[i] for i in range(50, 100)]
        ds.flush()  # the last commit: the older meta page holds only the first 50
    ms = sorted(metas(path), key=lambda m: m["txnid"])
    # LMDB 0.9 picks meta page txnid & 1 for a reader: keep the parity of the page
    patch(path, ms[0]["off_txnid"], struct.pack("<Q", 2**62 + ms[0]["pgno"]))
    orphans = check_child(run_child(ORPHANS, path))
    assert orphans["orphans"] == 0 and orphans["samples"] < 100
    out = check_child(run_child(READ, path, 100, "1"))
    assert out["other"] == {} and out["wrong"] == [] and out["kv_errors"] == {}, out
    assert out["stats"]["misses"] == 100 - orphans["samples"]
    maintenance = pytest.importorskip("kvcache.maintenance")
    assert maintenance.verify(path).ok
