"""The bytes-bounded LRU: size bound, per-item cap, recency order."""

from __future__ import annotations

from kvcache.lru import MAX_ITEM, BytesLRU


def test_evicts_least_recently_used_past_max_bytes():
    lru = BytesLRU(400)
    for k in range(4):
        lru.put(k, bytes(100))
    assert lru.get(0) is not None  # 0 is now the most recent
    lru.put(4, bytes(100))
    assert lru.get(1) is None and lru.get(0) is not None and len(lru) == 4
    assert lru.nbytes == 400


def test_large_records_never_enter():
    lru = BytesLRU(64 << 20)
    assert lru.max_item == MAX_ITEM
    lru.put(1, bytes(MAX_ITEM + 1))
    lru.put(2, bytes(MAX_ITEM))
    assert lru.get(1) is None and lru.get(2) is not None and lru.nbytes == MAX_ITEM
    small = BytesLRU(1000)  # one item must not flush most of a small cache
    small.put(1, bytes(251))
    assert len(small) == 0 and small.max_item == 250


def test_replacing_a_key_keeps_the_byte_count():
    lru = BytesLRU(1000)
    lru.put(1, bytes(100))
    lru.put(1, bytes(50))
    assert lru.nbytes == 50 and len(lru) == 1
    lru.discard(1)
    assert lru.nbytes == 0 and len(lru) == 0


def test_dataset_keeps_large_records_out_of_its_lru(tmp_path):
    import numpy as np

    from kvcache import LmdbCachedDataset

    data = [np.full(8192, i, np.int64) for i in range(3)] + [np.arange(4)]  # 64 KiB, 64 KiB, 64 KiB, small
    with LmdbCachedDataset(data, tmp_path / "c", lru_bytes=1 << 20, fingerprint="lru") as ds:
        ds.build()
        for _ in range(2):
            got = [ds[i] for i in range(4)]
        assert all(np.array_equal(g, d) for g, d in zip(got, data))
        st = ds.stats()
        assert (st.hits, st.lru_hits) == (3 * 2 + 1, 1)
        assert len(ds._lru) == 1


def test_lru_survives_a_parallel_build(tmp_path):
    # build(num_workers=1) releases the environment before its workers fork; the next read
    # reopens it. The LRU's records are this source's and stay right: it used to be
    # cleared there, which the state machine caught as a missing lru_hit (at random).
    from helpers import ImageSource, same

    from kvcache import LmdbCachedDataset

    src = ImageSource(40)
    with LmdbCachedDataset(src, tmp_path / "c", lru_bytes=1 << 20) as ds:
        ds[3]
        ds.flush()
        ds[3]  # read from LMDB into the LRU
        assert ds.stats().lru_hits == 0
        ds.build(num_workers=1)
        assert same(ds[5], src[5])  # not in the LRU: this read reopens the environment
        assert same(ds[3], src[3])
        assert ds.stats().lru_hits == 1
