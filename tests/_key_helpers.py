"""Sources and rank functions for the keyed-cache tests (importable by spawned workers).

A :class:`Folder` is what a folder dataset looks like to kvcache: a list of file names,
each sample a deterministic function of its name (so a reordered or appended folder gives
the same sample for the same name), its key the name. Every computation is logged, per
process, under ``log_dir``, so tests count source calls across DataLoader workers and
build workers of any start method.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset


def sample_of(name: str):
    """The sample of file ``name``: ``(uint8 tensor [3, 4, 4], int label, name)``."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=g), seed % 10, name


class Folder(Dataset):
    """A folder of ``names``; ``key(i)`` is the name (and a ``stamp`` per name, like an
    mtime, when given)."""

    def __init__(self, names, log_dir: str | None = None, stamps: dict | None = None) -> None:
        self.names = list(names)
        self.log_dir = None if log_dir is None else str(log_dir)
        self.stamps = dict(stamps or {})

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        name = self.names[i]
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, f"calls.{os.getpid()}"), "a") as f:
                f.write(f"{name}\n")
        return sample_of(name + str(self.stamps.get(name, "")))

    def expected(self, i: int):
        """What ``self[i]`` returns, without logging a call."""
        return sample_of(self.names[i] + str(self.stamps.get(self.names[i], "")))

    def key(self, i: int) -> str:
        name = self.names[i]
        return f"{name}@{self.stamps[name]}" if name in self.stamps else name


def calls(log_dir) -> dict[str, int]:
    """How often each name was computed, over every process that logged to ``log_dir``."""
    out: dict[str, int] = {}
    for fn in os.listdir(log_dir):
        if fn.startswith("calls."):
            with open(os.path.join(log_dir, fn)) as f:
                for line in f:
                    out[line.strip()] = out.get(line.strip(), 0) + 1
    return out


def names(n: int, start: int = 0) -> list[str]:
    return [f"img/{i:05d}.png" for i in range(start, start + n)]


def bytes_key(ds: Folder, i: int) -> bytes:
    """A bytes key: the sha1 of the name (a content hash stands in)."""
    return hashlib.sha1(ds.names[i].encode()).digest()


def build_rank(rank: int, world: int, init: str, path: str, source: Folder, out: str) -> None:
    """One rank of a keyed distributed build (gloo)."""
    from kvcache import LmdbCachedDataset

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with LmdbCachedDataset(source, path, key=source.key) as ds:
            rep = ds.build(distributed=True)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"computed": rep.computed, "already": rep.already_cached, "total": rep.total}, f)
    finally:
        dist.destroy_process_group()


def folder() -> Folder:
    """``kvcache build`` spec: ``KVKEY_N`` names (default 40)."""
    return Folder(names(int(os.environ.get("KVKEY_N", "40"))))


def fewer() -> Folder:
    """The same folder with every fourth name removed, in reverse order."""
    return Folder([n for k, n in enumerate(reversed(names(int(os.environ.get("KVKEY_N", "40"))))) if k % 4])


def name_key():
    """A ``module:callable`` key spec: returns a key function by index (the names of ``folder()``)."""
    ns = folder().names
    return ns.__getitem__
