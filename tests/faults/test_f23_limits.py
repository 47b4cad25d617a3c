"""F23: key and size limits: fixed-size keys, SampleTooLargeError warned once, served uncached."""

import numpy as np
import pytest
from _fault_helpers import BigSource, check_child, run_child

import kvcache


def test_f23_key_types(tmp_path):
    with kvcache.LmdbCachedDataset(BigSource([10] * 5), tmp_path / "c") as ds:
        with pytest.raises(TypeError):
            ds["3"]
        with pytest.raises(IndexError):
            ds[2**70]
        assert ds[np.int64(3)][0] == 3


def test_f23_too_large_served_uncached_warned_once(tmp_path):
    sizes = [100, 3 << 20, 100, 4 << 20, 100]
    with pytest.warns(RuntimeWarning, match="max_sample_bytes") as rec:
        with kvcache.LmdbCachedDataset(BigSource(sizes), tmp_path / "c", max_sample_bytes=1 << 20) as ds:
            for _ in range(2):
                for i, n in enumerate(sizes):
                    x = ds[i]
                    assert x.shape == (n,) and x[0] == i
            st = ds.stats()
    assert len([w for w in rec if "max_sample_bytes" in str(w.message)]) == 1
    assert st.too_large == 4
    assert sorted(kvcache.open_cache(tmp_path / "c").keys()) == [0, 2, 4]


CODE = r"""
import json, resource, sys, warnings
from _fault_helpers import *
import kvcache
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    with kvcache.LmdbCachedDataset(BigSource([3 << 29]), sys.argv[1]) as ds:  # 1.5 GiB
        x = ds[0]
        ok = x.shape == (3 << 29,) and int(x[-1]) == 0
        st = ds.stats()
print(json.dumps({"ok": ok, "too_large": st.too_large, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "warned": sum("max_sample_bytes" in str(m.message) for m in w)}))
"""


@pytest.mark.slow
def test_f23_huge_sample_default_cap(tmp_path):
    out = check_child(run_child(CODE, str(tmp_path / "c"), timeout=300))
    assert out["ok"] and out["too_large"] == 1 and out["warned"] == 1
    assert out["rss"] < 4 * (3 << 29)  # sample + record, not a write on top
