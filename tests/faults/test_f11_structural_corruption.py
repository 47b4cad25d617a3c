"""F11: structural damage to the samples tree: never a raw lmdb.Error, never a signal."""

import os
import random
import struct

import pytest
from _fault_helpers import PSIZE, check_child, file_bytes, patch, run_child, walk

# Reads every index in a child: each must come back equal to the source (recomputed
# where LMDB cannot find it) or raise a KvCacheError; anything else fails the test.
READ = r"""
import json, sys, warnings, lmdb
warnings.simplefilter("ignore")
from _fault_helpers import *
import kvcache
path, n, with_source = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
out = {"wrong": [], "kv_errors": {}, "other": {}}
try:
    ds = kvcache.LmdbCachedDataset(ArraySource(n) if with_source else None, path)
except kvcache.KvCacheError as exc:
    print(json.dumps({"open": type(exc).__name__, "msg": str(exc)})); sys.exit(0)
for i in range(n):
    try:
        if not same(ds[i], sample_for(i)):
            out["wrong"].append(i)
    except kvcache.KvCacheError as exc:
        out["kv_errors"][type(exc).__name__] = out["kv_errors"].get(type(exc).__name__, 0) + 1
    except Exception as exc:
        out["other"][f"{type(exc).__module__}.{type(exc).__name__}: {exc}"] = i
try:
    ds.close()
except kvcache.KvCacheError as exc:
    out["close"] = type(exc).__name__
except Exception as exc:
    out["other"]["close " + type(exc).__name__ + str(exc)] = -1
out["stats"] = ds.stats().as_dict()
print(json.dumps(out))
"""


def _inject(path, case):
    w = walk(path)
    pages = w["pages"]["samples"]
    assert pages["branch"], "the samples tree needs a branch page for these cases"
    leaf = pages["leaf"][len(pages["leaf"]) // 2]
    branch = pages["branch"][0]
    base = leaf * PSIZE
    if case == "leaf_flags":
        patch(path, base + 10, struct.pack("<H", 0x01))  # leaf claims to be a branch
    elif case == "leaf_bounds":
        patch(path, base + 12, struct.pack("<HH", 4000, 20))  # lower > upper
    elif case == "zero_leaf":
        patch(path, base, bytes(PSIZE))
    elif case in ("child_past_eof", "child_to_leaf"):
        bbase = branch * PSIZE
        lower = struct.unpack_from("<H", file_bytes(path), bbase + 12)[0]
        ptr = struct.unpack_from("<H", file_bytes(path), bbase + 16 + 2 * ((lower - 16) // 2 - 1))[0]
        target = (os.path.getsize(os.path.join(path, "data.mdb")) // PSIZE + 50
                  if case == "child_past_eof" else pages["leaf"][0])
        patch(path, bbase + ptr, struct.pack("<HH", target & 0xFFFF, (target >> 16) & 0xFFFF))
    elif case == "branch_random":
        patch(path, branch * PSIZE + 16 + random.Random(3).randrange(0, 200), random.Random(4).randbytes(32))


CASES = ["leaf_flags", "leaf_bounds", "zero_leaf", "child_past_eof", "child_to_leaf", "branch_random"]
FAST = {"child_past_eof"}


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_f11_dataset_survives_structural_damage(cache, case):
    """Never a signal or a raw lmdb.Error: either the open refuses the file (structural
    validation, kvcache.structure, found the damage: CacheCorruptError naming the fix),
    or every index is served (LMDB reports the damage cleanly; samples are recomputed)."""
    _inject(cache, case)
    out = check_child(run_child(READ, cache, 100, "1"))
    if "open" in out:
        assert out["open"] == "CacheCorruptError" and "verify --repair" in out["msg"], out
        assert "structure is damaged" in out["msg"], out
        return
    assert out["other"] == {}, f"raw errors leaked: {out['other']}"
    assert out["wrong"] == [], out
    assert out["kv_errors"] == {}, out  # with a source every index is served
    assert "close" not in out, out  # write-back into a damaged tree degrades, close() never raises
    out2 = check_child(run_child(READ, cache, 100, "0"))  # no source: kvcache errors only
    assert out2.get("other", {}) == {}, out2


@pytest.mark.parametrize("case", ["leaf_flags", pytest.param("zero_leaf", marks=pytest.mark.slow)])
def test_f11_verify_reports_and_survives(cache, case):
    maintenance = pytest.importorskip("kvcache.maintenance")
    _inject(cache, case)
    rep = maintenance.verify(cache)  # the scan runs in a child: this process must survive
    assert not rep.ok
    assert rep.bad or rep.errors or rep.signal or rep.orphans
