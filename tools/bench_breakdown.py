"""Where a cached ``ds[i]`` spends its time, step by step, against the floor.

Each row adds one step of kvcache's read path to the one above it, timed over the same
random order (CPU time of this thread, median of the rounds, steps interleaved in each
round), so the differences between rows apportion the gap between the floor and
kvcache. Run::

    .venv/bin/python tools/bench_breakdown.py --workloads W-small,W-ragged --n 10000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time

import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B
import bench_systems as S


def steps(name: str, n: int, root: str) -> dict:
    from kvcache import codec
    from kvcache.plans import PLANS
    from kvcache.store import KEY

    data = B.make_data(name, n)
    fl = S.BUILDERS["floor"](os.path.join(root, "floor"), data)
    S.build_kvcache(os.path.join(root, "kv"), data)
    ds = S.open_kvcache(os.path.join(root, "kv"), lru_bytes=0)
    order = random.Random(3).sample(range(n), min(n, 10_000))
    for _ in range(3):  # every layout's plan compiled, every page touched once
        for i in order:
            ds[i]
            fl[i]
    e = ds._env
    env, db, key, fp = e.env, e.samples, KEY.pack, ds._fp_read
    fenv, fkey = fl._henv, KEY.pack
    head, xx, dec = struct.Struct("<QQII").unpack_from, xxhash.xxh3_64_intdigest, codec.decode
    dt = fl.dtype
    shape = fl.shape

    def floor() -> None:
        for i in order:
            fl[i]

    def floor_txn() -> None:  # the floor with a read txn per item (kvcache's invariant)
        for i in order:
            t = fenv.begin(buffers=True)
            a = np.frombuffer(t.get(fkey(i)), dt)
            if shape is not None:
                a = a.reshape(shape)
            a.copy()
            t.abort()

    def kv_get() -> None:  # kvcache's txn + get only
        for i in order:
            t = env.begin(db, None, False, True)
            t.get(key(i))
            t.abort()

    def kv_header() -> None:  # + header unpack and fingerprint check
        for i in order:
            t = env.begin(db, None, False, True)
            b = t.get(key(i))
            h = head(b, 0)
            _ = h[2] == fp
            t.abort()

    def kv_checksum() -> None:  # + xxh3 of the record (verify=True)
        for i in order:
            t = env.begin(db, None, False, True)
            b = t.get(key(i))
            h = head(b, 0)
            _ = xx(b[16:]) == h[1]
            t.abort()

    def kv_plan_lookup() -> None:  # + finding the plan by the layout bytes
        for i in order:
            t = env.begin(db, None, False, True)
            b = t.get(key(i))
            h = head(b, 0)
            _ = xx(b[16:]) == h[1]
            PLANS[b[24 : 24 + h[3]]]
            t.abort()

    def kv_decode() -> None:  # + running the plan: codec.decode complete
        for i in order:
            t = env.begin(db, None, False, True)
            dec(t.get(key(i)), True, fp)
            t.abort()

    def kv_getitem() -> None:  # the dataset's __getitem__ (stats, index checks, LRU off)
        for i in order:
            ds[i]

    fns = [floor, floor_txn, kv_get, kv_header, kv_checksum, kv_plan_lookup, kv_decode, kv_getitem]
    res: dict[str, list[float]] = {f.__name__: [] for f in fns}
    for rnd in range(8):
        for f in fns:
            t0 = time.thread_time()
            f()
            if rnd:
                res[f.__name__].append((time.thread_time() - t0) / len(order) * 1e6)
    return {k: statistics.median(v) for k, v in res.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="W-small,W-ragged")
    p.add_argument("--n", type=int, default=10_000)
    a = p.parse_args()
    for w in a.workloads.split(","):
        root = tempfile.mkdtemp(prefix="kvbreak-")
        try:
            m = steps(w, a.n if w != "W-large" else min(a.n, 1000), root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        f = m["floor"]
        print(f"\n{w} (N = {a.n}): step, CPU µs/item, × floor, + over the row above")
        prev = None
        for k, v in m.items():
            print(f"  {k:15s} {v:7.2f}  {v / f:5.2f}x  {'' if prev is None else f'{v - prev:+.2f}'}")
            prev = v


if __name__ == "__main__":
    main()
