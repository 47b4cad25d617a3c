"""F22: a returned sample never aliases LMDB memory or the LRU, even after close."""

from _fault_helpers import check_child, run_child

CODE = r"""
import json, sys, warnings
from _fault_helpers import *
import kvcache
path = sys.argv[1]
build(path, n=20, size=16384)
ds = kvcache.LmdbCachedDataset(ArraySource(20, 16384), path)
a = ds[3][0]; b = ds[3][0]          # the second read comes from the LRU
keep_a, keep_b = a.copy(), b.copy()
b[:] = -1.0                         # a caller modifying its sample in place
c = ds[3][0]
ds.close()
for v in range(20):                 # rewrite the same keys 20 times (new fingerprints)
    with kvcache.LmdbCachedDataset(ShiftedSource(20, 16384), path, version=v) as d2:
        d2.build()
print(json.dumps({"a": bool((a == keep_a).all()), "c": bool((c == keep_a).all()),
                  "b_own": bool((b == -1.0).all())}))
"""


def test_f22_no_aliasing_after_close(tmp_path):
    out = check_child(run_child(CODE, str(tmp_path / "c")))
    assert out == {"a": True, "c": True, "b_own": True}
