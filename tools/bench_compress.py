"""Per-record compression side by side: data.mdb size and warm read cost, uncompressed
vs zstd vs lz4, on workloads that look like real data. Ratios are measured in one run.

    .venv/bin/python tools/bench_compress.py                 # all workloads (a few minutes)
    .venv/bin/python tools/bench_compress.py --workloads W-tokens,W-lowent --n 5000

Workloads (every one deterministic from its seed):
  W-small     bench.py's: uint8 3x32x32 uniform noise + int label (incompressible: stored raw)
  W-image     natural-looking uint8 3x64x64: smooth gradients and shapes, sensor noise sigma 3
  W-lowent    low-entropy uint8 3x64x64: the same scenes with sigma 0.5 noise and flat regions
              (renders, scans, masks, medical backgrounds)
  W-features  float32 [2048] post-ReLU features (about half zeros)
  W-tokens    bench.py's W-ragged: int64 token ids, 16..512 per sample, uniform over 50,000
  W-large     bench.py's: float32 3x224x224 uniform [0, 1)

Per workload and codec: data.mdb bytes (after a build), the ratio to the uncompressed
cache's, kvcache inspect's per-sample payload / stored / LMDB-page bytes, and warm random
reads (``ds[i]`` and ``__getitems__`` in batches of 256; median of the repetitions, the
codecs interleaved) as a ratio to the uncompressed cache read in the same loop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_systems as S  # noqa: E402

WORKLOADS = {"W-small": 20_000, "W-image": 5_000, "W-lowent": 5_000, "W-features": 10_000,
             "W-tokens": 10_000, "W-large": 600}
CODECS = [None, "zstd", "lz4"]


def _scene(rng: np.random.Generator, size: int, noise: float, flat: bool) -> np.ndarray:
    """A natural-looking image: low-frequency gradients, a few soft shapes, sensor noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    phase = rng.uniform(0, 2 * np.pi, (3, 4))
    base = rng.uniform(60, 190, 3)
    blobs = [(rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25), rng.uniform(-70, 70))
             for _ in range(3)]
    for c in range(3):
        f = phase[c]
        img = base[c] + 35 * np.sin(2 * np.pi * (x * np.cos(f[0]) + y * np.sin(f[0])) * 0.8 + f[1])
        img += 15 * np.sin(2 * np.pi * (x * np.sin(f[2]) - y * np.cos(f[2])) * 1.7 + f[3])
        for by, bx, r, amp in blobs:
            img += amp * np.exp(-(((x - bx) ** 2 + (y - by) ** 2) / (2 * r * r)))
        if flat:
            img = np.round(img / 8) * 8  # flat regions, as in renders, scans and masks
        out.append(img)
    a = np.stack(out) + rng.normal(0, noise, (3, size, size))
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def make_data(name: str, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if name == "W-small":
        return [(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), int(i % 10)) for i in range(n)]
    if name == "W-image":
        return [(_scene(rng, 64, 3.0, False), int(i % 10)) for i in range(n)]
    if name == "W-lowent":
        return [(_scene(rng, 64, 0.5, True), int(i % 10)) for i in range(n)]
    if name == "W-features":
        return [(np.maximum(rng.standard_normal(2048, dtype=np.float32), 0), int(i % 100)) for i in range(n)]
    if name == "W-tokens":
        return [{"tokens": rng.integers(0, 50_000, int(rng.integers(16, 513)), dtype=np.int64),
                 "label": int(i % 10)} for i in range(n)]
    if name == "W-large":
        return [(rng.random((3, 224, 224), dtype=np.float32), int(i % 1000)) for i in range(n)]
    raise SystemExit(f"unknown workload {name}")


def build(path: str, data: list, comp: str | None) -> float:
    from kvcache import LmdbCachedDataset

    t0 = time.perf_counter()
    with LmdbCachedDataset(S.ListSource(data), path, fingerprint="bench", compression=comp) as ds:
        ds.build()
    return len(data) / (time.perf_counter() - t0)


