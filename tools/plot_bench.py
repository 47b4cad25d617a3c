"""Bar chart of ``tools/bench.py``'s JSON: warm random ``ds[i]`` time as a multiple of the
floor, per workload (log scale), with the DataLoader ratio beside it.

    .venv/bin/python tools/plot_bench.py [bench_out/bench.json] [docs/img/bench.png]

Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import json
import sys

SYSTEMS = ["floor", "kvcache", "kvcache_noverify", "kvcache_lru", "memmap", "lmdb_pickle", "diskcache",
           "perfile", "tiered", "dict"]


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else "bench_out/bench.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "docs/img/bench.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.load(open(src))
    wl = list(run["workloads"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(wl)
    for ax, key, title, invert in (
        (axes[0], "read_us", "warm random ds[i]: time × floor (lower is better)", False),
        (axes[1], "loader_items_s", "DataLoader epoch: items/s × floor (higher is better)", True),
    ):
        names = [s for s in SYSTEMS if any(s in run["workloads"][w].get(key, {}) for w in wl)]
        for j, w in enumerate(wl):
            d = run["workloads"][w].get(key, {})
            if "floor" not in d:
                continue
            base = d["floor"]["median"]
            ys = [d[s]["median"] / base if s in d else 0 for s in names]
            xs = [i + (j - (len(wl) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, ys, width, label=f"{w} (N={run['workloads'][w]['n']})")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right")
        ax.set_title(title, fontsize=10)
        if not invert:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"kvcache bench ({run['mode']}, {run['started']}, {run['machine']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    import os

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
