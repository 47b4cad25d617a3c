"""LmdbCachedDataset in one process (and a few writer processes): caching, indices,
read-only serving, pickling, fingerprints, and the errors each situation raises."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import warnings

import lmdb
import pytest
import torch

from kvcache import (
    CacheFullError,
    CorruptRecordError,
    KvCacheError,
    LmdbCachedDataset,
    MissingSampleError,
    StaleCacheError,
    UnsupportedSampleError,
    codec,
    open_cache,
)
from kvcache.store import KEY

from helpers import BadSource, BigSource, CountingSource, ImageSource, RaggedSource, counts, fill, same

N = 40


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "cache")


def filled(path, n=N, **kw):
    """A closed cache holding every index of ImageSource(n)."""
    with LmdbCachedDataset(ImageSource(n), path, **kw) as ds:
        ds.build()
    return path


# --------------------------------------------------------------------------- caching


def test_first_access_computes_then_hits(path, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    src = CountingSource(N, log)
    with LmdbCachedDataset(src, path, lru_bytes=0) as ds:
        assert len(ds) == N
        for i in range(N):
            assert same(ds[i], src.inner[i])
        st = ds.stats()
        assert (st.misses, st.hits) == (N, 0)
        ds.flush()
        assert ds.stats().writes == N
        for i in range(N):
            assert same(ds[i], src.inner[i])
        st = ds.stats()
        assert (st.misses, st.hits, st.lru_hits) == (N, N, 0)
    assert counts(log) == {i: 1 for i in range(N)}
    # A new dataset (a new run) reads everything from the cache.
    with LmdbCachedDataset(src, path, lru_bytes=1 << 20) as ds:
        got = [ds[i] for i in range(N)]
        assert all(same(g, src.inner[i]) for i, g in enumerate(got))
        assert ds.stats().hits == N and ds.stats().misses == 0
        [ds[i] for i in range(N)]
        assert ds.stats().lru_hits == N
    assert counts(log) == {i: 1 for i in range(N)}
    assert list(open_cache(path).keys()) == list(range(N))


def test_a_pending_write_is_served_without_recomputing(path, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    src = CountingSource(N, log)
    with LmdbCachedDataset(src, path, write_batch=1000) as ds:
        a = ds[3]
        b = ds[3]
        assert same(a, b) and counts(log) == {3: 1}


def test_getitems_matches_getitem(path):
    src = RaggedSource(30)
    with LmdbCachedDataset(src, path) as ds:
        idx = [5, 0, 29, 5, -1, 7]
        first = ds.__getitems__(idx)
        assert isinstance(first, list) and len(first) == len(idx)
        ds.flush()
        second = ds.__getitems__(idx)
        for i, a, b in zip(idx, first, second):
            assert same(a, src[i % 30]) and same(b, src[i % 30])
        assert ds.stats().hits >= 4


def test_indices_behave_like_a_list(path):
    src = ImageSource(10)
    with LmdbCachedDataset(src, path) as ds:
        assert same(ds[-1], src[9]) and same(ds[-10], src[0])
        for bad in (10, 11, -11, 10**20):
            with pytest.raises(IndexError):
                ds[bad]
            with pytest.raises(IndexError):
                ds.__getitems__([0, bad])
        with pytest.raises(TypeError):
            ds[1.5]
        assert same(ds[torch.tensor(3)], src[3])
    with LmdbCachedDataset(None, path) as ro:
        with pytest.raises(IndexError):
            ro[10]
        assert same(ro[-1], src[9])


def test_mutating_a_returned_sample_never_changes_a_later_read(path):
    src = ImageSource(5)
    with LmdbCachedDataset(src, path) as ds:
        for _ in range(3):  # miss, LMDB hit, LRU hit
            img, _ = ds[2]
            img.fill_(0)
            ds.flush()
        assert same(ds[2], src[2])


def test_unsupported_sample_names_the_index_and_place(path):
    with LmdbCachedDataset(BadSource(), path) as ds:
        assert ds[0] == (0, {"meta": None})
        with pytest.raises(UnsupportedSampleError) as info:
            ds[1]
        msg = str(info.value)
        assert "index 1" in msg and "sample[1]['meta']" in msg and "Unsupported" in msg


# --------------------------------------------------------------------------- read-only serving


def test_source_none_serves_cached_and_raises_missing(path):
    src = ImageSource(N)
    with LmdbCachedDataset(src, path) as ds:
        for i in range(0, N, 2):
            ds[i]
    with LmdbCachedDataset(None, path) as ro:
        assert len(ro) == N
        for i in range(0, N, 2):
            assert same(ro[i], src[i])
        with pytest.raises(MissingSampleError) as info:
            ro[1]
        assert isinstance(info.value, KeyError) and isinstance(info.value, KvCacheError)
        assert "index 1" in str(info.value) and path in str(info.value)
        with pytest.raises(MissingSampleError):
            ro.__getitems__([0, 3])
        with pytest.raises(MissingSampleError):
            ro.build()


def test_build_fills_every_index_and_resumes(path):
    src = ImageSource(N)
    with LmdbCachedDataset(src, path) as ds:
        ds[0], ds[1]
        ds.flush()
        rep = ds.build(progress=False)
        assert (rep.total, rep.computed, rep.already_cached) == (N, N - 2, 2)
        assert ds.cached_indices() == set(range(N))
        rep = ds.build(progress=False)
        assert (rep.computed, rep.already_cached) == (0, N)
    view = open_cache(path)
    assert list(view.keys()) == list(range(N))
    info = view.info()
    assert info.entries == N and info.source_length == N and info.format_version == 2
    assert same(view.get(7), src[7])
    view.close()


def test_close_is_idempotent_and_context_manager(path):
    ds = LmdbCachedDataset(ImageSource(5), path)
    with ds as same_ds:
        assert same_ds is ds
        ds[0]
    ds.close()
    ds.close()
    with pytest.raises(ValueError):
        ds[1]
    with LmdbCachedDataset(None, path) as ro:
        assert ro.__getitems__([0])  # the buffered write was flushed by close()


def test_pickle_carries_only_constructor_args(path):
    src = ImageSource(N)
    ds = LmdbCachedDataset(src, path, version="v1", lru_bytes=1 << 20)
    for i in range(N):
        ds[i]
    state = ds.__getstate__()
    assert set(state) == {"_args", "_parts"}  # and the fingerprint's parts: plain JSON data
    json.dumps(state["_parts"])
    blob = pickle.dumps(ds)
    assert b"Environment" not in blob
    clone = pickle.loads(blob)
    assert clone._env is None and clone._store._e is None  # nothing opened yet
    assert clone.stats().misses == 0
    ds.flush()
    assert same(clone[5], src[5])
    assert clone.stats().hits == 1
    clone.close()
    assert same(ds[6], src[6])  # the original still works after the clone closed
    ds.close()


def test_two_datasets_on_one_path_in_one_process(path):
    train_src, val_src = ImageSource(N), ImageSource(N)
    train = LmdbCachedDataset(train_src, path)
    val = LmdbCachedDataset(val_src, path)
    for i in range(N):
        assert same(train[i], train_src[i])
    train.flush()
    for i in range(N):
        assert same(val[i], val_src[i])
    assert val.stats().hits == N
    val.close()
    assert same(train[3], train_src[3])  # closing one wrapper keeps the other's env
    with LmdbCachedDataset(None, path) as ro:
        assert same(ro[4], train_src[4])
    train.close()


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_concurrent_writers_first_writer_wins(path, method):
    n = 200
    with LmdbCachedDataset(ImageSource(n), path) as ds:  # create the cache first: both writers
        ds[0], ds[1]                                     # open an existing one (same source)
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=fill, args=(path, range(0, 150), n)),
             ctx.Process(target=fill, args=(path, range(199, 49, -1), n))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    src = ImageSource(n)
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    try:
        samples, meta = env.open_db(b"samples", create=False), env.open_db(b"meta", create=False)
        with env.begin() as txn:
            assert txn.stat(samples)["entries"] == n and txn.stat(meta)["entries"] == n
            keys = [KEY.unpack(k)[0] for k, _ in txn.cursor(db=samples)]
            assert keys == list(range(n))
            for k, rec in txn.cursor(db=samples):
                i = KEY.unpack(k)[0]
                assert codec.checksum_ok(rec, i)
                assert same(codec.decode(rec, True, None, i), src[i])
    finally:
        env.close()


# --------------------------------------------------------------------------- fingerprints


@pytest.mark.parametrize("change", [dict(version=1), dict(fingerprint="a")])
def test_on_stale_recompute_never_serves_old_rows(path, change):
    old, new = ImageSource(N, salt=0), ImageSource(N, salt=1)
    key = next(iter(change))
    with LmdbCachedDataset(old, path, **change) as ds:
        ds.build()
    changed = {key: change[key] * 2 if key == "fingerprint" else 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = LmdbCachedDataset(new, path, **changed)
    # version= alone is deliberate; a changed salt with fingerprint= untouched is not
    msgs = [str(w.message) for w in caught]
    if key == "fingerprint":
        assert msgs == []
    else:
        assert len(msgs) == 1 and f"{N} cached samples of the previous source" in msgs[0], msgs
    with ds:
        assert ds.cached_indices() == set()
        for i in range(N):
            assert same(ds[i], new[i])
        st = ds.stats()
        assert st.stale == N and st.misses == N and st.hits == 0
        ds.flush()
        for i in range(N):
            assert same(ds[i], new[i])
    with LmdbCachedDataset(None, path) as ro:
        assert same(ro[0], new[0])
    assert list(open_cache(path).keys()) == list(range(N))


def test_on_stale_reset_empties_the_cache(path):
    filled(path, version=1)
    with pytest.warns(RuntimeWarning, match="emptied"):
        ds = LmdbCachedDataset(ImageSource(N, salt=1), path, version=2, on_stale="reset")
    with open_cache(path) as view:
        assert list(view.keys()) == [] and view.info().entries == 0
    assert same(ds[0], ImageSource(N, salt=1)[0])
    ds.close()


def test_on_stale_error_names_the_changed_part(path):
    filled(path, version=1)
    with pytest.raises(StaleCacheError) as info:
        LmdbCachedDataset(ImageSource(N), path, version=2, on_stale="error")
    msg = str(info.value)
    assert "version" in msg and "'1'" in msg and "'2'" in msg and path in msg
    assert "class" not in msg  # only the part that changed
    with pytest.raises(StaleCacheError, match="length"):
        LmdbCachedDataset(ImageSource(N + 1), path, version=1, on_stale="error")
    with LmdbCachedDataset(ImageSource(N), path, version=1, on_stale="error") as ds:
        assert ds.stats().hits == 0 and same(ds[0], ImageSource(N)[0]) and ds.stats().hits == 1
    with pytest.raises(ValueError):
        LmdbCachedDataset(ImageSource(N), path, on_stale="ignore")


# --------------------------------------------------------------------------- damaged records and limits


def _flip_record_byte(path, index, offset=-1):
    env = lmdb.open(path, max_dbs=4, lock=True)
    try:
        db = env.open_db(b"samples", create=False)
        with env.begin(write=True, db=db) as txn:
            rec = bytearray(txn.get(KEY.pack(index)))
            rec[offset] ^= 0x55
            txn.put(KEY.pack(index), bytes(rec))
    finally:
        env.close()


def test_corrupt_record_without_source_raises(path):
    filled(path)
    _flip_record_byte(path, 3)
    with LmdbCachedDataset(None, path) as ro:
        assert same(ro[2], ImageSource(N)[2])
        with pytest.raises(CorruptRecordError) as info:
            ro[3]
        assert "3" in str(info.value) and "verify --repair" in str(info.value)
        assert ro.stats().corrupt == 1
    with open_cache(path) as view, pytest.raises(CorruptRecordError):
        view.get(3)


def test_corrupt_record_with_source_is_recomputed_and_rewritten(path):
    filled(path)
    _flip_record_byte(path, 3)
    _flip_record_byte(path, 4, offset=30)
    src = ImageSource(N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LmdbCachedDataset(src, path, lru_bytes=0) as ds:
            assert same(ds[3], src[3]) and same(ds[4], src[4])
            assert ds.stats().corrupt == 2
    assert len([w for w in caught if "damaged" in str(w.message)]) == 1
    with LmdbCachedDataset(None, path) as ro:
        assert same(ro[3], src[3]) and same(ro[4], src[4])


def test_sample_too_large_is_served_uncached(path):
    src = ImageSource(N)
    with pytest.warns(RuntimeWarning, match="max_sample_bytes") as rec:
        with LmdbCachedDataset(src, path, max_sample_bytes=100) as ds:
            for i in range(N):
                assert same(ds[i], src[i])
            assert ds.stats().too_large == N
    assert len(rec) == 1 and "encodes to" in str(rec[0].message)
    assert list(open_cache(path).keys()) == []


def test_cache_full_warns_once_and_keeps_serving(path):
    src = BigSource(60, 64 << 10)  # 3.75 MiB of samples into a map capped at 1 MiB
    with pytest.warns(RuntimeWarning, match="max_map_size") as rec:
        with LmdbCachedDataset(src, path, map_size=1 << 20, max_map_size=1 << 20, write_batch=4,
                               lru_bytes=0) as ds:
            for _ in range(2):
                for i in range(len(src)):
                    assert same(ds[i], src[i])
            st = ds.stats()
            assert st.write_errors > 0 and st.writes < len(src)
    assert len(rec) == 1
    assert CacheFullError.__name__ in str(rec[0].message) or "full" in str(rec[0].message)
    with open_cache(path) as view:
        assert view.info().file_bytes <= 1 << 20
        for i in view.keys():
            assert same(view.get(i), src[i])


def test_a_constructor_that_raises_leaves_the_cache_closed(tmp_path):
    """After StaleCacheError (on_stale='error') this process kept the environment and its
    shared lock, so `kvcache compact` refused: 'in use by 1 process'. Found by
    tests/test_state_machine.py."""
    from kvcache.maintenance import compact

    path = str(tmp_path / "c")
    with LmdbCachedDataset(ImageSource(10, 0), path, version=0) as ds:
        ds[0]
    with pytest.raises(StaleCacheError):
        LmdbCachedDataset(ImageSource(10, 1), path, version=1, on_stale="error")
    assert compact(path).entries == 1
