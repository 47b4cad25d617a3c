"""F17: a cache filled by another source never serves that source's samples."""

import pytest
from _fault_helpers import ArraySource, Holder, ShiftedSource, same, sample_for

import kvcache


def test_f17_other_source_gets_its_own_samples(cache):
    with pytest.warns(kvcache.KvCacheWarning, match="the source changed"), kvcache.LmdbCachedDataset(ShiftedSource(100), cache) as ds:
        for i in range(0, 100, 7):
            a, j = ds[i]
            assert j == i and (a == sample_for(i)[0] + 1000.0).all()
        assert ds.stats().hits == 0 and ds.stats().stale > 0


def test_f17_on_stale_error_names_the_part(cache):
    with pytest.raises(kvcache.StaleCacheError, match="class"):
        kvcache.LmdbCachedDataset(ShiftedSource(100), cache, on_stale="error")
    with pytest.raises(kvcache.StaleCacheError, match="version"):
        kvcache.LmdbCachedDataset(ArraySource(100), cache, version=2, on_stale="error")


def test_f17_process_opened_before_the_change(cache):
    h = Holder(cache)
    try:
        h.ok("ds = kvcache.LmdbCachedDataset(ArraySource(100), path); ds[1]")
        with pytest.warns(kvcache.KvCacheWarning, match="the source changed"), \
                kvcache.LmdbCachedDataset(ShiftedSource(100), cache) as ds:  # becomes current
            ds.build()
        # the old process still gets its own source's samples, never B's rows
        assert h.ok("res = all(same(ds[i], sample_for(i)) for i in range(100))") is True
        h.ok("ds.close()")
    finally:
        h.close()
    # the old process wrote its samples back: nothing to recompute, so no warning
    with kvcache.LmdbCachedDataset(ArraySource(100), cache) as ds:
        assert all(same(ds[i], sample_for(i)) for i in range(100))
