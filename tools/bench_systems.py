"""The systems ``tools/bench.py`` compares: each one builds a cache of a workload's
samples in a directory and reads them back as a map-style dataset.

Every reader is picklable (paths and small state only) and opens its files lazily in
the process that reads, so the same object serves the main process, DataLoader workers
(fork) and the strace/RSS child processes.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections import OrderedDict
from typing import Any, Callable

import lmdb
import numpy as np

KEY = struct.Struct(">Q").pack
_xxh = __import__("xxhash").xxh3_64_intdigest
MAP = 1 << 36
_ENVS: dict[str, tuple[int, Any]] = {}


def open_ro(path: str) -> Any:
    """This process's read-only env on ``path`` (py-lmdb refuses a second open of a path
    in one process, and a forked child must close the env it inherited first)."""
    pid = os.getpid()
    got = _ENVS.get(path)
    if got is not None:
        if got[0] == pid:
            return got[1]
        got[1].close()  # inherited over fork: readonly + lock=False, so closing is safe
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)
    _ENVS[path] = (pid, env)
    return env


def main_array(sample: Any) -> tuple[np.ndarray, int]:
    """The array and the int label of a workload sample (tuple or ragged dict)."""
    if isinstance(sample, dict):
        return sample["tokens"], sample["label"]
    return sample[0], sample[1]


def make_sample(arr: np.ndarray, label: int, ragged: bool) -> Any:
    return {"tokens": arr, "label": label} if ragged else (arr, label)


class Reader:
    """Base: ``n`` items; ``ragged`` picks the dict sample shape."""

    def __init__(self, path: str, n: int, ragged: bool) -> None:
        self.path, self.n, self.ragged = path, n, ragged
        self._pid = -1

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_pid"] = -1
        for k in list(d):
            if k.startswith("_h"):
                d[k] = None
        return d

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- raw LMDB


class LmdbRaw(Reader):
    """The floor: array bytes under an 8-byte key, labels held in RAM, frombuffer + one
    copy. ``long_txn`` keeps one ``buffers=True`` read txn for the process's life."""

    def __init__(self, path: str, n: int, ragged: bool, dtype: str, shape: tuple | None,
                 labels: list[int], long_txn: bool) -> None:
        super().__init__(path, n, ragged)
        self.dtype, self.shape, self.labels, self.long_txn = np.dtype(dtype), shape, labels, long_txn
        self._henv: Any = None
        self._htxn: Any = None

    def _env(self) -> Any:
        if self._pid != os.getpid():  # once per item in a loop is 1 syscall; fine for setup only
            self._pid = os.getpid()
            self._henv = open_ro(self.path)
            self._htxn = self._henv.begin(buffers=True) if self.long_txn else None
        return self._henv

    def _one(self, txn: Any, i: int) -> Any:
        b = txn.get(KEY(i))
        a = np.frombuffer(b, self.dtype)
        if self.shape is not None:
            a = a.reshape(self.shape)
        return make_sample(a.copy(), self.labels[i], self.ragged)

    def __getitem__(self, i: int) -> Any:
        txn = self._htxn
        if txn is None:
            if self._henv is None:
                self._env()
                return self[i]
            with self._henv.begin(buffers=True) as t:
                return self._one(t, i)
        return self._one(txn, i)

    def __getitems__(self, idx: list[int]) -> list:
        if self._henv is None:
            self._env()
        with self._henv.begin(buffers=True) as t:
            return [self._one(t, i) for i in idx]

    @staticmethod
    def build(path: str, data: list, long_txn: bool = True) -> "LmdbRaw":
        env = lmdb.open(path, map_size=MAP, readahead=False)
        with env.begin(write=True) as t:
            for i, s in enumerate(data):
                t.put(KEY(i), main_array(s)[0].tobytes(), append=True)
        env.close()
        a0 = main_array(data[0])[0]
        ragged = isinstance(data[0], dict)
        return LmdbRaw(path, len(data), ragged, a0.dtype.str, None if ragged else a0.shape,
                       [main_array(s)[1] for s in data], long_txn)


class LmdbRawHashed(LmdbRaw):
    """The hash-then-copy limit: the floor plus an xxh3 of every value before the copy (what
    any reader that checks a checksum over the record must pay at the least)."""

    def _one(self, txn: Any, i: int) -> Any:
        b = txn.get(KEY(i))
        if _xxh(b, i) == 1:  # compared, so the hash is not optimised away (it never matches)
            raise AssertionError
        a = np.frombuffer(b, self.dtype)
        if self.shape is not None:
            a = a.reshape(self.shape)
        return make_sample(a.copy(), self.labels[i], self.ragged)


class LmdbPickle(Reader):
    """The folder2lmdb recipe: pickle.dumps(sample) per key, a ``with env.begin()`` per item."""

    def __getitem__(self, i: int) -> Any:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._henv = open_ro(self.path)
        with self._henv.begin() as t:
            return pickle.loads(t.get(KEY(i)))

    @staticmethod
    def build(path: str, data: list) -> "LmdbPickle":
        env = lmdb.open(path, map_size=MAP, readahead=False)
        with env.begin(write=True) as t:
            for i, s in enumerate(data):
                t.put(KEY(i), pickle.dumps(s, protocol=5), append=True)
        env.close()
        return LmdbPickle(path, len(data), isinstance(data[0], dict))


# --------------------------------------------------------------------------- files


