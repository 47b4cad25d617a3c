"""Keyed caches (``key=``): appends, removals, reorders and changed keys keep what is
unchanged (0 source calls for it) and never serve another key's sample; bad key
functions fail clearly with nothing stored; DataLoader workers and builds (serial,
workers, distributed) fill keyed caches."""

from __future__ import annotations

import os
import time

import pytest
import torch.multiprocessing as tmp
from _key_helpers import Folder, build_rank, bytes_key, calls, names, sample_of
from helpers import same
from torch.utils.data import DataLoader

from kvcache import (
    CorruptRecordError,
    DuplicateKeyError,
    KeyedCacheError,
    KeyFunctionError,
    LmdbCachedDataset,
    MissingSampleError,
    StaleCacheError,
    open_cache,
)

N = 60


def fill(path, src, **kw):
    with LmdbCachedDataset(src, path, key=src.key, **kw) as ds:
        for i in range(len(src)):
            assert same(ds[i], src.expected(i))
    return calls(src.log_dir)


def read_all(path, src, batch: bool = False, **kw):
    """Every index read back (ds[i], or __getitems__ in batches of 7), checked."""
    with LmdbCachedDataset(src, path, key=src.key, **kw) as ds:
        if batch:
            got = [s for k in range(0, len(src), 7) for s in ds.__getitems__(list(range(k, min(k + 7, len(src)))))]
        else:
            got = [ds[i] for i in range(len(src))]
        st = ds.stats()
    assert all(same(s, src.expected(i)) for i, s in enumerate(got))
    return st


