"""Rank functions for the distributed build tests (importable by spawned ranks)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from helpers import ImageSource


class DiesOnRank(ImageSource):
    """ImageSource that kills its own process (SIGKILL, no cleanup) on rank ``victim`` at
    index ``at``; ``delay`` seconds per item make the build last long enough to commit."""

    # how it fails, not what it yields: a rerun with DiesOnRank(n) is the same source
    kvcache_fingerprint_exclude = ("victim", "at", "delay")

    def __init__(self, n: int, victim: int = -1, at: int = -1, delay: float = 0.0) -> None:
        super().__init__(n)
        self.victim, self.at, self.delay = victim, at, delay

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        if i == self.at and dist.is_initialized() and dist.get_rank() == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def build_rank(rank: int, world: int, init: str, path: str, source: torch.utils.data.Dataset,
               out: str, num_workers: int = 0, round_seconds: float | None = None) -> None:
    """One rank: construct the dataset on ``path`` and build it with the others
    (``round_seconds=0``: a round after every chunk, so the last one often happens
    inside a rank's last ``add``)."""
    import kvcache.distributed
    from kvcache import LmdbCachedDataset

    if round_seconds is not None:
        kvcache.distributed.ROUND_SECONDS = round_seconds

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with LmdbCachedDataset(source, path) as ds:
            seen: list[tuple[int, int]] = []
            rep = ds.build(distributed=True, num_workers=num_workers,
                           progress=lambda d, t: seen.append((d, t)))
        # the build left every rank at the same collective: the next ones match up
        total = torch.tensor([rank + 1], dtype=torch.int64)
        dist.all_reduce(total)
        names: list = [None] * world
        dist.all_gather_object(names, f"rank{rank}")
        in_step = int(total[0]) == world * (world + 1) // 2 and names == [f"rank{r}" for r in range(world)]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"computed": rep.computed, "already": rep.already_cached, "total": rep.total,
                       "ranks": rep.ranks, "rank": rep.rank, "progress": seen[-1:] and list(seen[-1]),
                       "updates": len(seen), "in_step": in_step}, f)
    finally:
        dist.destroy_process_group()
