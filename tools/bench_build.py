"""Build throughput: serial, worker processes, and torch.distributed ranks, in one run.

    python tools/bench_build.py [--n 3000] [--cost-ms 1.0] [--workers 1,2] [--ranks 1,2,4]
                                [--repeat 1] [--json out.json]

The source spends ``--cost-ms`` of CPU time per item (a busy loop standing in for
decoding and augmenting) and returns CIFAR-sized samples (3 KiB). Every figure is a
fresh build of ``--n`` items into a new cache, printed in items/s and as a ratio to the
serial ``build()`` measured in the same run, with the machine's load average, because
on a shared machine only ratios measured together mean anything. ``ranks`` runs the
distributed build with N processes of a gloo process group on this machine
(``torch.multiprocessing`` spawning them; the spawn time is not counted: each rank
times the build between two barriers).
"""

from __future__ import annotations

import argparse
import json
import os
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


def source_alone(n: int, cost: float) -> float:
    src = Burn(n, cost)
    t0 = time.perf_counter()
    for i in range(n):
        src[i]
    return n / (time.perf_counter() - t0)


def workers_rate(path: str, n: int, cost: float, workers: int) -> float:
    shutil.rmtree(path, ignore_errors=True)
    with LmdbCachedDataset(Burn(n, cost), path) as ds:
        rep = ds.build(num_workers=workers)
    assert rep.computed == n, rep
    return rep.items_per_s


def _rank(rank: int, world: int, init: str, path: str, n: int, cost: float, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ds = LmdbCachedDataset(Burn(n, cost), path)
        dist.barrier()
        t0 = time.perf_counter()
        rep = ds.build(distributed=True)
        dist.barrier()
        dt = time.perf_counter() - t0
        ds.close()
        if rank == 0:
            assert rep.computed == n, rep
            with open(out, "w") as f:
                json.dump({"seconds": dt, "rate": n / dt}, f)
    finally:
        dist.destroy_process_group()


def ranks_rate(work: str, n: int, cost: float, world: int) -> float:
    import torch.multiprocessing as tmp

    path = os.path.join(work, f"r{world}")
    shutil.rmtree(path, ignore_errors=True)
    init = f"file://{os.path.join(work, f'pg{world}-{time.time_ns()}')}"
    out = os.path.join(work, f"r{world}.json")
    tmp.spawn(_rank, args=(world, init, path, n, cost, out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)["rate"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--cost-ms", type=float, default=1.0)
    ap.add_argument("--workers", default="1,2", help="worker counts (comma separated; '' for none)")
    ap.add_argument("--ranks", default="1,2,4", help="world sizes (comma separated; '' for none)")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs per figure")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    cost = a.cost_ms / 1000
    work = tempfile.mkdtemp(prefix="kvcache-bench-build-")
    rows: list[tuple[str, float]] = []
    load0 = os.getloadavg()
    try:
        best = lambda f: max(f() for _ in range(a.repeat))  # noqa: E731
        rows.append(("source alone (no cache)", best(lambda: source_alone(a.n, cost))))
        rows.append(("build() serial", best(lambda: workers_rate(os.path.join(work, "s"), a.n, cost, 0))))
        for w in [int(x) for x in a.workers.split(",") if x]:
            rows.append((f"build(num_workers={w})",
                         best(lambda w=w: workers_rate(os.path.join(work, f"w{w}"), a.n, cost, w))))
        for r in [int(x) for x in a.ranks.split(",") if x]:
            rows.append((f"build(distributed=True), {r} rank(s)",
                         best(lambda r=r: ranks_rate(work, a.n, cost, r))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    serial = rows[1][1]
    print(f"# {a.n} items, ~{a.cost_ms} ms CPU each, {os.cpu_count()} CPUs; load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after (1-min)")
    print(f"{'what':42} {'items/s':>9} {'x serial':>9}")
    for name, rate in rows:
        print(f"{name:42} {rate:9,.0f} {rate / serial:9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "cost_ms": a.cost_ms, "cpus": os.cpu_count(), "load": [load0, load1],
                       "rows": [{"what": k, "items_per_s": v, "x_serial": v / serial} for k, v in rows]},
                      f, indent=2)


if __name__ == "__main__":
    main()
