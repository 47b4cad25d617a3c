"""F06-F08: map full, map grown by another process, reopen with a smaller map_size."""

import os

import pytest
from _fault_helpers import ArraySource, Holder, same, sample_for

import kvcache


def test_f06_growth_and_cap(tmp_path):
    path = tmp_path / "a"
    with kvcache.LmdbCachedDataset(ArraySource(320, 16384), path, map_size=1 << 20, max_map_size=64 << 20) as ds:
        ds.build()
    view = kvcache.open_cache(path)
    assert len(view.keys()) == 320 and view.info().map_size > (1 << 20)
    view.close()
    capped = tmp_path / "b"
    with pytest.warns(RuntimeWarning, match="max_map_size") as rec:
        with kvcache.LmdbCachedDataset(ArraySource(320, 16384), capped, map_size=1 << 20,
                                       max_map_size=2 << 20, write_batch=16) as ds:
            assert all(same(ds[i], sample_for(i, 16384)) for i in range(320))
    assert len([w for w in rec if "max_map_size" in str(w.message)]) == 1
    assert ds.stats().write_errors > 0


def test_f07_map_grown_by_another_process(tmp_path):
    path = str(tmp_path / "c")
    with kvcache.LmdbCachedDataset(ArraySource(2000, 16384), path, map_size=1 << 20) as ds:
        ds[0]
    h = Holder(path)
    try:
        h.ok("ds = kvcache.LmdbCachedDataset(ArraySource(2000, 16384), path, map_size=1 << 20); ds[0]")
        with kvcache.LmdbCachedDataset(ArraySource(2000, 16384), path, map_size=1 << 20) as ds:
            for i in range(1, 400):
                ds[i]
        res = h.ok("res = [all(same(ds[i], sample_for(i, 16384)) for i in range(400)), ds.stats().hits]")
        assert res[0] and res[1] >= 399
        h.ok("[ds[i] for i in range(400, 800)]; ds.flush(); ds.close()")
    finally:
        h.close()
    assert len(kvcache.open_cache(path).keys()) == 800


def test_f08_reopen_with_smaller_map(tmp_path):
    path = str(tmp_path / "c")
    with kvcache.LmdbCachedDataset(ArraySource(1300, 16384), path) as ds:
        ds.build()  # ~21 MiB
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    with pytest.warns(kvcache.KvCacheWarning, match="the source changed"), \
            kvcache.LmdbCachedDataset(ArraySource(1400, 16384), path, version=2, map_size=1 << 20) as ds:
        for i in range(1400):
            ds[i]
    assert ds.stats().write_errors == 0 and ds.stats().writes == 1400
    assert os.path.getsize(os.path.join(path, "data.mdb")) >= size