@pytest.fixture
def logs(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.mark.parametrize("batch", [False, True])
def test_append_remove_reorder_keep_every_unchanged_sample(tmp_path, logs, batch):
    path = str(tmp_path / "c")
    assert fill(path, Folder(names(N), logs)) == {n: 1 for n in names(N)}
    # append 10, reorder (reverse), remove every fifth: only the 10 new names are computed
    later = [n for k, n in enumerate(reversed(names(N + 10))) if k % 5]
    for f in os.listdir(logs):
        os.remove(logs / f)
    st = read_all(path, Folder(later, logs), batch)
    new = set(names(10, N)) & set(later)
    assert calls(logs) == {n: 1 for n in new}
    assert st.misses == len(new) and st.hits == len(later) - len(new)
    # and again: 0 source calls
    for f in os.listdir(logs):
        os.remove(logs / f)
    st = read_all(path, Folder(later, logs), batch)
    assert calls(logs) == {} and st.misses == 0
    with open_cache(path) as v:
        assert v.info().keyed and len(v) == N + len(new)  # removed items stay until gc


def test_changed_key_is_recomputed_and_the_old_sample_never_served(tmp_path, logs):
    path = str(tmp_path / "c")
    ns = names(20)
    fill(path, Folder(ns, logs, stamps={n: 1 for n in ns}))
    for f in os.listdir(logs):
        os.remove(logs / f)
    # names 3 and 7 changed on disk (a new mtime): their samples differ now
    src = Folder(ns, logs, stamps={n: (2 if n in (ns[3], ns[7]) else 1) for n in ns})
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        for i in range(20):
            assert same(ds[i], src.expected(i))
    assert calls(logs) == {ns[3]: 1, ns[7]: 1}


def test_same_length_reorder_without_key_is_a_changed_source(tmp_path):
    """A reorder of the same length and code: the fingerprint covers the source's list of
    names (its plain-data attributes), so the old order is never served; it warns."""
    path = str(tmp_path / "c")
    a, b = Folder(names(30)), Folder(list(reversed(names(30))))
    with LmdbCachedDataset(a, path) as ds:
        [ds[i] for i in range(30)]
    with pytest.warns(Warning, match="30 cached samples of the previous source"):
        ds = LmdbCachedDataset(b, path)
    with ds:
        assert same(ds[0], b[0]) and not same(ds[0], a[0])  # the new order's sample
    with LmdbCachedDataset(Folder(list(reversed(names(30)))), str(tmp_path / "k"),
                           key=Folder(list(reversed(names(30)))).key) as kd:
        assert same(kd[0], b[0])


def test_length_is_not_in_a_keyed_fingerprint_but_class_and_version_are(tmp_path):
    path = str(tmp_path / "c")
    src = Folder(names(10))
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        parts = ds.fingerprint_parts
        [ds[i] for i in range(10)]
        fp = ds.fingerprint_id
    assert parts["keyed"] is True and "length" not in parts and parts["source_hash"]
    more = Folder(names(15))
    with LmdbCachedDataset(more, path, key=more.key) as ds:
        assert ds.fingerprint_id == fp
    with pytest.raises(StaleCacheError, match="version"):
        LmdbCachedDataset(more, path, key=more.key, version=2, on_stale="error")
    # an index-keyed opening of a keyed cache is a changed fingerprint too
    with pytest.raises(StaleCacheError, match="keyed"):
        LmdbCachedDataset(more, path, on_stale="error")


class Raises:
    def __init__(self, at):
        self.at = at

    def __call__(self, i):
        if i == self.at:
            raise OSError("stat failed")
        return f"k{i}"


def test_bad_key_functions_fail_clearly_and_store_nothing(tmp_path, logs):
    src = Folder(names(10), logs)
    with LmdbCachedDataset(src, str(tmp_path / "a"), key=Raises(4)) as ds:
        assert same(ds[3], src.expected(3))
        with pytest.raises(KeyFunctionError, match="raised OSError for index 4: stat failed") as exc:
            ds[4]
        assert isinstance(exc.value.__cause__, OSError)
        with pytest.raises(KeyFunctionError, match="index 4"):
            ds.__getitems__([5, 4, 6])
        with pytest.raises(KeyFunctionError, match="index 4"):
            ds.build()
    with open_cache(str(tmp_path / "a")) as v:
        assert sorted(v) == ["k3"]  # nothing for 4 (nor 5, 6: the batch failed first)
    for bad in (7, None, 1.5, ["x"], "x" * 70000):
        with LmdbCachedDataset(src, str(tmp_path / f"b{type(bad).__name__}"), key=lambda i, b=bad: b) as ds:
            with pytest.raises(KeyFunctionError, match="for index 2.*str or bytes|for index 2.*at most"):
                ds[2]
            with pytest.raises(KeyFunctionError):
                ds.build()
            ds.flush()
        with open_cache(str(tmp_path / f"b{type(bad).__name__}")) as v:
            assert len(v) == 0


def test_a_duplicate_key_names_both_indices_and_stores_nothing_wrong(tmp_path, logs):
    src = Folder(names(10), logs)

    def dup(i):  # indices 2 and 6 claim one key
        return "same" if i in (2, 6) else src.names[i]

    path = str(tmp_path / "c")
    with LmdbCachedDataset(src, path, key=dup) as ds:
        with pytest.raises(DuplicateKeyError, match="indices 2 and 6"):
            ds.build()
        assert len(open_cache(path)) == 0  # a build checks every key before computing any
        assert same(ds[2], src.expected(2))
        with pytest.raises(DuplicateKeyError, match="indices 2 and 6"):
            ds[6]  # within a write batch: the pending sample belongs to index 2
        with pytest.raises(DuplicateKeyError, match="indices 2 and 6"):
            ds.__getitems__([6])
    with open_cache(path) as v:
        assert list(v) == ["same"] and same(v["same"], src.expected(2))


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_fill_and_read_a_keyed_cache(tmp_path, logs, method):
    path = str(tmp_path / "c")
    src = Folder(names(N), logs)
    ds = LmdbCachedDataset(src, path, key=src.key, write_batch=8)
    for epoch in range(2):
        loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=method,
                            persistent_workers=method == "spawn", collate_fn=list)
        got = [s for b in loader for s in b]
        assert len(got) == N and all(same(s, src.expected(i)) for i, s in enumerate(got))
        del loader
    ds.close()
    assert calls(logs) == {n: 1 for n in names(N)}  # once, by a worker, in epoch 1
    # a reordered, grown folder in new workers: only the new items are computed
    for f in os.listdir(logs):
        os.remove(logs / f)
    src2 = Folder(list(reversed(names(N + 4))), logs)
    ds2 = LmdbCachedDataset(src2, path, key=src2.key)
    loader = DataLoader(ds2, batch_size=8, num_workers=2, multiprocessing_context=method, collate_fn=list)
    got = [s for b in loader for s in b]
    assert [s[2] for s in got] == src2.names
    ds2.close()
    assert calls(logs) == {n: 1 for n in names(4, N)}


@pytest.mark.parametrize("workers", [0, 2])
def test_builds_fill_a_keyed_cache_and_skip_unchanged_keys(tmp_path, logs, workers):
    path = str(tmp_path / "c")
    src = Folder(names(N), logs)
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        rep = ds.build(num_workers=workers)
        assert (rep.computed, rep.already_cached) == (N, 0)
    grown = Folder(names(N + 5)[::-1], logs)
    with LmdbCachedDataset(grown, path, key=grown.key) as ds:
        rep = ds.build(num_workers=workers)
        assert (rep.computed, rep.already_cached) == (5, N)
        for f in os.listdir(logs):
            os.remove(logs / f)
        assert all(same(ds[i], sample_of(grown.names[i])) for i in range(N + 5))
        assert ds.stats().misses == 0 and calls(logs) == {}
        assert ds.cached_indices() == set(range(N + 5))


