"""Staging a published cache to node-local disk, through a simulated network filesystem.

    python tools/bench_stage.py [--mib 1024] [--latency-us 200] [--bandwidth-mbps 1250]
                                [--streams 1,4,8] [--chunk-mib 8] [--reps 2] [--json out.json]

A published cache of ``--mib`` MiB (records of 256 KiB) sits on local disk under the
directory ``tools/netsim.py`` serves (``--latency-us`` per round trip, and a shared link of
``--bandwidth-mbps`` where this netsim has one). Measured, in one run, interleaved:

* ``dd bs=4M`` of its ``data.mdb`` through the mount, to ``/dev/null`` and to a file on the
  local disk with ``conv=fsync`` (what a copy by hand costs: the baseline);
* ``kvcache.stage(published, local_dir)`` into a fresh ``local_dir`` with each
  ``--streams`` x ``--chunk-mib`` (requests in flight x request size), verification included;
* a reuse (``stage`` again: a stat), and a pass of random reads through
  ``LmdbCachedDataset(None, published, stage=local_dir)``: filesystem operations on the mount
  during it (0 expected), µs per item against the same cache read from local disk directly.

Prints a table and ratios (stage time / dd time); times on a shared machine are noisy:
the load average is printed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netsim  # noqa: E402

import kvcache  # noqa: E402

import kvcache.copyfile  # noqa: E402

STAGE_MOD = sys.modules["kvcache.stage"]  # the module (``kvcache.stage`` is the function)
RECORD = 256 << 10  # --record-kib


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.random.default_rng(i).integers(0, 256, RECORD, dtype=np.uint8)


def build_published(work: str, dest: str, mib: int) -> None:
    n = mib * (1 << 20) // RECORD
    local = os.path.join(work, "build")
    with kvcache.LmdbCachedDataset(Blobs(n), local, fingerprint="bench-stage") as ds:
        ds.build()
    kvcache.publish(local, dest)
    shutil.rmtree(local)


def dd(src: str, dest: str) -> float:
    args = ["dd", f"if={src}", f"of={dest}", "bs=4M", "status=none"]
    if dest != "/dev/null":
        args.append("conv=fsync")
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    dt = time.perf_counter() - t0
    if dest != "/dev/null":
        os.unlink(dest)
    return dt


def timed_stage(pub: str, local: str, streams: int, chunk: int) -> float:
    kvcache.copyfile.STREAMS, kvcache.copyfile.CHUNK = streams, chunk
    shutil.rmtree(local, ignore_errors=True)
    t0 = time.perf_counter()
    rep, _ = STAGE_MOD.stage_report(pub, local)
    dt = time.perf_counter() - t0
    assert rep.copied and not rep.in_place, rep
    return dt


def epochs(path: str, epochs: int, **kw) -> list[float]:
    """µs per item of each DataLoader epoch (2 persistent workers, batch 256, shuffled)."""
    out = []
    with kvcache.LmdbCachedDataset(None, path, **kw) as ds:
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=2, shuffle=True,
                                             persistent_workers=True)
        for _ in range(epochs):
            t0 = time.perf_counter()
            for _batch in loader:
                pass
            out.append((time.perf_counter() - t0) / len(ds) * 1e6)
    return out


def read_pass(path: str, n: int, k: int, **kw) -> float:
    with kvcache.LmdbCachedDataset(None, path, **kw) as ds:
        order = random.Random(1).sample(range(n), min(k, n))
        ds[order[0]]
        t0 = time.perf_counter()
        for i in order:
            ds[i]
        return (time.perf_counter() - t0) / len(order) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--latency-us", type=float, default=200.0)
    ap.add_argument("--bandwidth-mbps", type=float, default=1250.0)
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--chunk-mib", default="8")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--record-kib", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="DataLoader epochs, staged and local (0: none)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--local-root", default=None,
                    help="where the staged copies go (default: under --work; /dev/shm leaves the local disk out)")
    ap.add_argument("--json")
    a = ap.parse_args()
    global RECORD
    RECORD = a.record_kib << 10
    why = netsim.unavailable()
    if why:
        sys.exit(f"bench_stage: no FUSE here: {why}")
    work = tempfile.mkdtemp(prefix="bench-stage-", dir=a.work)
    backing, mount = os.path.join(work, "back"), os.path.join(work, "mnt")
    os.makedirs(backing)
    t0 = time.perf_counter()
    build_published(work, os.path.join(backing, "pub"), a.mib)
    print(f"built and published {a.mib} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
    kw = {"latency_us": a.latency_us}
    if "bandwidth_mbps" in inspect.signature(netsim.NetSim.__init__).parameters:
        kw["bandwidth_mbps"] = a.bandwidth_mbps
    else:
        print("this netsim has no --bandwidth-mbps: latency only", flush=True)
    res: dict = {"mib": a.mib, "latency_us": a.latency_us, "netsim": kw, "load": os.getloadavg(),
                 "dd_null": [], "dd_file": [], "stage": {}}
    local = os.path.join(tempfile.mkdtemp(prefix="bench-stage-node-", dir=a.local_root) if a.local_root else work,
                         "node")
    pub = os.path.join(mount, "pub")
    size = os.path.getsize(os.path.join(backing, "pub", "data.mdb"))
    configs = [(int(s), int(float(c) * (1 << 20))) for s in a.streams.split(",") for c in a.chunk_mib.split(",")]
    with netsim.NetSim(backing, mount, **kw) as fs:
        for rep in range(a.reps):
            res["dd_null"].append(dd(os.path.join(pub, "data.mdb"), "/dev/null"))
            res["dd_file"].append(dd(os.path.join(pub, "data.mdb"), os.path.join(work, "ddcopy")))
            for streams, chunk in configs:
                key = f"{streams}x{chunk >> 20}MiB"
                res["stage"].setdefault(key, []).append(timed_stage(pub, local, streams, chunk))
            print(f"rep {rep}: dd {res['dd_null'][-1]:.2f} s (to a file {res['dd_file'][-1]:.2f} s), stage "
                  + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res["stage"].items()), flush=True)
        before = fs.counts()
        t0 = time.perf_counter()
        STAGE_MOD.stage_report(pub, local)
        res["reuse_s"] = time.perf_counter() - t0
        res["reuse_ops"] = netsim.delta(fs.counts(), before)
        n = len(kvcache.open_cache(os.path.join(backing, "pub")))
        before = fs.counts()
        res["staged_us"] = read_pass(pub, n, 2000, stage=local)
        res["staged_pass_ops"] = netsim.delta(fs.counts(), before)
        if a.epochs:
            before = fs.counts()
            res["staged_epochs_us"] = epochs(pub, a.epochs, stage=local)
            res["staged_epochs_ops"] = netsim.delta(fs.counts(), before)
            res["local_epochs_us"] = epochs(os.path.join(backing, "pub"), a.epochs)
    res["local_us"] = read_pass(os.path.join(backing, "pub"), n, 2000)
    res["staged_us_2"] = read_pass(os.path.join(local, STAGE_MOD.entry_id(pub)), n, 2000)
    res["load_after"] = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    if a.local_root:
        shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    gbps = size / 1e9
    best_dd = min(res["dd_file"])
    print(f"\n{size / (1 << 20):,.0f} MiB data.mdb, netsim {kw}; load {res['load'][0]:.1f} -> {res['load_after'][0]:.1f}")
    print("| what | best s | GB/s | x dd to a file |\n|---|---:|---:|---:|")
    print(f"| dd bs=4M to /dev/null | {min(res['dd_null']):.2f} | {gbps / min(res['dd_null']):.2f} | "
          f"{min(res['dd_null']) / best_dd:.2f} |")
    print(f"| dd bs=4M to local disk, conv=fsync | {best_dd:.2f} | {gbps / best_dd:.2f} | 1.00 |")
    for k, v in res["stage"].items():
        print(f"| kvcache.stage, {k} in flight | {min(v):.2f} | {gbps / min(v):.2f} | {min(v) / best_dd:.2f} |")
    print(f"reuse (stage again): {res['reuse_s'] * 1e3:.2f} ms, ops on the mount {res['reuse_ops']}")
    print(f"random reads after staging: {res['staged_us']:.1f} µs/item, ops on the mount {res['staged_pass_ops']}; "
          f"the same cache on local disk {res['local_us']:.1f} µs/item (staged again: {res['staged_us_2']:.1f})")
    if a.epochs:
        st, lo = res["staged_epochs_us"], res["local_epochs_us"]
        print(f"DataLoader epochs (2 persistent workers, batch 256), µs/item: staged {', '.join(f'{x:.1f}' for x in st)} "
              f"(ops on the mount {res['staged_epochs_ops']}); the published file on local disk "
              f"{', '.join(f'{x:.1f}' for x in lo)}; last epoch staged/local {st[-1] / lo[-1]:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
