"""F13: damaged meta pages: without a source, CacheCorruptError at open and not one byte
changed; with its source, the dataset salvages every record (kvcache.selfrepair)."""

import os

import pytest
from _fault_helpers import check_child, metas, patch, run_child, snapshot

OPEN = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from _fault_helpers import *
import kvcache
path = sys.argv[1]
res = {}
for name, fn in [("dataset_nosource", lambda: kvcache.LmdbCachedDataset(None, path)),
                 ("open_cache", lambda: kvcache.open_cache(path))]:
    try:
        fn().close()
        res[name] = "opened"
    except kvcache.KvCacheError as exc:
        res[name] = [type(exc).__name__, str(exc)]
    except Exception as exc:
        res[name] = ["RAW " + type(exc).__name__, str(exc)]
print(json.dumps(res))
"""


@pytest.mark.parametrize("which", ["older", *(pytest.param(w, marks=pytest.mark.slow) for w in ("newer", "both", "garbage_body"))])
def test_f13_meta_damage_refused_without_change(cache, which):
    ms = sorted(metas(cache), key=lambda m: m["txnid"])
    if which in ("older", "both"):
        patch(cache, ms[0]["off_magic"], bytes(4))
    if which in ("newer", "both"):
        patch(cache, ms[1]["off_magic"], bytes(4))
    if which == "garbage_body":
        for m in ms:
            patch(cache, m["off"], os.urandom(120))
    before = snapshot(cache)
    out = check_child(run_child(OPEN, cache))
    for name, res in out.items():
        assert res != "opened" and res[0] == "CacheCorruptError", (name, res)
        assert "not a valid LMDB cache" in res[1] or "damaged" in res[1], res
    assert snapshot(cache) == before
    out = check_child(run_child(WITH_SOURCE, cache))
    assert out["wrong"] == [] and out["action"] == "salvaged", out
    if which != "garbage_body":  # only the magic was damaged: every record is in its leaf page
        assert out["hits"] == 100, out


WITH_SOURCE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from _fault_helpers import *
import kvcache
ds = kvcache.LmdbCachedDataset(ArraySource(100), sys.argv[1])
wrong = [i for i in range(100) if not same(ds[i], sample_for(i))]
print(json.dumps({"wrong": wrong, "action": ds.self_repair.action, "hits": ds.stats().hits}))
"""
