"""Sources and utilities for the CLI tests (importable by workers and subprocesses)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

PATTERN = b"KVCLITEST"  # marks every sample's payload, so tests can find records in data.mdb


class Squares(torch.utils.data.Dataset):
    """``{'image': uint8[3,8,8], 'label': int, 'tag': bytes}``; deterministic per index."""

    # delay does not change a sample; offset stands for the contents of the files a real
    # source reads, which its fingerprint does not see (what a spot check is for)
    kvcache_fingerprint_exclude = ("delay", "offset")

    def __init__(self, n: int = 200, delay: float = 0.0, offset: int = 0) -> None:
        self.n, self.delay, self.offset = n, delay, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        img = np.full((3, 8, 8), (i + self.offset) % 251, dtype=np.uint8)
        return {"image": torch.from_numpy(img), "label": i, "tag": PATTERN + str(i).encode()}


def expected(i: int) -> dict:
    return Squares()[i]


def small() -> Squares:
    return Squares(int(os.environ.get("KVTEST_N", "200")))


def shifted() -> Squares:
    """Same class and length as ``small()``, different samples (a changed data file)."""
    return Squares(int(os.environ.get("KVTEST_N", "200")), offset=1)


def slow() -> Squares:
    """Each item costs ~``KVTEST_DELAY`` seconds (default 5 ms): for interrupted builds."""
    return Squares(int(os.environ.get("KVTEST_N", "400")), float(os.environ.get("KVTEST_DELAY", "0.005")))


def tuples() -> Pairs:
    return Pairs()


class Pairs(torch.utils.data.Dataset):
    """A different source (another fingerprint): ``(float32[4], str)``."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> tuple:
        return np.arange(4, dtype=np.float32) + i, f"item {i}"


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def hold_open(path: str, n: str) -> None:
    """Open the cache, read one sample, print 'ready', then idle until stdin closes."""
    import sys

    from kvcache import LmdbCachedDataset

    ds = LmdbCachedDataset(Squares(int(n)), path)
    ds[0]
    print("ready", flush=True)
    sys.stdin.read()
    ds.close()


if __name__ == "__main__":
    import sys

    hold_open(sys.argv[1], sys.argv[2])