def time_reads(readers: dict, order: list[int], reps: int) -> dict:
    chunks = [order[i:i + 256] for i in range(0, len(order), 256)]
    res: dict[str, dict[str, list[float]]] = {k: {"item": [], "batch": []} for k in readers}
    for rep in range(reps + 1):  # the first round warms up and is dropped
        for k, ds in readers.items():
            t0 = time.perf_counter()
            for i in order:
                ds[i]
            t1 = time.perf_counter()
            gi = ds.__getitems__
            for c in chunks:
                gi(c)
            t2 = time.perf_counter()
            if rep:
                res[k]["item"].append((t1 - t0) / len(order) * 1e6)
                res[k]["batch"].append((t2 - t1) / len(order) * 1e6)
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}


def run(name: str, n: int, reps: int, root: str) -> dict:
    from kvcache import LmdbCachedDataset
    from kvcache.maintenance import inspect_cache

    data = make_data(name, n)
    out: dict[str, Any] = {"n": n, "codecs": {}}
    readers = {}
    for comp in CODECS:
        key = comp or "none"
        path = os.path.join(root, f"{name}-{key}")
        rate = build(path, data, comp)
        rep = inspect_cache(path)
        out["codecs"][key] = {"build_items_s": rate, "data_mdb": os.path.getsize(os.path.join(path, "data.mdb")),
                              "payload": rep.payload_bytes, "stored": rep.stored_bytes, "pages": rep.page_bytes,
                              "record_ratio": rep.ratio, "compressed_records": sum(rep.compression.values()),
                              "sampled": rep.sampled_records}
        ds = LmdbCachedDataset(None, path)
        for i in random.Random(1).sample(range(n), min(n, 200)):  # every codec returns the source's samples
            if not S_same(ds[i], data[i]):
                raise SystemExit(f"{name} {key}: item {i} differs from the source")
        readers[key] = ds
    order = random.Random(0).sample(range(n), min(n, 10_000 if name != "W-large" else n))
    times = time_reads(readers, order, reps)
    for key, t in times.items():
        c = out["codecs"][key]
        c.update(read_us=t["item"], getitems_us=t["batch"])
    base = out["codecs"]["none"]
    for c in out["codecs"].values():
        c["size_ratio"] = base["data_mdb"] / c["data_mdb"]
        c["read_x"] = c["read_us"] / base["read_us"]
        c["getitems_x"] = c["getitems_us"] / base["getitems_us"]
    for ds in readers.values():
        ds.close()
    return out


def S_same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(S_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(S_same(a[k], b[k]) for k in a)
    return a == b


def _kib(x: float) -> str:
    return f"{x / 1024:.1f}"


def report(res: dict) -> None:
    print(f"\nload average before/after: {res['load_before']} / {res['load_after']}")
    print("| workload | codec | data.mdb MiB | × smaller | records compressed | payload / stored / pages KiB per sample "
          "| build items/s | ds[i] µs | × none | __getitems__ µs/item | × none |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, w in res["workloads"].items():
        for key, c in w["codecs"].items():
            print(f"| {name} | {key} | {c['data_mdb'] / 2**20:.1f} | {c['size_ratio']:.2f} | "
                  f"{c['compressed_records']}/{c['sampled']} | {_kib(c['payload'])} / {_kib(c['stored'])} / "
                  f"{_kib(c['pages'])} | {c['build_items_s']:,.0f} | {c['read_us']:.2f} | {c['read_x']:.2f} | "
                  f"{c['getitems_us']:.2f} | {c['getitems_x']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--n", type=int, default=None, help="samples per workload (default: per workload)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="bench_out/compress.json")
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="kvcompress-", dir=a.dir)
    res: dict[str, Any] = {"command": " ".join(sys.argv), "load_before": os.getloadavg(), "workloads": {}}
    try:
        for name in a.workloads.split(","):
            n = a.n or WORKLOADS[name]
            print(f"== {name}: N = {n}", flush=True)
            res["workloads"][name] = run(name, min(n, WORKLOADS[name]) if name == "W-large" else n, a.reps, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    res["load_before"] = " ".join(f"{x:.1f}" for x in res["load_before"])
    res["load_after"] = " ".join(f"{x:.1f}" for x in res["load_after"])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    report(res)


if __name__ == "__main__":
    main()
