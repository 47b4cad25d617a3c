"""Build throughput: serial, worker processes, and torch.distributed ranks, in one run.

    python tools/bench_build.py [--n 3000] [--cost-ms 1.0] [--workers 1,2] [--ranks 1,2,4]
                                [--shards 2,4] [--repeat 1] [--json out.json]

The source spends ``--cost-ms`` of CPU time per item (a busy loop standing in for
decoding and augmenting) and returns CIFAR-sized samples (3 KiB). Every figure is a
fresh build of ``--n`` items into a new cache, printed in items/s and as a ratio to the
serial ``build()`` measured in the same run, with the machine's load average, because
on a shared machine only ratios measured together mean anything. ``ranks`` runs the
distributed build with N processes of a gloo process group on this machine
(``torch.multiprocessing`` spawning them; the spawn time is not counted: each rank
times the build between two barriers).

``CPU ms/item`` is the CPU time all processes of a build spent per item (the building
process and its waited-for workers; the ranks' own CPU between the barriers, summed):
it does not depend on the machine's load, and ``serial CPU / parallel CPU`` is the
efficiency the workers would reach with a core each (1.0: no overhead). ``--shards``
times the design kvcache did not take (a shard cache per rank, merged by rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvcache import LmdbCachedDataset  # noqa: E402


class Burn(torch.utils.data.Dataset):
    """``{'image': uint8[3,32,32], 'label': int}`` after ``cost`` seconds of CPU."""

    def __init__(self, n: int, cost: float) -> None:
        self.n, self.cost = n, cost

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        # CPU time, not wall time: on a shared machine a wall-clock loop would burn less
        # CPU the less of a core it gets, and hide exactly the contention measured here
        end = time.process_time() + self.cost
        while time.process_time() < end:
            pass
        rng = np.random.default_rng(i)
        return {"image": torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)),
                "label": int(rng.integers(10))}


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def source_alone(n: int, cost: float) -> tuple[float, float]:
    src = Burn(n, cost)
    c0, t0 = _cpu(), time.perf_counter()
    for i in range(n):
        src[i]
    return n / (time.perf_counter() - t0), (_cpu() - c0) / n


def workers_rate(path: str, n: int, cost: float, workers: int) -> tuple[float, float]:
    shutil.rmtree(path, ignore_errors=True)
    with LmdbCachedDataset(Burn(n, cost), path) as ds:
        c0 = _cpu()
        rep = ds.build(num_workers=workers)
        cpu = _cpu() - c0
    assert rep.computed == n, rep
    return rep.items_per_s, cpu / n


def _rank(rank: int, world: int, init: str, path: str, n: int, cost: float, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ds = LmdbCachedDataset(Burn(n, cost), path)
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        rep = ds.build(distributed=True)
        cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
        dist.barrier()
        dt = time.perf_counter() - t0
        dist.all_reduce(cpu)
        ds.close()
        if rank == 0:
            assert rep.computed == n, rep
            with open(out, "w") as f:
                json.dump({"seconds": dt, "rate": n / dt, "cpu_per_item": float(cpu[0]) / n}, f)
    finally:
        dist.destroy_process_group()


def _shard_rank(rank: int, world: int, init: str, path: str, n: int, cost: float, out: str) -> None:
    """The alternative to collectives, for comparison: each rank fills a shard cache of its
    share, then rank 0 merges the shards into ``path`` (``kvcache merge``)."""
    import torch.distributed as dist

    from kvcache.maintenance import merge

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shard = f"{path}.shard{rank}"
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        with LmdbCachedDataset(Burn(n, cost), shard) as ds:
            for i in range(rank, n, world):
                ds[i]
        dist.barrier()
        if rank == 0:
            rep = merge(path, [f"{path}.shard{r}" for r in range(world)])
            assert rep.entries == n, rep
        cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
        dist.barrier()
        dt = time.perf_counter() - t0
        dist.all_reduce(cpu)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"seconds": dt, "rate": n / dt, "cpu_per_item": float(cpu[0]) / n}, f)
    finally:
        dist.destroy_process_group()


def ranks_rate(work: str, n: int, cost: float, world: int, shards: bool = False) -> tuple[float, float]:
    import torch.multiprocessing as tmp

    path = os.path.join(work, f"r{world}{'s' if shards else ''}")
    shutil.rmtree(path, ignore_errors=True)
    init = f"file://{os.path.join(work, f'pg{world}-{time.time_ns()}')}"
    out = os.path.join(work, f"r{world}.json")
    tmp.spawn(_shard_rank if shards else _rank, args=(world, init, path, n, cost, out), nprocs=world,
              join=True)
    with open(out) as f:
        j = json.load(f)
    return j["rate"], j["cpu_per_item"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--cost-ms", type=float, default=1.0)
    ap.add_argument("--workers", default="1,2", help="worker counts (comma separated; '' for none)")
    ap.add_argument("--ranks", default="1,2,4", help="world sizes (comma separated; '' for none)")
    ap.add_argument("--shards", default="", help="world sizes for the shards+merge alternative")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs per figure")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    cost = a.cost_ms / 1000
    work = tempfile.mkdtemp(prefix="kvcache-bench-build-")
    rows: list[tuple[str, tuple[float, float]]] = []
    load0 = os.getloadavg()
    try:
        best = lambda f: max((f() for _ in range(a.repeat)), key=lambda x: x[0])  # noqa: E731
        rows.append(("source alone (no cache)", best(lambda: source_alone(a.n, cost))))
        rows.append(("build() serial", best(lambda: workers_rate(os.path.join(work, "s"), a.n, cost, 0))))
        for w in [int(x) for x in a.workers.split(",") if x]:
            rows.append((f"build(num_workers={w})",
                         best(lambda w=w: workers_rate(os.path.join(work, f"w{w}"), a.n, cost, w))))
        for r in [int(x) for x in a.ranks.split(",") if x]:
            rows.append((f"build(distributed=True), {r} rank(s)",
                         best(lambda r=r: ranks_rate(work, a.n, cost, r))))
        for r in [int(x) for x in a.shards.split(",") if x]:
            rows.append((f"shards + merge (not kvcache's way), {r} rank(s)",
                         best(lambda r=r: ranks_rate(work, a.n, cost, r, shards=True))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    serial, serial_cpu = rows[1][1]
    print(f"# {a.n} items, {a.cost_ms} ms CPU each, {os.cpu_count()} CPUs; load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after (1-min)")
    print(f"{'what':48} {'items/s':>8} {'x serial':>8} {'CPU ms/item':>11} {'CPU x serial':>12}")
    for name, (rate, cpu) in rows:
        print(f"{name:48} {rate:8,.0f} {rate / serial:8.2f} {cpu * 1e3:11.3f} {cpu / serial_cpu:12.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "cost_ms": a.cost_ms, "cpus": os.cpu_count(), "load": [load0, load1],
                       "rows": [{"what": k, "items_per_s": v, "x_serial": v / serial, "cpu_s_per_item": c,
                                 "cpu_x_serial": c / serial_cpu} for k, (v, c) in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
