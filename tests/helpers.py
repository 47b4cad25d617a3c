"""Importable helper datasets for the test suite (usable from spawn/forkserver workers).

Every source is deterministic: the sample at an index depends only on the index and the
constructor's arguments, so a test can compare what the cache returns with ``expected(i)``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageSource(Dataset):
    """``(uint8 tensor [3, 8, 8], int label)`` per index; ``salt`` changes every value."""

    def __init__(self, n: int = 200, salt: int = 0) -> None:
        self.n = n
        self.salt = salt

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(i * 7919 + self.salt)
        img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
        return img, (i * 31 + self.salt) % 10


class RaggedSource(Dataset):
    """Dicts with ragged arrays: lengths vary with the index."""

    def __init__(self, n: int = 100) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        k = 1 + i % 7
        return {
            "tokens": rng.integers(0, 1000, size=k, dtype=np.int64),
            "boxes": rng.random((k % 3, 4), dtype=np.float32),
            "name": f"item-{i}",
            "id": i,
        }


class CountingSource(Dataset):
    """Records how often each index was computed, in a file per process under ``log_dir``
    (so counts survive DataLoader workers of any start method)."""

    def __init__(self, n: int, log_dir: str, salt: int = 0) -> None:
        self.n = n
        self.log_dir = str(log_dir)
        self.salt = salt
        self.inner = ImageSource(n, salt)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with open(os.path.join(self.log_dir, f"calls.{os.getpid()}"), "a") as f:
            f.write(f"{i}\n")
        return self.inner[i]


def counts(log_dir) -> dict[int, int]:
    """How often each index was computed, over every process that logged to ``log_dir``."""
    out: dict[int, int] = {}
    for name in os.listdir(log_dir):
        if name.startswith("calls."):
            with open(os.path.join(log_dir, name)) as f:
                for line in f:
                    i = int(line)
                    out[i] = out.get(i, 0) + 1
    return out


class Unsupported:
    """A custom class the codec must refuse."""


class BadSource(Dataset):
    """Returns an unsupported value at index 1."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return (i, {"meta": Unsupported()}) if i == 1 else (i, {"meta": None})


class BigSource(Dataset):
    """Samples of ``nbytes`` random bytes each (a float32 tensor)."""

    def __init__(self, n: int, nbytes: int) -> None:
        self.n = n
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(self.nbytes // 4, generator=g)


def same(a, b) -> bool:
    """Exact equality for samples: types, dtypes, shapes, and values bitwise."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    if isinstance(a, (np.longdouble, np.clongdouble)):  # padding bytes are not the value
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True) and (
            np.signbit(a.real) == np.signbit(b.real))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values in C order (any dtype, 0-d included)."""
    if t.numel() == 0:
        return b""
    t = t.detach()
    if t.element_size() in _RAW:  # no copy kernels for sub-byte dtypes; complex32 warns
        t = t.view(_RAW[t.element_size()])
    return t.contiguous().numpy().tobytes()


_RAW = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def fill(path: str, indices, n: int = 200) -> None:
    """Read ``indices`` through a cached ImageSource at ``path`` (a writer process)."""
    from kvcache import LmdbCachedDataset

    with LmdbCachedDataset(ImageSource(n), path, write_batch=16, lru_bytes=0) as ds:
        for i in indices:
            ds[i]


def reader_slots(path: str) -> int:
    """Reader-table slots in use at ``path`` (lines of env.readers() after its header)."""
    from kvcache import open_cache

    with open_cache(path) as view:
        table = view.store.handle().env.readers()
    return len([line for line in table.splitlines()[1:] if line.strip()])


def tree_hashes(path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path (did anything change a byte?)."""
    out = {}
    for d, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def records(path: str) -> dict[int, bytes]:
    """Every raw record of the cache at ``path``, by index."""
    from kvcache import open_cache

    with open_cache(path) as v:
        return {i: v.record(i) for i in v.keys()}
