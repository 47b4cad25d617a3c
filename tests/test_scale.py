"""What must not grow with the cache (tools/bench_scale.py measures it; these check the
paths that make it so): a spot check probes random rows instead of listing every index,
a build of a complete cache finds nothing to do without a walk, and the fast paths give
the same answers as the walks they replace, stale rows included."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import ImageSource

import kvcache.builder
from kvcache import KvCacheWarning, LmdbCachedDataset
from kvcache.builder import missing


def _partial(path: str, n: int, indices, salt: int = 0) -> LmdbCachedDataset:
    ds = LmdbCachedDataset(ImageSource(n, salt), path, version=salt)
    for i in indices:
        ds[i]
    ds.flush()
    return ds


def test_random_cached_on_a_full_cache_probes_rows_without_listing(tmp_path, monkeypatch):
    with _partial(str(tmp_path / "c"), 400, range(400)) as ds:
        def listing(*_a):
            raise AssertionError("random_cached listed every cached index")

        monkeypatch.setattr(kvcache.builder, "cached_set", listing)
        got = ds.random_cached(25, random.Random(1))
        assert len(got) == len(set(got)) == 25 and all(0 <= i < 400 for i in got)
        assert got == ds.random_cached(25, random.Random(1))  # a seeded rng repeats


@pytest.mark.parametrize("cached", [range(0, 400, 2), range(5), []])
def test_random_cached_returns_only_cached_indices(tmp_path, cached):
    with _partial(str(tmp_path / "c"), 400, cached) as ds:
        got = ds.random_cached(50, random.Random(2))
        assert set(got) <= set(cached) and len(got) == min(50, len(cached)) == len(set(got))


def test_cached_indices_and_missing_skip_rows_of_another_source(tmp_path):
    path = str(tmp_path / "c")
    _partial(path, 300, range(0, 300, 3), salt=1).close()  # another fingerprint's rows
    with pytest.warns(KvCacheWarning, match="100 cached samples of the previous source"), \
            _partial(path, 300, range(0, 300, 2)) as ds:
        want = set(range(0, 300, 2))
        assert ds.cached_indices() == want
        assert missing(ds.store, ds.fingerprint_id, 300).tolist() == sorted(set(range(300)) - want)
        ds.build()
        assert ds.cached_indices() == set(range(300))
        assert missing(ds.store, ds.fingerprint_id, 300).size == 0
        assert missing(ds.store, ds.fingerprint_id, 310).tolist() == list(range(300, 310))
    with _partial(str(tmp_path / "empty"), 50, []) as ds:
        assert np.array_equal(missing(ds.store, ds.fingerprint_id, 50), np.arange(50))
