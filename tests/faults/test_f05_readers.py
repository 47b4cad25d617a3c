"""F05: reader table exhausted: holder recovers, a fresh process gets CacheBusyError."""

import signal

from _fault_helpers import Holder, check_child, run_child, spawn_child

FIRST = r"""
import sys, lmdb
env = lmdb.open(sys.argv[1], max_readers=8, max_dbs=4)
print("ready", flush=True)
sys.stdin.read()
"""
STALE = r"""
import sys, time, lmdb
env = lmdb.open(sys.argv[1], max_dbs=4)
txn = env.begin()
print("holding", flush=True)
time.sleep(600)
"""
FRESH = r"""
import json, sys
from _fault_helpers import *
import kvcache
try:
    kvcache.LmdbCachedDataset(ArraySource(100), sys.argv[1])
    print(json.dumps({"opened": True}))
except kvcache.KvCacheError as exc:
    print(json.dumps({"err": type(exc).__name__, "msg": str(exc)}))
"""


def test_f05_reader_table_full(cache):
    import os

    os.remove(os.path.join(cache, "lock.mdb"))  # nobody attached: the next opener sizes the table
    first = spawn_child(FIRST, cache)
    assert first.stdout.readline().strip() == "ready"
    h = Holder(cache)
    stale = []
    try:
        r = h.do("import warnings\nwith warnings.catch_warnings(record=True) as w:\n"
                 "    warnings.simplefilter('always')\n"
                 "    ds = kvcache.LmdbCachedDataset(ArraySource(100), path); ds[1]\n"
                 "res = [str(x.message) for x in w]")
        assert r["ok"], r
        assert any("reader table has" in m for m in r["res"]), r  # 8 < the configured 126
        for _ in range(8):  # every slot of the table
            p = spawn_child(STALE, cache)
            assert p.stdout.readline().strip() == "holding"
            p.send_signal(signal.SIGKILL)
            p.wait()
            stale.append(p)
        out = check_child(run_child(FRESH, cache))
        assert out.get("err") == "CacheBusyError" and "reader table" in out["msg"], out
        assert h.ok("res = same(ds[2], sample_for(2))") is True  # reader_check + retry
    finally:
        h.close()
        first.stdin.close()
        first.wait()
        for p in [first, *stale]:
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()
