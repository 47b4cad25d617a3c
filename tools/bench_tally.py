"""``kvcache inspect`` and ``len(open_cache(path))`` with the stored tally against a walk of
every metadata row (what they did before the tally, and still do on a cache written
before it existed), measured in one run on one cache.

    .venv/bin/python tools/bench_tally.py              # 200,000 records
    .venv/bin/python tools/bench_tally.py --n 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import lmdb
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvcache import LmdbCachedDataset, open_cache  # noqa: E402
from kvcache.maintenance import inspect_cache  # noqa: E402
from kvcache.tally import TALLY_KEY  # noqa: E402


class Tiny(torch.utils.data.Dataset):
    """A small array and a label per index (the records are small: the walk is per row)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.full(4, i, dtype=np.int32), i % 10


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="kvtally-")
    path = os.path.join(root, "c")
    try:
        t = time.perf_counter()
        with LmdbCachedDataset(Tiny(a.n), path, write_batch=8192) as ds:
            ds.build()
        print(f"built {a.n:,} records in {time.perf_counter() - t:.1f} s")

        def length() -> int:
            with open_cache(path) as v:
                return len(v)

        rows = {}
        for label in ("tally", "walk"):
            if label == "walk":  # what a cache without the tally row gets
                env = lmdb.open(path, max_dbs=4, subdir=True)
                with env.begin(write=True, db=env.open_db(b"info")) as txn:
                    txn.delete(TALLY_KEY)
                env.close()
            assert length() == a.n and inspect_cache(path).current_entries == a.n
            rows[label] = (timed(lambda: inspect_cache(path), a.reps), timed(length, a.reps))
        print(f"\n| {a.n:,} records | inspect s | len(open_cache) s |\n|---|---|---|")
        for label, (ins, ln) in rows.items():
            print(f"| {label} | {ins:.4f} | {ln:.4f} |")
        w, s = rows["walk"], rows["tally"]
        print(f"\nwalk / tally: inspect {w[0] / s[0]:.0f}x, len {w[1] / s[1]:.0f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
