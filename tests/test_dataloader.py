"""Real DataLoaders with worker processes under fork, spawn and forkserver: correct
samples for 3 epochs, write-back from workers, no reader-slot leak, and a main process
that can still read afterwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from kvcache import LmdbCachedDataset, open_cache

from helpers import CountingSource, ImageSource, counts, reader_slots

N = 200
BATCH = 16
MAX_SLOTS = 8  # main + 2 workers, with room for stale slots of exited workers


def expected_batches(src):
    return list(DataLoader(src, batch_size=BATCH, shuffle=False, num_workers=0))


def check_epoch(loader, want):
    got = list(loader)
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want):
        assert gi.dtype == torch.uint8 and torch.equal(gi, wi) and torch.equal(gl, wl)


SLOW = pytest.mark.slow  # spawn/forkserver workers import torch each epoch: ~5 s an epoch here


@pytest.mark.parametrize("method, persistent, touch_first", [
    ("fork", False, False),
    ("fork", False, True),
    ("spawn", True, False),
    ("forkserver", True, False),
    pytest.param("spawn", False, False, marks=SLOW),
    pytest.param("forkserver", False, False, marks=SLOW),
], ids=["fork", "fork-main-read-first", "spawn-persistent", "forkserver-persistent", "spawn",
        "forkserver"])
def test_three_epochs_with_workers(tmp_path, method, persistent, touch_first):
    path = str(tmp_path / "cache")
    log = tmp_path / "log"
    log.mkdir()
    src = CountingSource(N, log)
    want = expected_batches(src.inner)
    ds = LmdbCachedDataset(src, path)
    if touch_first:
        # Main opens its environment (and buffers index 0) before the workers fork.
        assert torch.equal(ds[0][0], src.inner[0][0])
    loader = DataLoader(ds, batch_size=BATCH, shuffle=False, num_workers=2,
                        multiprocessing_context=method, persistent_workers=persistent)
    for epoch in range(3):
        check_epoch(loader, want)
        if epoch == 0 and not persistent:
            # Every worker's buffered batch reached the cache when the worker exited,
            # and main's pending index 0 was flushed before the workers forked.
            with open_cache(path) as view:
                assert list(view.keys()) == list(range(N))
        assert reader_slots(path) <= MAX_SLOTS
    del loader  # persistent workers exit here and flush their buffers
    ds.flush()
    with open_cache(path) as view:
        assert list(view.keys()) == list(range(N))
    # Each index was computed exactly once, in epoch 1 (main's index 0 was written
    # before the fork, so the workers read it from the cache).
    assert counts(log) == {i: 1 for i in range(N)}
    # The main process still reads, through the same dataset and a new one.
    assert torch.equal(ds[5][0], src.inner[5][0])
    assert ds.__getitems__([7, 8])[1][1] == src.inner[8][1]
    ds.close()
    with LmdbCachedDataset(None, path) as ro:
        assert torch.equal(ro[N - 1][0], src.inner[N - 1][0])
    assert reader_slots(path) <= MAX_SLOTS


def test_shuffled_persistent_workers_and_write_back(tmp_path):
    path = str(tmp_path / "cache")
    src = ImageSource(N)
    ds = LmdbCachedDataset(src, path, write_batch=1000)  # only the epoch-end flush writes
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2,
                        multiprocessing_context="fork", persistent_workers=True)
    want = sorted(src[i][1] for i in range(N))
    for _ in range(3):
        labels = torch.cat([lab for _, lab in loader])
        assert sorted(labels.tolist()) == want
    del loader  # persistent workers exit here and flush what they buffered
    with open_cache(path) as view:
        assert list(view.keys()) == list(range(N))
        for i in (0, 99, 199):
            assert torch.equal(view.get(i)[0], src[i][0])
    assert reader_slots(path) <= MAX_SLOTS
    ds.close()


def test_reader_slots_stay_bounded_over_many_reads(tmp_path):
    path = str(tmp_path / "cache")
    src = ImageSource(N)
    with LmdbCachedDataset(src, path) as ds:
        ds.build()
    ds = LmdbCachedDataset(src, path, lru_bytes=0)
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=2, multiprocessing_context="fork")
    for _ in range(2):
        for _batch in loader:
            pass
        assert reader_slots(path) <= MAX_SLOTS
    ds.close()