class PerFile(Reader):
    """The article recipe: ``i.npy`` (np.save / np.load) and ``i.txt`` holding the label."""

    def __getitem__(self, i: int) -> Any:
        a = np.load(os.path.join(self.path, f"{i}.npy"))
        with open(os.path.join(self.path, f"{i}.txt")) as f:
            label = int(f.read())
        return make_sample(a, label, self.ragged)

    @staticmethod
    def build(path: str, data: list) -> "PerFile":
        os.makedirs(path, exist_ok=True)
        for i, s in enumerate(data):
            a, label = main_array(s)
            np.save(os.path.join(path, f"{i}.npy"), a)
            with open(os.path.join(path, f"{i}.txt"), "w") as f:
                f.write(str(label))
        return PerFile(path, len(data), isinstance(data[0], dict))


class Tiered(PerFile):
    """An item-count LRU dict (1000 items) over the per-file cache."""

    def __init__(self, path: str, n: int, ragged: bool, max_items: int = 1000) -> None:
        super().__init__(path, n, ragged)
        self.max_items = max_items
        self._hlru: Any = None

    def __getitem__(self, i: int) -> Any:
        lru = self._hlru
        if lru is None:
            lru = self._hlru = OrderedDict()
        v = lru.get(i)
        if v is not None:
            lru.move_to_end(i)
            return v
        v = PerFile.__getitem__(self, i)
        lru[i] = v
        if len(lru) > self.max_items:
            lru.popitem(last=False)
        return v


class Memmap(Reader):
    """One ``np.memmap`` file (ragged: a flat file plus an offsets array in RAM)."""

    def __init__(self, path: str, n: int, ragged: bool, dtype: str, shape: tuple | None,
                 offsets: np.ndarray | None, labels: list[int]) -> None:
        super().__init__(path, n, ragged)
        self.dtype, self.shape, self.offsets, self.labels = dtype, shape, offsets, labels
        self._hm: Any = None

    def __getitem__(self, i: int) -> Any:
        m = self._hm
        if m is None:
            full = (self.n, *self.shape) if self.shape is not None else None
            m = self._hm = np.memmap(os.path.join(self.path, "data.bin"), self.dtype, "r", shape=full)
        if self.offsets is None:
            a = np.array(m[i])
        else:
            a = np.array(m[self.offsets[i] : self.offsets[i + 1]])
        return make_sample(a, self.labels[i], self.ragged)

    @staticmethod
    def build(path: str, data: list) -> "Memmap":
        os.makedirs(path, exist_ok=True)
        ragged = isinstance(data[0], dict)
        a0 = main_array(data[0])[0]
        offsets = np.zeros(len(data) + 1, np.int64) if ragged else None
        with open(os.path.join(path, "data.bin"), "wb") as f:
            for i, s in enumerate(data):
                a = main_array(s)[0]
                f.write(a.tobytes())
                if offsets is not None:
                    offsets[i + 1] = offsets[i] + a.size
        return Memmap(path, len(data), ragged, a0.dtype.str, None if ragged else a0.shape, offsets,
                      [main_array(s)[1] for s in data])


class InRam(Reader):
    """The ceiling: a dict of the samples themselves (no copy)."""

    def __init__(self, data: list) -> None:
        super().__init__("", len(data), isinstance(data[0], dict))
        self.d = dict(enumerate(data))

    def __getitem__(self, i: int) -> Any:
        return self.d[i]


class DiskCache(Reader):
    """diskcache.Cache (SQLite + pickle; values over 32 KiB in files)."""

    def __getitem__(self, i: int) -> Any:
        if self._pid != os.getpid():
            import diskcache

            self._pid = os.getpid()
            self._hc = diskcache.Cache(self.path)
        return self._hc[i]

    @staticmethod
    def build(path: str, data: list) -> "DiskCache":
        import diskcache

        with diskcache.Cache(path) as c:
            for i, s in enumerate(data):
                c[i] = s
        return DiskCache(path, len(data), isinstance(data[0], dict))


# --------------------------------------------------------------------------- kvcache


class ListSource:
    """The workload as a map-style source; ``cost_us`` busy-waits per item."""

    def __init__(self, data: list, cost_us: float = 0.0) -> None:
        self.data, self.cost_us = data, cost_us

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if self.cost_us:
            import time

            end = time.perf_counter() + self.cost_us * 1e-6
            while time.perf_counter() < end:
                pass
        return self.data[i]


def build_kvcache(path: str, data: list) -> None:
    from kvcache import LmdbCachedDataset

    with LmdbCachedDataset(ListSource(data), path, fingerprint="bench", lru_bytes=0) as ds:
        ds.build()


def open_kvcache(path: str, **kw: Any) -> Any:
    """A read-only kvcache over a built cache (no source: every read is a hit)."""
    from kvcache import LmdbCachedDataset

    return LmdbCachedDataset(None, path, **kw)


def dir_bytes(path: str) -> tuple[int, int]:
    """(allocated bytes, file count) under ``path``."""
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(root, name))
            total += st.st_blocks * 512
            files += 1
    return total, files


BUILDERS: dict[str, Callable] = {
    "floor": lambda p, d: LmdbRaw.build(p, d, True),
    "lmdb_pickle": LmdbPickle.build,
    "perfile": PerFile.build,
    "memmap": Memmap.build,
    "diskcache": DiskCache.build,
}
