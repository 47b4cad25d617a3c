"""How a cache behaves as it grows: 10^4 and 10^5 samples (``--full``: 10^6; ``--big``: 10^7).

    python tools/bench_scale.py [--sizes 10000,100000] [--full] [--big] [--sample small|3k]
                                [--workers 2] [--map-size BYTES] [--open-only] [--root DIR]
                                [--reads 100000] [--json bench_out/scale.json]
                                [--plot docs/img/scale.png] [--keep] [--from-json FILE]

Samples are ``small`` (an int64[8] tensor and an int label, ~0.2 KiB records: the case
where a cache holds the most records per byte) or ``3k`` (a 3 KiB uint8 array). At each
size, on one cache built by ``LmdbCachedDataset.build(num_workers=--workers)``:

* build items/s (a source that costs next to nothing: this is the writer's rate);
* the FIRST open after the build, next to later ones: whether the structural stamp
  matched the file right after the build; ``LmdbCachedDataset(None, path)`` + ``len``
  in a fresh process (what the next training run pays: timed inside it, imports
  excluded), then in the building process after its ``close()``; the whole-file walks
  each made (``kvcache.structure.walks()``); later opens are the best of three;
* warm random ``ds[i]`` in µs per item, and the raw LMDB floor on the same environment
  (one ``get`` in a read transaction per item, ``np.frombuffer``, one copy): the same
  random order, alternating blocks of 5,000 reads, medians and the median ratio;
* open: ``LmdbCachedDataset(None, path)`` + ``len`` (no source), with the source
  (fingerprint resolved), ``open_cache`` + ``len``; ``cached_indices()``; a spot check
  of 10 samples (what ``spot_check=10`` adds to opening);
* ``kvcache inspect`` and ``kvcache verify`` (the library calls the commands run);
* bytes on disk per sample (``data.mdb``'s allocated blocks) and the samples B-tree depth.

``--map-size`` starts the map that small (it doubles on demand: 1 MiB grows ~9 times
by 10^5 small samples), so a short run shows what a long build past the 1 GiB default
map does. ``--open-only`` skips the O(n) parts (reads, ``cached_indices``, verify): what ``--big``
needs to finish in minutes. Read cost should be nearly flat (one more B-tree level per
~100x); open, inspect, ``len`` and spot checks should not grow with the cache, the first
open included; ``cached_indices`` and verify are O(n) by nature. ``uptime``'s load is
printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvcache import LmdbCachedDataset, open_cache, structure  # noqa: E402
from kvcache.integrity import spot_check  # noqa: E402
from kvcache.maintenance import inspect_cache, verify  # noqa: E402
from kvcache.store import KEY  # noqa: E402

SAMPLE_BYTES = 3072
_BASE = np.random.default_rng(0).integers(0, 256, SAMPLE_BYTES + 4096, dtype=np.uint8)


class Small(torch.utils.data.Dataset):
    """3 KiB uint8 arrays, cheap to make (a slice of one random block), distinct per index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        o = i % 4096
        a = _BASE[o:o + SAMPLE_BYTES].copy()
        a[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
        return a


class Tiny(torch.utils.data.Dataset):
    """``(int64[8] tensor, int label)``: the issue's small samples (~0.2 KiB records)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.arange(i, i + 8, dtype=torch.int64), i % 1000


SOURCES = {"3k": Small, "small": Tiny}

FRESH_OPEN = r"""
import json, sys, time
from kvcache import LmdbCachedDataset, structure
path = sys.argv[1]
t0 = time.perf_counter()
with LmdbCachedDataset(None, path) as d:
    n = len(d)
t1 = time.perf_counter()
print(json.dumps({"ms": (t1 - t0) * 1e3, "walks": structure.walks(), "n": n}))
"""


def stamp_on_disk(path: str) -> bool:
    """Whether ``kvcache.valid`` names ``data.mdb`` as it is (what a fresh process checks;
    this process's in-memory stamp does not count)."""
    try:
        with open(os.path.join(path, structure.STAMP_NAME)) as f:
            return json.load(f)["identity"] == list(structure.identity(path))
    except (OSError, ValueError, KeyError):
        return False


def first_opens(path: str, n: int) -> dict:
    """Right after the build (the builder closed): the stamp, the first open in a fresh
    process (what the next training run pays), then a reopen in the building process
    (what the issue timed; it walks only if the fresh process did not stamp), and the
    whole-file walks each made."""
    r: dict[str, Any] = {"stamp_after_build": stamp_on_disk(path)}
    out = subprocess.run([sys.executable, "-c", FRESH_OPEN, path], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["n"] == n, got
    r["fresh_open_ms"], r["fresh_open_walks"] = got["ms"], got["walks"]
    w0 = structure.walks()
    t0 = time.perf_counter()
    with LmdbCachedDataset(None, path) as d:
        assert len(d) == n
    r["first_open_ms"] = (time.perf_counter() - t0) * 1e3
    r["first_open_walks"] = structure.walks() - w0
    return r


def best(fn: Callable[[], Any], reps: int = 3) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def time_reads(path: str, n: int, order: list[int], block: int = 5000) -> tuple[float, float, float]:
    """(ds[i] µs, floor µs, median ratio) per item: the same random order read by the
    dataset and by raw LMDB through the same environment, alternating blocks of
    ``block`` reads (so a change in the machine's load hits both), after a warm pass."""
    key = KEY.pack
    ds = LmdbCachedDataset(None, path)
    for i in order:  # warm: page cache and plans
        ds[i]
    e = ds.store.handle()
    env, db = e.env, e.samples
    with env.begin(db=db, buffers=True) as t:
        off = len(t.get(key(0))) - SAMPLE_BYTES  # the array's bytes end the record
    frombuffer, u8 = np.frombuffer, np.uint8
    ds_t, fl_t = [], []
    for k in range(0, len(order), block):
        part = order[k:k + block]
        t0 = time.perf_counter()
        for i in part:
            ds[i]
        t1 = time.perf_counter()
        for i in part:
            with env.begin(db=db, buffers=True) as t:
                frombuffer(t.get(key(i)), u8, SAMPLE_BYTES, off).copy()
        t2 = time.perf_counter()
        ds_t.append((t1 - t0) / len(part) * 1e6)
        fl_t.append((t2 - t1) / len(part) * 1e6)
    ds.close()
    return statistics.median(ds_t), statistics.median(fl_t), statistics.median(
        d / f for d, f in zip(ds_t, fl_t))


def one_size(root: str, n: int, reads: int, keep: bool, sample: str = "small", workers: int = 2,
             open_only: bool = False, map_size: int | None = None) -> dict:
    path = os.path.join(root, f"n{n}")
    shutil.rmtree(path, ignore_errors=True)
    source = SOURCES[sample]
    r: dict[str, Any] = {"n": n}
    with LmdbCachedDataset(source(n), path, map_size=map_size) as ds:
        rep = ds.build(num_workers=workers)
    assert rep.computed == n, rep
    r["build_items_s"] = rep.items_per_s
    r.update(first_opens(path, n))  # before anything else opens it
    data = os.path.join(path, "data.mdb")
    st = os.stat(data)
    r["data_mb"] = st.st_size / 1e6
    r["disk_bytes_per_sample"] = st.st_blocks * 512 / n
    r["file_bytes_per_sample"] = st.st_size / n
    with open_cache(path) as v:
        e = v.store.handle()
        with e.env.begin() as txn:
            r["depth"] = txn.stat(e.samples)["depth"]

    def open_none() -> None:
        with LmdbCachedDataset(None, path) as d:
            assert len(d) == n

    def open_src() -> None:
        with LmdbCachedDataset(source(n), path) as d:
            assert len(d) == n

    def open_view() -> None:
        with open_cache(path) as v:
            assert len(v) == n

    r["open_none_ms"] = best(open_none) * 1e3
    r["open_source_ms"] = best(open_src) * 1e3
    r["open_cache_ms"] = best(open_view) * 1e3
    with LmdbCachedDataset(source(n), path) as d:  # what spot_check=10 adds to opening
        rep10 = spot_check(d, 10)
        assert rep10.checked == 10 and rep10.ok
        r["spot_check_10_ms"] = best(lambda: spot_check(d, 10)) * 1e3
    r["inspect_ms"] = best(lambda: inspect_cache(path)) * 1e3
    if not open_only:
        with LmdbCachedDataset(source(n), path) as d:
            r["cached_indices_s"] = best(lambda: d.cached_indices(), 2)
            assert len(d.cached_indices()) == n
        t0 = time.perf_counter()
        ver = verify(path)
        r["verify_s"] = time.perf_counter() - t0
        assert ver.ok and ver.checked == n, ver
        if sample == "3k":
            rng = random.Random(n)
            order = [rng.randrange(n) for _ in range(reads)]
            r["read_us"], r["floor_us"], r["read_ratio"] = time_reads(path, n, order)
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    return r


COLUMNS = [  # (key, header, format)
    ("n", "samples", "{:,}"),
    ("build_items_s", "build items/s", "{:,.0f}"),
    ("data_mb", "data.mdb MB", "{:,.1f}"),
    ("read_us", "ds[i] µs", "{:.2f}"),
    ("floor_us", "floor µs", "{:.2f}"),
    ("read_ratio", "x floor", "{:.2f}"),
    ("open_none_ms", "open, no source ms", "{:.1f}"),
    ("open_source_ms", "open, source ms", "{:.1f}"),
    ("open_cache_ms", "open_cache+len ms", "{:.1f}"),
    ("spot_check_10_ms", "spot check 10 ms", "{:.1f}"),
    ("inspect_ms", "inspect ms", "{:.1f}"),
    ("cached_indices_s", "cached_indices() s", "{:.3f}"),
    ("verify_s", "verify s", "{:.2f}"),
    ("disk_bytes_per_sample", "disk B/sample", "{:,.0f}"),
    ("depth", "depth", "{}"),
]

FIRST_OPEN = [  # the first open after a build, next to later ones
    ("n", "samples", "{:,}"),
    ("data_mb", "data.mdb MB", "{:,.1f}"),
    ("build_items_s", "build items/s", "{:,.0f}"),
    ("stamp_after_build", "stamp matches after build", "{}"),
    ("fresh_open_ms", "1st open (fresh process) ms", "{:.1f}"),
    ("fresh_open_walks", "walks", "{}"),
    ("first_open_ms", "then reopen in the builder ms", "{:.1f}"),
    ("first_open_walks", "walks", "{}"),
    ("open_none_ms", "later opens ms (best of 3)", "{:.1f}"),
]


def table(rows: list[dict], columns: list = COLUMNS) -> str:
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    out = ["| " + " | ".join(h for _k, h, _f in cols) + " |",
           "|" + "|".join("---:" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(f.format(r[k]) if k in r else "" for k, _h, f in cols) + " |")
    return "\n".join(out)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any("read_us" not in r for r in rows):
        raise SystemExit("--plot draws read costs: run with --sample 3k and without --open-only")
    ns = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ns, [r["read_us"] for r in rows], "o-", label="ds[i] (warm, random)")
    a.plot(ns, [r["floor_us"] for r in rows], "s--", label="raw LMDB floor")
    a.set_xscale("log")
    a.set_ylim(bottom=0)
    a.set_xlabel("samples in the cache (3 KiB each)")
    a.set_ylabel("µs per item")
    a.legend()
    a.set_title("read cost")
    for key, label in [("open_source_ms", "open (with source)"), ("open_none_ms", "open (no source)"),
                       ("inspect_ms", "kvcache inspect"), ("spot_check_10_ms", "spot check of 10"),
                       ("cached_indices_s", "cached_indices() (returns n items)")]:
        scale = 1000 if key.endswith("_s") else 1
        b.plot(ns, [r[key] * scale for r in rows], "o-", label=label)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("samples in the cache")
    b.set_ylabel("ms")
    b.legend(fontsize=7)
    b.set_title("per-cache costs")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--full", action="store_true", help="add 10^6 (minutes on a busy 2-core machine)")
    ap.add_argument("--big", action="store_true",
                    help="add 10^7 (small samples: ~4.4 GB of disk; 3k: ~40 GB)")
    ap.add_argument("--sample", choices=sorted(SOURCES), default="small",
                    help="small: int64[8] + label (the default); 3k: a 3 KiB uint8 array")
    ap.add_argument("--workers", type=int, default=2, help="build(num_workers=...) (0: serial)")
    ap.add_argument("--map-size", type=int, help="the initial map size in bytes (it grows on demand)")
    ap.add_argument("--open-only", action="store_true",
                    help="skip the O(n) measurements (reads, cached_indices, verify)")
    ap.add_argument("--root", help="where to build the caches (default: a temporary directory)")
    ap.add_argument("--reads", type=int, default=100_000, help="random reads per round (3k samples)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write a PNG here (needs matplotlib: the bench extra)")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    ap.add_argument("--from-json", help="only redraw --plot from an earlier --json")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            plot(json.load(f)["rows"], a.plot)
        return
    sizes = [int(float(x)) for x in a.sizes.split(",") if x]
    sizes += [m for m, on in ((1_000_000, a.full), (10_000_000, a.big)) if on and m not in sizes]
    root = a.root or tempfile.mkdtemp(prefix="kvcache-scale-")
    os.makedirs(root, exist_ok=True)
    rows = []
    load0 = os.getloadavg()
    try:
        for n in sizes:
            t0 = time.perf_counter()
            rows.append(one_size(root, n, a.reads, a.keep, a.sample, a.workers, a.open_only, a.map_size))
            print(f"[{time.perf_counter() - t0:6.1f}s] n={n:,} done; load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr, flush=True)
    finally:
        if not a.keep and not a.root:
            shutil.rmtree(root, ignore_errors=True)
    load1 = os.getloadavg()
    what = "int64[8] + label" if a.sample == "small" else f"{SAMPLE_BYTES} B uint8"
    grow = f", map_size={a.map_size}" if a.map_size else ""
    head = (f"{what} samples, build(num_workers={a.workers}{grow}); {os.cpu_count()} CPUs, "
            f"load average {load0[0]:.2f} before, {load1[0]:.2f} after (1-min)")
    print(head)
    print("\nThe first open after a build, next to later opens:\n")
    print(table(rows, FIRST_OPEN))
    print("\nEverything measured:\n")
    print(table(rows))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=2)
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
