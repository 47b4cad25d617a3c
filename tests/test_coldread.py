"""kvcache.coldread: a cold batch's pages fetched concurrently (the counts through a simulated
network are in test_network_scale.py). Here: which caches use it, that a batch read through it
is exactly the usual one (hits, misses, damaged records), and that it survives fork."""

import os

import pytest
import torch
from helpers import ImageSource, same

import kvcache
from kvcache import coldread, lockfree
from kvcache.store import key_of


@pytest.fixture
def cache(tmp_path):
    path = str(tmp_path / "c")
    with kvcache.LmdbCachedDataset(ImageSource(300), path) as ds:
        for i in range(250):  # 250..299 stay misses
            ds[i]
    return path


def test_only_cold_caches_use_it(cache, tmp_path):
    with kvcache.LmdbCachedDataset(ImageSource(300), cache) as ds:
        ds[0]
        assert ds._env.cold is False  # local, warm: the batch path makes no system call
    pub = str(tmp_path / "pub")
    kvcache.publish(cache, pub, partial=True)  # 250..299 stay misses
    with kvcache.LmdbCachedDataset(ImageSource(300), pub) as ds:
        ds[0]
        assert ds._env.lockfree and ds._env.cold is False  # small: prefetched instead
    assert lockfree.cold_reads(True, False, 1 << 30) and not lockfree.cold_reads(False, False, 1 << 20)
    assert lockfree.read_policy(None, True, 1 << 20) == (True, True)
    assert lockfree.read_policy(None, True, 1 << 40) == (False, False)
    assert lockfree.read_policy(None, False, 1 << 20) == (False, False)


def test_a_cold_batch_reads_what_a_warm_one_does(cache, monkeypatch):
    fetched = []
    real = coldread.fetch

    def counting(env, db, keys, threads=coldread.THREADS):
        fetched.append(len(keys))
        return real(env, db, keys, threads)

    monkeypatch.setattr("kvcache.reader._fetch", counting)
    source = ImageSource(300)
    with kvcache.LmdbCachedDataset(source, cache) as ds:
        e = ds._env
        e.cold = True
        with e.env.begin(write=True, db=e.samples) as txn:  # one record's bytes damaged
            bad = bytearray(txn.get(key_of(7)))
            bad[-1] ^= 0xFF
            txn.put(key_of(7), bytes(bad))
        idx = list(range(0, 300, 3)) + [7, 7]
        with pytest.warns(kvcache.KvCacheWarning, match="damaged"):
            got = ds.__getitems__(idx)
        assert all(same(g, source[i]) for g, i in zip(got, idx))
        assert fetched == [len(idx)]
        assert ds.stats().misses >= 1  # 250.. were computed, 7 recomputed


def test_fork_gets_its_own_pool(cache):
    source = ImageSource(300)
    with kvcache.LmdbCachedDataset(source, cache) as ds:
        ds._env.cold = True
        ds.__getitems__(list(range(64)))  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:  # the child: its environment reopens; force cold again and read
            code = 1
            try:
                e = ds._handle()
                e.cold = True
                code = 0 if all(same(g, source[i]) for g, i in zip(ds.__getitems__(list(range(64))), range(64))) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert torch.equal(ds.__getitems__([5])[0][0], source[5][0])
