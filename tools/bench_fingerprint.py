"""What the default fingerprint costs: hashing a source's attributes, and opening with a source.

    .venv/bin/python tools/bench_fingerprint.py [--n 1000000] [--opens 20]

Prints, for a source holding ``n`` file paths (a list of str, and torchvision's list of
``(path, label)`` tuples): the time of ``compute_parts`` (the whole default fingerprint) and
of a plain ``sum(range(10**7))`` as a baseline for this machine's speed right now; then the
median time to open an existing 200-item cache with its (unchanged) source and close it,
and whether that open committed a write transaction. Run it with ``PYTHONPATH`` pointing at
another checkout to compare (the attribute hash is skipped where that code has none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import lmdb
import torch
from torch.utils.data import Dataset

import kvcache
from kvcache import LmdbCachedDataset
from kvcache.fingerprint import compute_parts


class Folder(Dataset):
    def __init__(self, files, samples=None):
        self.files = files
        self.samples = samples

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8), i


def _t(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10**6)
    ap.add_argument("--opens", type=int, default=20)
    args = ap.parse_args()
    print(f"kvcache from {os.path.dirname(kvcache.__file__)}; load average {os.getloadavg()[0]:.1f}")
    base = _t(lambda: sum(range(10**7)))
    print(f"baseline sum(range(10**7)):               {base * 1e3:8.1f} ms")
    paths = [f"/data/imagenet/train/n{i % 1000:08d}/img_{i:07d}.JPEG" for i in range(args.n)]
    samples = [(p, i % 1000) for i, p in enumerate(paths)]
    for name, src in ((f"{args.n:,} paths (list of str)", Folder(paths)),
                      (f"{args.n:,} (path, label) tuples + the paths", Folder(paths, samples))):
        t = _t(lambda: compute_parts(src, None, None))
        print(f"compute_parts, {name}: {t * 1e3:8.1f} ms ({t / base:.2f}x the baseline)")
    work = tempfile.mkdtemp(prefix="kvcache-fp-")
    path = os.path.join(work, "c")
    small = [f"img{i}.png" for i in range(200)]
    with LmdbCachedDataset(Folder(small), path) as ds:
        ds.build()
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    txn0 = env.info()["last_txnid"]
    env.close()
    times = []
    for _ in range(args.opens):
        src = Folder(small)
        t0 = time.perf_counter()
        LmdbCachedDataset(src, path).close()
        times.append(time.perf_counter() - t0)
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    commits = env.info()["last_txnid"] - txn0
    env.close()
    print(f"open with an unchanged source + close: median {statistics.median(times) * 1e3:.2f} ms, "
          f"min {min(times) * 1e3:.2f} ms over {args.opens} opens; write transactions committed: {commits}")


if __name__ == "__main__":
    main()
