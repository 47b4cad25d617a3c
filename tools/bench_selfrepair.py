"""How long self-repair takes on a large cache with one bad page, and that training goes on.

    .venv/bin/python tools/bench_selfrepair.py                 # 10^6 samples
    .venv/bin/python tools/bench_selfrepair.py --n 100000

A cache of ``--n`` small samples (a uint8[16] array and an int label) is written once. Then,
on copies of it, one 4 KiB page is zeroed, as one bad sector would:

* ``at open``: a leaf page in the middle of the samples tree; a training script opens the
  dataset with its source: the constructor repairs it (the salvage runs in a child under
  the writer lock), and the first reads follow;
* ``at open, overflow``: not applicable to these small records (no overflow pages);
  ``--big`` adds a run where every 1000th sample is 64 KiB and one overflow page is zeroed;
* ``while open``: the dataset is open and reading when a leaf page is zeroed under it; it
  meets the damage (an LMDB error or bad records), repairs in process and goes on.

Each run then reads 20,000 random indices in the same process, checking every sample against
the source: training resumes without a restart. Prints seconds and records kept.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kvcache  # noqa: E402
from kvcache import codec  # noqa: E402
from kvcache.store import Store  # noqa: E402

PSIZE = 4096


class Small:
    """``n`` samples: a uint8[16] array and the index (every ``big``-th one 64 KiB)."""

    def __init__(self, n: int, big: int = 0) -> None:
        self.n, self.big = n, big

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        size = 65536 if self.big and i % self.big == 0 else 16
        return (np.full(size, i % 251, np.uint8), i)


def fill(path: str, src: Small) -> None:
    with kvcache.LmdbCachedDataset(src, path) as ds:
        fp = ds.fingerprint_id
    with Store(path) as st:
        batch = []
        for i in range(len(src)):
            batch.append((i, *codec.encode_with_meta(src[i], fp, i)))
            if len(batch) == 20_000:
                st.write_records(batch, fp)
                batch.clear()
        if batch:
            st.write_records(batch, fp)


def pages_of(path: str) -> tuple[list[int], list[int]]:
    """(leaf pages, overflow first pages) of the samples tree, from a raw walk."""
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        buf = f.read()
    metas = [struct.unpack_from("<QQ", buf, p * PSIZE + 16 + 120) for p in (0, 1)]
    m = max((0, 1), key=lambda k: metas[k][1])
    leaves, runs = [], []

    def walk(pgno: int, db: str) -> None:
        b = pgno * PSIZE
        flags, lower = struct.unpack_from("<HH", buf, b + 10)
        if flags & 2 and db == "samples":
            leaves.append(pgno)
        for ptr in struct.unpack_from(f"<{(lower - 16) // 2}H", buf, b + 16):
            lo, hi, nfl, ks = struct.unpack_from("<HHHH", buf, b + ptr)
            if flags & 1:
                walk(lo | hi << 16 | nfl << 32, db)
            elif db == "main" and nfl & 2 and buf[b + ptr + 8:b + ptr + 8 + ks] == b"samples":
                walk(struct.unpack_from("<Q", buf, b + ptr + 8 + ks + 40)[0], "samples")
            elif db == "samples" and nfl & 1:
                runs.append(struct.unpack_from("<Q", buf, b + ptr + 8 + ks)[0])

    walk(struct.unpack_from("<Q", buf, m * PSIZE + 16 + 24 + 48 + 40)[0], "main")
    return leaves, runs


def zero(path: str, pgno: int) -> None:
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.seek(pgno * PSIZE)
        f.write(bytes(PSIZE))


def train(ds: kvcache.LmdbCachedDataset, src: Small, k: int, rng: random.Random) -> tuple[int, float]:
    """Read ``k`` random indices, checking each; return (wrong, seconds)."""
    t0 = time.perf_counter()
    wrong = 0
    for i in rng.sample(range(len(src)), k):
        x, j = ds[i]
        e = src[i]
        wrong += j != i or not np.array_equal(np.asarray(x), e[0])
    return wrong, time.perf_counter() - t0


def run(base: str, work: str, src: Small, case: str, k: int) -> dict:
    path = os.path.join(work, case.replace(" ", "_").replace(",", ""))
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    leaves, runs = pages_of(path)
    target = runs[len(runs) // 2] if "overflow" in case else leaves[len(leaves) // 2]
    rng = random.Random(0)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        if case == "while open":
            ds = kvcache.LmdbCachedDataset(src, path)
            train(ds, src, 1000, rng)
            zero(path, target)
            t0 = time.perf_counter()
            # read on until the damage is met and repaired (the dataset says so)
            while ds.self_repair is None and time.perf_counter() - t0 < 600:
                train(ds, src, 1000, rng)
            repair_s = time.perf_counter() - t0
        else:
            zero(path, target)
            t0 = time.perf_counter()
            ds = kvcache.LmdbCachedDataset(src, path)
            repair_s = time.perf_counter() - t0
        rep = ds.self_repair
        wrong, read_s = train(ds, src, k, rng)
        kept = len(ds.cached_indices())
        ds.close()
    shutil.rmtree(path, ignore_errors=True)
    return {"case": case, "page": target, "action": rep.action if rep else None,
            "repair_s": round(repair_s, 2), "inner_s": round(rep.seconds, 2) if rep else None,
            "kept": kept, "n": len(src), "wrong": wrong, "read_after": k,
            "us_per_read_after": round(1e6 * read_s / k, 1),
            "warnings": sum(issubclass(w.category, kvcache.KvCacheWarning) for w in ws)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--reads", type=int, default=20_000)
    p.add_argument("--big", action="store_true", help="also a run with overflow pages (every 1000th 64 KiB)")
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="kvselfrepair-", dir=a.dir)
    try:
        rows = []
        src = Small(a.n)
        base = os.path.join(root, "base")
        t0 = time.perf_counter()
        fill(base, src)
        mib = os.path.getsize(os.path.join(base, "data.mdb")) / 2**20
        print(f"built {a.n} samples ({mib:.1f} MiB) in {time.perf_counter() - t0:.1f}s", flush=True)
        for case in ("at open", "while open"):
            rows.append(run(base, root, src, case, a.reads))
            print(rows[-1], flush=True)
        if a.big:
            shutil.rmtree(base)
            src = Small(a.n, big=1000)
            fill(base, src)
            rows.append(run(base, root, src, "at open, overflow", a.reads))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}\n")
    print("| case | page zeroed | action | repair s (wall) | kept / samples | wrong | reads after (us/read) | warnings |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['page']} | {r['action']} | {r['repair_s']} | {r['kept']:,} / {r['n']:,} | "
              f"{r['wrong']} | {r['read_after']:,} ({r['us_per_read_after']}) | {r['warnings']} |")
    return 0 if all(r["wrong"] == 0 and r["action"] in ("salvaged", "patched") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
