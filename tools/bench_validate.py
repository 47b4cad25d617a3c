"""What structural validation (kvcache.structure) costs at open, at 10^4 to 10^6 records.

    .venv/bin/python tools/bench_validate.py                  # 10^4, 10^5, 10^6 small records
    .venv/bin/python tools/bench_validate.py --sizes 10000,100000

For each size a cache of small records (a uint8[16] array and an int label, ~100 bytes a
record) is written, then timed, median of a few runs, in this process:

* ``walk``: ``structure.validate`` (every page of every tree read with pread and checked);
  what the first open of a file version pays;
* ``stamped``: ``structure.validated`` when the stamp matches (a stat and a small read):
  what every later open pays;
* ``open``: ``open_cache(path)`` of the stamped cache, end to end, for scale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kvcache  # noqa: E402
from kvcache import codec, structure  # noqa: E402
from kvcache.store import Store  # noqa: E402


def fill(path: str, n: int) -> None:
    with kvcache.LmdbCachedDataset([(np.zeros(16, np.uint8), 0)], path) as ds:  # the fingerprint
        ds[0]
        fp = ds._fp_id
    with Store(path) as st:
        batch = []
        for i in range(n):
            batch.append((i, *codec.encode_with_meta((np.full(16, i % 251, np.uint8), i), fp, i)))
            if len(batch) == 20_000:
                st.write_records(batch, fp)
                batch.clear()
        if batch:
            st.write_records(batch, fp)


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="kvval-")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'records':>9} {'data.mdb MiB':>12} {'walk s':>8} {'walk us/rec':>11} {'stamped ms':>10} {'open ms':>8}")
    try:
        for n in map(int, a.sizes.split(",")):
            path = os.path.join(root, f"c{n}")
            fill(path, n)
            mib = os.path.getsize(os.path.join(path, "data.mdb")) / 2**20
            walk = timed(lambda: structure.validate(path), a.reps)
            structure.remember(path, structure.validated(path))
            stamped = timed(lambda: structure.validated(path), max(a.reps, 20))

            def open_close() -> None:
                kvcache.open_cache(path).close()

            op = timed(open_close, max(a.reps, 10))
            print(f"{n:>9} {mib:>12.1f} {walk:>8.3f} {walk / n * 1e6:>11.2f} {stamped * 1e3:>10.3f} {op * 1e3:>8.2f}",
                  flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
