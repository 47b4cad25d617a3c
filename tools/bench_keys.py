"""Warm reads of a keyed cache (``key=``) against an index-keyed one, measured in one run.

    .venv/bin/python tools/bench_keys.py               # W-small, 20,000 items, 7 reps
    .venv/bin/python tools/bench_keys.py --n 50000 --reps 9 --json bench_out/keys.json

Both caches hold the same CIFAR-sized samples (uint8 3x32x32 + an int label); the keyed
one's key function returns the item's file name from a list (``f"train/{i:06d}.png"``),
what a folder dataset would return. Timed interleaved (index, keyed, index, ...), each
pass over the same random permutation: ``ds[i]`` per item and ``__getitems__`` in
batches of 256; plus the key function alone and kvcache's key step (the function, the
UTF-8 encode and the xxh3-128 digest). Prints medians in µs per item and the ratio
keyed / index-keyed of each pass pair, with the load average (a shared 2-core machine:
only ratios within one run mean anything).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvcache import LmdbCachedDataset  # noqa: E402


class Folder:
    """A folder-like source: samples in memory, keyed by file name."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.items = [(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), i % 10) for i in range(n)]
        self.names = [f"train/{i:06d}.png" for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def key(self, i: int) -> str:
        return self.names[i]


def per_item(fn, order) -> float:
    t0 = time.perf_counter()
    fn(order)
    return (time.perf_counter() - t0) / len(order) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    src = Folder(args.n)
    tmp = tempfile.mkdtemp(prefix="kvcache-bench-keys-")
    plain = LmdbCachedDataset(src, os.path.join(tmp, "index"))
    keyed = LmdbCachedDataset(src, os.path.join(tmp, "keyed"), key=src.key)
    for ds in (plain, keyed):  # filled by reading (the same path for both)
        for i in range(args.n):
            ds[i]
        ds.flush()
    order = list(range(args.n))
    random.Random(1).shuffle(order)
    for ds in (plain, keyed):  # warm: every page in the page cache, plans compiled
        ds.flush()
        before = ds.stats().misses
        for i in order:
            ds[i]
        assert ds.stats().misses == before

    def getitem(ds):
        return lambda o: [ds[i] for i in o]

    def getitems(ds):
        return lambda o: [ds.__getitems__(o[k:k + 256]) for k in range(0, len(o), 256)]

    kf = src.key
    step = keyed.storage_key
    rows: dict[str, list[float]] = {k: [] for k in ("index ds[i]", "keyed ds[i]", "index getitems",
                                                    "keyed getitems", "key fn alone", "key step")}
    ratios: dict[str, list[float]] = {"ds[i]": [], "getitems": []}
    load0 = os.getloadavg()
    for _ in range(args.reps):
        a = per_item(getitem(plain), order)
        b = per_item(getitem(keyed), order)
        c = per_item(getitems(plain), order)
        d = per_item(getitems(keyed), order)
        rows["index ds[i]"].append(a)
        rows["keyed ds[i]"].append(b)
        rows["index getitems"].append(c)
        rows["keyed getitems"].append(d)
        ratios["ds[i]"].append(b / a)
        ratios["getitems"].append(d / c)
        rows["key fn alone"].append(per_item(lambda o: [kf(i) for i in o], order))
        rows["key step"].append(per_item(lambda o: [step(i) for i in o], order))
    load1 = os.getloadavg()
    print(f"W-small, n={args.n}, {args.reps} reps interleaved; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'what':<18} {'median µs/item':>15} {'min':>8} {'max':>8}")
    for k, xs in rows.items():
        print(f"{k:<18} {statistics.median(xs):>15.3f} {min(xs):>8.3f} {max(xs):>8.3f}")
    for k, xs in ratios.items():
        print(f"keyed / index {k:<10} median {statistics.median(xs):.3f}  (pairs: "
              f"{', '.join(f'{x:.2f}' for x in xs)})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "reps": args.reps, "load": [load0, load1], "rows": rows,
                       "ratios": ratios}, f, indent=1)
    plain.close()
    keyed.close()


if __name__ == "__main__":
    main()
