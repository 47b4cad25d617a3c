"""``transform=``: applied to every sample served (hit or miss, one index or a batch),
never stored, never part of the fingerprint, pickled for spawn workers."""

from __future__ import annotations

import gc
import pickle

import torch
from torch.utils.data import DataLoader

from kvcache import LmdbCachedDataset, open_cache

from helpers import ImageSource, same

N = 64


class Shift:
    """A picklable deterministic transform: ``(img, label) -> (img as int16 + k, label)``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, sample):
        img, label = sample
        return img.to(torch.int16) + self.k, label


class RandomFlip:
    """Random augmentation: flips the image left-right with probability 1/2."""

    def __call__(self, sample):
        img, label = sample
        return (img.flip(-1) if torch.rand(()) < 0.5 else img), label


def shifted(src, i, k=3):
    return Shift(k)(src[i])


def test_transform_applies_to_misses_hits_and_batches_and_is_never_stored(tmp_path):
    path = str(tmp_path / "c")
    src = ImageSource(N)
    with LmdbCachedDataset(src, path, transform=Shift(3)) as ds:
        assert same(ds[0], shifted(src, 0))  # a miss
        ds.flush()
        assert same(ds[0], shifted(src, 0))  # a hit
        assert same(ds[-1], shifted(src, N - 1))
        got = ds.__getitems__([0, 1, 2, 5])  # hits and misses in one batch
        assert all(same(g, shifted(src, i)) for g, i in zip(got, [0, 1, 2, 5]))
        st = ds.stats()
        assert st.misses == 5 and st.hits == 2, st
    with open_cache(path) as v:  # the records hold the source's samples, untransformed
        assert sorted(v) == [0, 1, 2, 5, N - 1]
        for i, sample in v.items():
            assert same(sample, src[i]) and sample[0].dtype == torch.uint8


def test_transform_is_not_part_of_the_fingerprint(tmp_path):
    path = str(tmp_path / "c")
    src = ImageSource(N)
    with LmdbCachedDataset(src, path) as ds:
        ds.build()
    with LmdbCachedDataset(src, path, transform=Shift(1), lru_bytes=1 << 20) as ds:
        for _ in range(2):  # the second pass through the LRU
            assert all(same(ds[i], shifted(src, i, 1)) for i in range(N))
        st = ds.stats()
        assert st.misses == 0 and st.stale == 0 and st.hits + st.lru_hits == 2 * N, st
        ds.transform = None  # settable, like torchvision's
        assert same(ds[3], src[3])
    with LmdbCachedDataset(None, path, transform=Shift(2)) as ds:  # a source-less reader too
        assert same(ds[4], shifted(src, 4, 2))


def test_transform_pickles_with_the_arguments(tmp_path):
    ds = LmdbCachedDataset(ImageSource(N), str(tmp_path / "c"), transform=Shift(5))
    ds.transform = Shift(7)  # a transform set later travels too
    ds.close()
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.transform, Shift) and clone.transform.k == 7
    assert same(clone[2], shifted(ImageSource(N), 2, 7))
    clone.close()


def test_spawn_workers_apply_a_random_augmentation_after_the_cache(tmp_path):
    """The README's advice: cache what is deterministic, augment at random after."""
    path = str(tmp_path / "c")
    src = ImageSource(N)
    ds = LmdbCachedDataset(src, path, transform=RandomFlip())
    loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="spawn",
                        persistent_workers=True)
    flipped = 0
    for _epoch in range(2):
        i = 0  # no shuffling: the loader serves 0, 1, 2, ...
        for imgs, labels in loader:
            for img, label in zip(imgs, labels):
                want, wl = src[i]
                assert int(label) == wl
                assert torch.equal(img, want) or torch.equal(img, want.flip(-1))
                flipped += not torch.equal(img, want)
                i += 1
        assert i == N
    assert 0 < flipped < 2 * N  # some flipped, some not: the transform ran in the workers
    del loader  # the persistent workers exit, writing back what they computed
    gc.collect()
    with open_cache(path) as v:  # write-back from the workers stored the unflipped samples
        assert len(v) == N and all(same(v[i], src[i]) for i in range(N))
    ds.close()

