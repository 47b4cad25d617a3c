"""kvcache against the raw LMDB floor and the usual caches, as ratios measured in one run.

    .venv/bin/python tools/bench.py            # short default (a few minutes on 2 cores)
    .venv/bin/python tools/bench.py --full     # the issue's sizes (W-small 50,000, W-ragged 20,000)
    .venv/bin/python tools/plot_bench.py       # bench_out/bench.json -> docs/img/bench.png

Every system is built from the same in-memory samples, checked against them (~200 random
items, dtype included), then timed interleaved, several repetitions; the table shows the
median, the median absolute deviation (mad%) and the ratio to the floor of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_systems as S  # noqa: E402

WORKLOADS = {  # name: (default N, --full N)
    "W-small": (20_000, 50_000),
    "W-large": (1_000, 1_000),
    "W-ragged": (10_000, 20_000),
}
KV = ("kvcache", "kvcache_lru", "kvcache_noverify")


def make_data(name: str, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if name == "W-small":
        return [(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), int(i % 10)) for i in range(n)]
    if name == "W-large":
        return [(rng.random((3, 224, 224), dtype=np.float32), int(i % 1000)) for i in range(n)]
    return [{"tokens": rng.integers(0, 50_000, int(rng.integers(16, 513)), dtype=np.int64),
             "label": int(i % 10)} for i in range(n)]


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def summary(xs: list[float]) -> dict:
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs)
    return {"median": med, "mad_pct": 100 * mad / med if med else 0.0, "min": min(xs), "max": max(xs),
            "n": len(xs), "samples": xs}


def build_all(name: str, data: list, root: str, peers: list[str]) -> tuple[dict, dict]:
    """Build every system; return (readers, build info)."""
    readers: dict[str, Any] = {}
    info: dict[str, dict] = {}
    os.makedirs(root, exist_ok=True)
    for sysname in ["floor", "lmdb_pickle", "perfile", "memmap", "kvcache", *peers]:
        path = os.path.join(root, sysname)
        t0 = time.perf_counter()
        try:
            if sysname == "kvcache":
                S.build_kvcache(path, data)
            else:
                readers[sysname] = S.BUILDERS[sysname](path, data)
        except ImportError as exc:
            print(f"  {sysname}: skipped ({exc})")
            continue
        os.sync()
        dt = time.perf_counter() - t0
        size, files = S.dir_bytes(path)
        info[sysname] = {"build_s": dt, "items_per_s": len(data) / dt, "disk_bytes": size, "files": files}
        print(f"  built {sysname:12s} {dt:7.2f} s  {size / 2**20:8.1f} MiB  {files} files", flush=True)
    fl = readers["floor"]
    readers["floor_txn"] = S.LmdbRaw(fl.path, fl.n, fl.ragged, fl.dtype.str, fl.shape, fl.labels, False)
    # the hash-then-copy limit: a txn per item (as kvcache's ds[i]), xxh3 of the value, one copy
    readers["floor_hash"] = S.LmdbRawHashed(fl.path, fl.n, fl.ragged, fl.dtype.str, fl.shape, fl.labels, False)
    readers["tiered"] = S.Tiered(readers["perfile"].path, len(data), readers["perfile"].ragged)
    readers["dict"] = S.InRam(data)
    kvp = os.path.join(root, "kvcache")
    readers["kvcache"] = S.open_kvcache(kvp, lru_bytes=0)
    readers["kvcache_lru"] = S.open_kvcache(kvp, lru_bytes=64 << 20)
    readers["kvcache_noverify"] = S.open_kvcache(kvp, lru_bytes=0, verify=False)
    for k in ("floor_txn", "floor_hash", "tiered", "dict", *KV[1:]):
        info[k] = {"disk_bytes": None, "files": None}
    return readers, info


def check(readers: dict, data: list, k: int = 200) -> None:
    idx = random.Random(1).sample(range(len(data)), min(k, len(data)))
    for name, r in readers.items():
        bad = [i for i in idx if not same(r[i], data[i])]
        if hasattr(r, "__getitems__") and not bad:
            bad = [i for i, v in zip(idx, r.__getitems__(idx)) if not same(v, data[i])]
        if bad:
            raise SystemExit(f"{name}: item {bad[0]} differs from the source: {r[bad[0]]!r:.200}")


def time_reads(readers: dict, order: list[int], reps: int, batch: bool) -> dict:
    """Warm random reads, interleaved across systems: µs per item (or per batched item)."""
    names = [n for n in readers if not batch or hasattr(readers[n], "__getitems__")]
    chunks = [order[i : i + 256] for i in range(0, len(order), 256)]
    res: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps + 1):  # the first round warms up and is dropped
        for n in names:
            r = readers[n]
            t0 = time.perf_counter()
            if batch:
                gi = r.__getitems__
                for c in chunks:
                    gi(c)
            else:
                for i in order:
                    r[i]
            if rep:
                res[n].append((time.perf_counter() - t0) / len(order) * 1e6)
    return {n: summary(v) for n, v in res.items()}


def collate_ragged(batch: list) -> dict:
    """Ragged tokens cannot be stacked: the batch keeps a list of them (same for all)."""
    import torch

    return {"tokens": [torch.from_numpy(b["tokens"]) for b in batch],
            "label": torch.tensor([b["label"] for b in batch])}


def time_loader(readers: dict, names: list[str], reps: int, ragged: bool) -> dict:
    import torch.utils.data as tud

    res: dict[str, list[float]] = {n: [] for n in names if n in readers}
    for _ in range(reps):
        for n in res:
            ds = readers[n]
            dl = tud.DataLoader(ds, batch_size=256, shuffle=True, num_workers=2,
                                collate_fn=collate_ragged if ragged else None)
            t0 = time.perf_counter()
            count = sum(len(b[1] if not isinstance(b, dict) else b["label"]) for b in dl)
            res[n].append(count / (time.perf_counter() - t0))
    return {n: summary(v) for n, v in res.items()}


def time_fill(data: list, root: str, reps: int, n: int, cost_us: float) -> dict:
    """First epoch through kvcache (filling) vs the uncached source, same random order.

    Also timed, for the context of the ratio: the open and the close (creating a cache
    and committing the last batch: a few fsyncs, whatever the epoch's length) and a raw
    LMDB bulk put of the same items (what storing them costs at the least)."""
    from kvcache import LmdbCachedDataset

    order = random.Random(2).sample(range(len(data)), min(n, len(data)))
    src = S.ListSource(data, cost_us)
    res: dict[str, list[float]] = {"source": [], "kvcache_fill": [], "kvcache_open_close": [],
                                   "raw_lmdb_put": []}
    for rep in range(reps):
        t0 = time.perf_counter()
        for i in order:
            src[i]
        res["source"].append(time.perf_counter() - t0)
        path = os.path.join(root, f"fill{rep}")
        t0 = time.perf_counter()
        with LmdbCachedDataset(src, path, fingerprint="fill") as ds:
            t1 = time.perf_counter()
            for i in order:
                ds[i]
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        res["kvcache_fill"].append(t3 - t0)
        res["kvcache_open_close"].append(t3 - t0 - (t2 - t1))
        shutil.rmtree(path)
        t0 = time.perf_counter()
        S.LmdbRaw.build(path, [data[i] for i in order])
        res["raw_lmdb_put"].append(time.perf_counter() - t0)
        shutil.rmtree(path)
    return {k: summary(v) for k, v in res.items()}


def time_build(data: list, root: str, reps: int) -> dict:
    """Build of a zero-cost source: kvcache ``build()`` vs raw LMDB bulk put (one txn)."""
    res: dict[str, list[float]] = {"raw_lmdb_put": [], "kvcache_build": []}
    for rep in range(reps):
        for k in res:
            path = os.path.join(root, f"build_{k}{rep}")
            t0 = time.perf_counter()
            S.LmdbRaw.build(path, data) if k == "raw_lmdb_put" else S.build_kvcache(path, data)
            res[k].append(len(data) / (time.perf_counter() - t0))
            shutil.rmtree(path)
    nbytes = sum(S.main_array(s)[0].nbytes for s in data)
    out = {k: summary(v) for k, v in res.items()}
    for v in out.values():
        v["mb_per_s"] = v["median"] * nbytes / len(data) / 1e6
    return out


def child_run(readers: dict, names: list[str], root: str, mode: str, k: int) -> dict:
    """Run each reader in a fresh process (strace -c -f or /proc RSS)."""
    out = {}
    for n in names:
        if n not in readers or n == "dict":
            continue
        pk = os.path.join(root, f"reader_{n}.pkl")
        with open(pk, "wb") as f:
            pickle.dump(readers[n], f)
        base = [sys.executable, os.path.abspath(__file__), "--child", mode, pk]
        if mode == "rss":
            r = subprocess.run(base + ["0"], capture_output=True, text=True, check=True)
            out[n] = json.loads(r.stdout.strip().splitlines()[-1])
            continue
        counts = []
        for kk in (0, k):
            trace = pk + f".{kk}.strace"
            subprocess.run(["strace", "-c", "-f", "-o", trace, *base, str(kk)], check=True,
                           capture_output=True)
            tot = [ln.split() for ln in open(trace) if ln.rstrip().endswith(" total")]
            counts.append(int(tot[-1][3]) if tot else 0)
        out[n] = {"per_read": max(0, counts[1] - counts[0]) / k}
    return out


def child_main(mode: str, pk: str, k: int) -> None:
    with open(pk, "rb") as f:
        r = pickle.load(f)
    order = list(range(len(r)))
    random.Random(3).shuffle(order)

    def status() -> dict:
        txt = open("/proc/self/status").read()
        return {f: int(re.search(rf"^{f}:\s+(\d+)", txt, re.M).group(1)) * 1024
                for f in ("VmRSS", "RssAnon", "RssFile")}

    if mode == "strace":
        for i in order[:50]:
            r[i]
        for i in order[50 : 50 + k]:
            r[i]
        return
    before = status()
    for i in order:
        r[i]
    after = status()
    print(json.dumps({"rss": after["VmRSS"], "anon": after["RssAnon"], "file": after["RssFile"],
                      "anon_growth": after["RssAnon"] - before["RssAnon"]}))


def run_workload(name: str, n: int, a: argparse.Namespace, root: str) -> dict:
    print(f"\n== {name}: N = {n}", flush=True)
    data = make_data(name, n)
    peers = [p for p in ("diskcache",) if p not in a.skip]
    readers, info = build_all(name, data, os.path.join(root, name), peers)
    check(readers, data)
    print("  all systems return the source's samples (200 random items, dtype included)")
    order = random.Random(0).sample(range(n), min(n, a.pass_items))
    res: dict[str, Any] = {"n": n, "systems": info}
    res["read_us"] = time_reads(readers, order, a.reps, batch=False)
    print("  reads timed", flush=True)
    res["getitems_us"] = time_reads(readers, order, a.reps, batch=True)
    dl = ["floor", "floor_txn", "floor_hash", "lmdb_pickle", "perfile", "memmap", "dict", *KV, *peers]
    if "loader" not in a.skip:
        res["loader_items_s"] = time_loader(readers, dl, a.loader_reps, name == "W-ragged")
        print("  DataLoader timed", flush=True)
    if "fill" not in a.skip:
        res["fill_s"] = time_fill(data, root, a.build_reps, a.fill_items, 200.0)
    if "build" not in a.skip:
        res["build_items_s"] = time_build(data, root, a.build_reps)
    if "strace" not in a.skip:
        if shutil.which("strace"):
            k = min(500 if name == "W-large" else 3000, n - 50)
            res["syscalls"] = child_run(readers, ["floor", "floor_txn", "lmdb_pickle", "perfile",
                                                  "memmap", *KV, *peers], root, "strace", k)
        else:
            print("  syscalls: skipped (strace not installed: apt-get install -y strace)")
    if name == "W-large" and "rss" not in a.skip:
        res["rss"] = child_run(readers, ["floor", "lmdb_pickle", "perfile", "tiered", "memmap", *KV,
                                         *peers], root, "rss", 0)
    for r in readers.values():
        if hasattr(r, "close"):
            r.close()
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the issue's sizes and more repetitions")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--skip", default="", help="comma list: loader,fill,build,strace,rss,diskcache")
    p.add_argument("--out", default="bench_out/bench.json")
    p.add_argument("--dir", default=None, help="where caches are built (default: a temp dir)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child_main(a.child[0], a.child[1], int(a.child[2]))
    a.skip = set(filter(None, a.skip.split(",")))
    a.reps, a.loader_reps, a.build_reps = (7, 5, 3) if a.full else (5, 3, 3)
    if os.environ.get("KVBENCH_SMOKE"):  # a seconds-long run of the whole harness
        WORKLOADS.update({k: (int(os.environ["KVBENCH_SMOKE"]),) * 2 for k in WORKLOADS})
        a.reps = a.loader_reps = a.build_reps = 1
    a.pass_items = 20_000 if a.full else 10_000
    a.fill_items = 10_000 if a.full else 5_000  # an epoch long enough that opening is not most of it
    root = tempfile.mkdtemp(prefix="kvbench-", dir=a.dir)
    import torch

    run = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "numpy": np.__version__,
                       "torch": torch.__version__, "processor": platform.processor()},
           "command": " ".join(sys.argv), "mode": "full" if a.full else "default",
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "workloads": {}}
    t0 = time.time()
    try:
        for w in a.workloads.split(","):
            run["workloads"][w] = run_workload(w, WORKLOADS[w][a.full], a, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    run["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(run, f, indent=1)
    from bench_report import print_report

    print_report(run)
    print(f"\nwrote {a.out} ({run['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