def test_a_distributed_build_fills_a_keyed_cache(tmp_path):
    path, out = str(tmp_path / "c"), str(tmp_path / "out")
    os.makedirs(out)
    src = Folder(names(41))
    init = f"file://{tmp_path}/pg-{time.time_ns()}"
    tmp.spawn(build_rank, args=(2, init, path, src, out), nprocs=2, join=True)
    with open_cache(path, key=src.key) as v:
        assert len(v) == 41 and all(same(v[i], src.expected(i)) for i in range(41))
    with LmdbCachedDataset(Folder(names(45)), path, key=Folder(names(45)).key) as ds:
        rep = ds.build()
        assert (rep.computed, rep.already_cached) == (4, 41)


def test_open_cache_by_key_and_by_index(tmp_path):
    path = str(tmp_path / "c")
    src = Folder(names(10))
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        ds.build()
    with open_cache(path) as v:
        assert v.keyed and sorted(v) == names(10) and len(v) == 10
        assert same(v.by_key(names(10)[3]), src.expected(3)) and same(v[names(10)[3]], src.expected(3))
        assert names(10)[3] in v and "nope" not in v and 3 not in v
        with pytest.raises(KeyedCacheError, match="key=fn"):
            v[3]
        with pytest.raises(MissingSampleError):
            v.by_key("nope")
    with open_cache(path, key=src.key) as v:
        assert same(v[3], src.expected(3)) and 3 in v
    # a dataset without a source reads a keyed cache by index with its key function
    with LmdbCachedDataset(None, path, key=src.key) as ds:
        assert len(ds) == 10 and same(ds[4], src.expected(4))
    with pytest.raises(KeyedCacheError, match="keyed cache"):
        LmdbCachedDataset(None, path)
    idx = str(tmp_path / "i")
    with LmdbCachedDataset(src, idx) as ds:
        ds[0]
    with open_cache(idx) as v:
        with pytest.raises(KeyedCacheError, match="index-keyed"):
            v.by_key("x")
    with pytest.raises(KeyedCacheError, match="index-keyed"):
        LmdbCachedDataset(None, idx, key=src.key)


def test_bytes_keys(tmp_path):
    path = str(tmp_path / "c")
    src = Folder(names(8))
    with LmdbCachedDataset(src, path, key=lambda i: bytes_key(src, i)) as ds:
        ds.build()
    with open_cache(path) as v:
        k = bytes_key(src, 5)
        assert same(v.by_key(k), src.expected(5)) and sorted(v) == sorted(bytes_key(src, i) for i in range(8))
        with pytest.raises(MissingSampleError):
            v.by_key(k.hex())  # a str is another key than the bytes


def test_a_record_copied_to_another_key_is_not_served(tmp_path):
    path = str(tmp_path / "c")
    src = Folder(names(6))
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        ds.build()
        lk2, lk4 = ds.storage_key(2)[0], ds.storage_key(4)[0]
        e = ds.store.handle()
        rec2 = ds.store.begin().get(lk2)
        rec2 = bytes(rec2)
        ds.store.transact(lambda txn: txn.put(lk4, rec2, db=e.samples))  # a misdirected write
    with pytest.warns(Warning, match="damaged"):
        with LmdbCachedDataset(src, path, key=src.key) as ds:
            assert same(ds[4], src.expected(4)) and ds.stats().corrupt == 1
    with open_cache(path) as v:
        assert same(v.by_key(names(6)[4]), src.expected(4))  # repaired by the recompute


def test_getitems_and_getitem_agree_on_damaged_keyed_records(tmp_path):
    path = str(tmp_path / "c")
    src = Folder(names(12))
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        ds.build()
        e = ds.store.handle()
        for i, how in ((2, "flip"), (5, "short"), (8, "other")):
            lk = ds.storage_key(i)[0]
            rec = bytearray(ds.store.begin().get(lk))
            if how == "flip":
                rec[30] ^= 1
            elif how == "short":
                rec = rec[:-3]
            else:
                rec = bytearray(ds.store.begin().get(ds.storage_key(9)[0]))
            ds.store.transact(lambda txn, lk=lk, rec=bytes(rec): txn.put(lk, rec, db=e.samples))
    saved = {}
    with LmdbCachedDataset(None, path, key=src.key) as ds:  # without a source: each is refused
        for i in (2, 5, 8):
            with pytest.raises(CorruptRecordError):
                ds[i]
            with pytest.raises(CorruptRecordError):
                ds.__getitems__([0, i])
        saved = {i: ds[i] for i in (0, 1, 9)}
    assert all(same(v, src.expected(i)) for i, v in saved.items())
    with pytest.warns(Warning, match="damaged"):
        with LmdbCachedDataset(src, path, key=src.key) as ds:  # with it: recomputed, in a batch too
            got = ds.__getitems__(list(range(12)))
            assert all(same(v, src.expected(i)) for i, v in enumerate(got)) and ds.stats().corrupt == 3
