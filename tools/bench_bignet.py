"""The larger-than-memory network benchmark (``tools/bench_network.py --big`` runs this).

    python tools/bench_bignet.py --root /work/bigdata [--n 600000] [--items 20000]
        [--latency-us 200] [--bandwidth-mbps 1250] [--memory-mb 1200] [--epochs 2]
        [--rows per-file,lmdb+pickle,kvcache,kvcache-staged,kvcache-local]
        [--workload cifar|lowent] [--json out.json] [--plot docs/img/network_big.png]

A cache of ``--n`` CIFAR-sized items (uint8[3,32,32] + int label; 600,000 make a 2.35 GiB
``data.mdb``), published with ``kvcache publish``, is read through ``tools/netsim.py``
(``--latency-us`` per round trip, a ``--bandwidth-mbps`` link) by a DataLoader (batch 256,
2 workers, shuffled) over ``--items`` random indices, the way the issue measured it. The
reading processes run in a memory cgroup of ``--memory-mb`` (as root; elsewhere they run
unlimited and the table says so), so the file does not fit in their page cache.

Rows (each in a fresh process tree; ``--rows`` picks):

* ``per-file``: one ``.npy`` + ``.label`` file per item (only the ``--items`` read are
  written: a per-file cache costs the same round trips per item whatever its count);
* ``lmdb+pickle``: the folder2lmdb recipe on the same items (``lock=False, readahead=False``);
* ``kvcache``: the published cache, ``LmdbCachedDataset(source, published)``, defaults;
* ``kvcache-staged``: ``kvcache.stage(published, local_dir)`` (timed: "stage s"), then the
  epochs on ``LmdbCachedDataset(source, published, stage=local_dir)`` (needs
  ``kvcache.stage``; skipped, with a note, where this kvcache has none);
* ``kvcache-local``: the same published file read from local disk, in the same cgroup;
* ``kvcache-zstd`` / ``kvcache-zstd-local``: the published cache published again with
  ``compression="zstd"``, through the mount / from local disk. ``--workload lowent`` (smooth
  uint8 3x64x64 scenes, 12 KiB records that zstd stores about 2x smaller; kept apart under
  ``--root``/back-lowent) runs kvcache, its zstd copy and both on local disk by default.

``--root`` keeps what takes minutes to make (the caches, the per-file tree) and reuses it.
Reported per row: µs per item of the first and the fastest later epoch (from the
DataLoader's first batch request to its last batch, workers' opening included), filesystem
round trips per item, and round trips of wall time per item (wall time / latency / items:
what overlapping saves). Machine noise: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import netsim  # noqa: E402
from bench_network import Cifarish, LmdbPickle, PerFile  # noqa: E402

ROWS = ["per-file", "lmdb+pickle", "kvcache", "kvcache-staged", "kvcache-local"]
ZSTD_ROWS = ["kvcache-zstd", "kvcache-zstd-local"]  # the same published cache compressed (zstd)


class Lowent(torch.utils.data.Dataset):
    """``(uint8 tensor [3,64,64], int label)``: bench_compress.py's W-lowent scenes (smooth,
    flat regions, sigma 0.5 noise; zstd stores them about 2x smaller), one per index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        from bench_compress import _scene

        rng = np.random.default_rng(i)
        return torch.from_numpy(_scene(rng, 64, 0.5, True)), i % 10


SOURCES = {"cifar": Cifarish, "lowent": Lowent}
# the source's code may change; the cache stays valid
FINGERPRINT = {"cifar": "bench-cifarish", "lowent": "bench-lowent"}
LABEL = {"per-file": "per-file .npy + label", "lmdb+pickle": "LMDB + pickle",
         "kvcache": "kvcache published (default)", "kvcache-staged": "kvcache staged (stage=)",
         "kvcache-local": "kvcache published, local disk",
         "kvcache-zstd": "kvcache published, zstd", "kvcache-zstd-local": "kvcache published, zstd, local disk"}


def indices(n: int, items: int) -> list[int]:
    return sorted(random.Random(16).sample(range(n), items))


# --------------------------------------------------------------------------- building (once)


def back_dir(root: str, workload: str) -> str:
    return os.path.join(root, "back" if workload == "cifar" else f"back-{workload}")


def build(root: str, n: int, items: int, rows: list[str], workload: str = "cifar") -> None:
    """Make what ``rows`` need and is missing under :func:`back_dir`: the published cache
    (and its zstd copy), LMDB + pickle of all ``n`` items, and the per-file tree of the
    items read."""
    import lmdb

    import kvcache

    back = back_dir(root, workload)
    os.makedirs(back, exist_ok=True)
    src = SOURCES[workload](n)
    pub = os.path.join(back, "kvcache")
    local = os.path.join(root, f"kvcache-local-{workload}")
    if not os.path.exists(pub):
        t = time.perf_counter()
        with kvcache.LmdbCachedDataset(src, local, fingerprint=FINGERPRINT[workload]) as ds:
            ds.build(progress=True, num_workers=2 if workload != "cifar" else 0)
        kvcache.publish(local, pub, progress=True)
        print(f"built and published {n:,} items in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    zpub = os.path.join(back, "kvcache-zstd")
    if set(rows) & set(ZSTD_ROWS) and not os.path.exists(zpub):
        t = time.perf_counter()
        kvcache.publish(pub, zpub, progress=True, compression="zstd")
        print(f"published a zstd copy in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    shutil.rmtree(local, ignore_errors=True)
    if not set(rows) & {"lmdb+pickle", "per-file"}:
        return
    lp = os.path.join(back, "lmdb+pickle")
    if not os.path.exists(lp):
        env = lmdb.open(lp, map_size=max(1 << 30, n * 8192))
        for s in range(0, n, 20000):
            with env.begin(write=True) as txn:
                for i in range(s, min(n, s + 20000)):
                    img, label = src[i]
                    txn.put(str(i).encode(), pickle.dumps((img.numpy(), label), protocol=pickle.HIGHEST_PROTOCOL))
        env.close()
        os.unlink(os.path.join(lp, "lock.mdb"))
    pf = os.path.join(back, f"per-file-{n}-{items}")
    if not os.path.exists(pf):
        tmp = pf + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for i in indices(n, items):
            img, label = src[i]
            np.save(os.path.join(tmp, f"{i}.npy"), img.numpy())
            with open(os.path.join(tmp, f"{i}.label"), "w") as f:
                f.write(str(label))
        os.rename(tmp, pf)


# --------------------------------------------------------------------------- the child


def _counts(control: str | None) -> dict[str, int]:
    if not control:
        return {}
    fs = netsim.NetSim.__new__(netsim.NetSim)
    fs.control = control
    return fs.counts()


def child(kind: str, path: str, n: int, items: int, epochs: int, control: str | None, stage_dir: str | None,
          workload: str = "cifar") -> dict:
    import kvcache

    res: dict[str, Any] = {}
    c0, t0 = _counts(control), time.perf_counter()
    if kind == "per-file":
        ds: Any = PerFile(path, n)
    elif kind == "lmdb+pickle":
        ds = LmdbPickle(path, n)
    elif kind == "kvcache-staged":
        t = time.perf_counter()
        local = kvcache.stage(path, stage_dir)  # type: ignore[attr-defined]
        res["stage_s"] = time.perf_counter() - t
        res["stage_ops"] = netsim.ops_total(netsim.delta(_counts(control), c0))
        res["staged_path"] = local
        ds = kvcache.LmdbCachedDataset(SOURCES[workload](n), path, fingerprint=FINGERPRINT[workload],
                                       stage=stage_dir)
    else:
        ds = kvcache.LmdbCachedDataset(SOURCES[workload](n), path, fingerprint=FINGERPRINT[workload])
    res["open_s"] = time.perf_counter() - t0
    sub = torch.utils.data.Subset(ds, indices(n, items))
    dl = torch.utils.data.DataLoader(sub, batch_size=256, shuffle=True, num_workers=2,
                                     multiprocessing_context="fork", persistent_workers=False)
    res["epochs"] = []
    for _e in range(epochs):
        c0, t0 = _counts(control), time.perf_counter()
        seen = sum(len(b[1]) for b in dl)
        t1 = time.perf_counter()
        assert seen == items, seen
        d = netsim.delta(_counts(control), c0)
        res["epochs"].append({"s": t1 - t0, "ops": netsim.ops_total(d), "bytes": d.get("read_bytes", 0),
                              "max_inflight": d.get("max_inflight")})
    return res


def _evict(path: str) -> None:
    """Drop ``path``'s files from the page cache (``posix_fadvise(DONTNEED)``), so a row on
    local disk starts cold like the others."""
    for d, _, files in os.walk(path):
        for f in files:
            try:
                fd = os.open(os.path.join(d, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_row(kind: str, path: str, a: argparse.Namespace, control: str | None, stage_dir: str | None) -> dict:
    with netsim.MemoryLimit(int(a.memory_mb * (1 << 20))) as cg:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                            json.dumps([kind, path, a.n, a.items, a.epochs, control, stage_dir, a.workload])],
                           capture_output=True, text=True, check=False, preexec_fn=cg.enter,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        peak = cg.peak_bytes()
        limited = cg.active
        why = cg.why
    if p.returncode:
        return {"kind": kind, "error": p.stderr[-1500:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(kind=kind, memory_limited=limited, memory_note=None if limited else why, peak_bytes=peak)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help="where the caches are kept and reused (required)")
    ap.add_argument("--n", type=int, default=600_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--latency-us", type=float, default=200.0)
    ap.add_argument("--bandwidth-mbps", type=float, default=1250.0, help="MB/s of the simulated link")
    ap.add_argument("--memory-mb", type=float, default=1200.0, help="memory cgroup of the readers (root)")
    ap.add_argument("--rows", default=None, help=f"default: {','.join(ROWS)}; with --workload lowent: "
                    f"kvcache,{','.join(ZSTD_ROWS)},kvcache-local")
    ap.add_argument("--workload", choices=sorted(SOURCES), default="cifar",
                    help="cifar: uint8 3x32x32 noise (3 KiB records); lowent: smooth uint8 3x64x64 scenes "
                         "(12 KiB records that zstd stores about 2x smaller), for the compressed rows")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--plot", help="write a PNG bar chart here")
    ap.add_argument("--from-json", help="print the table (and --plot) of an earlier --json")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(*json.loads(a.child))))
        return
    if a.from_json:
        with open(a.from_json) as f:
            res = json.load(f)
        print(table(res))
        if a.plot:
            plot(res, a.plot)
        return
    if not a.root:
        ap.error("--root DIR is required (the caches take minutes to build and are kept there)")
    why = netsim.unavailable()
    if why:
        sys.exit(f"bench_bignet: no FUSE here ({why})")
    import kvcache

    root = os.path.abspath(a.root)
    if a.rows is None:
        a.rows = ",".join(ROWS) if a.workload == "cifar" else ",".join(["kvcache", *ZSTD_ROWS, "kvcache-local"])
    rows = [r for r in a.rows.split(",") if r]
    build(root, a.n, a.items, rows, a.workload)
    back, mnt = back_dir(root, a.workload), os.path.join(root, "mnt")
    stage_dir = os.path.join(root, "stage")
    res: dict[str, Any] = {"workload": a.workload, "n": a.n, "items": a.items, "latency_us": a.latency_us, "bandwidth_mbps": a.bandwidth_mbps,
                           "memory_mb": a.memory_mb, "epochs": a.epochs, "load_before": os.getloadavg(),
                           "bytes": os.path.getsize(os.path.join(back, "kvcache", "data.mdb")), "rows": []}
    if os.path.exists(os.path.join(back, "kvcache-zstd")):
        res["zstd_bytes"] = os.path.getsize(os.path.join(back, "kvcache-zstd", "data.mdb"))
    where = {"per-file": f"per-file-{a.n}-{a.items}", "lmdb+pickle": "lmdb+pickle", "kvcache": "kvcache",
             "kvcache-staged": "kvcache", "kvcache-zstd": "kvcache-zstd"}
    with netsim.NetSim(back, mnt, latency_us=a.latency_us, bandwidth_mbps=a.bandwidth_mbps) as fs:
        for kind in rows:
            if kind == "kvcache-staged" and not hasattr(kvcache, "stage"):
                res["rows"].append({"kind": kind, "error": "this kvcache has no kvcache.stage"})
                continue
            if kind.endswith("-local"):
                path, control = os.path.join(back, where[kind[:-len("-local")]]), None
                _evict(path)
            else:
                path, control = os.path.join(mnt, where[kind]), fs.control
            if kind == "kvcache-staged":
                shutil.rmtree(stage_dir, ignore_errors=True)
            r = run_row(kind, path, a, control, stage_dir)
            res["rows"].append(r)
            print(f"  {kind}: {json.dumps(r)[:400]}", file=sys.stderr, flush=True)
        if "kvcache-staged" in rows:  # the reference for staging: dd bs=4M of the same file, last
            # (it fills the mount's page cache, which the next open of the file must drop)
            t = time.perf_counter()
            subprocess.run(["dd", f"if={os.path.join(mnt, 'kvcache', 'data.mdb')}", "of=/dev/null", "bs=4M"],
                           capture_output=True, check=True)
            res["dd_s"] = time.perf_counter() - t
    shutil.rmtree(stage_dir, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        plot(res, a.plot)


def table(res: dict) -> str:
    lat = res["latency_us"]
    lines = [f"{res['items']:,} random items of {res['n']:,} ({res['bytes'] / 2**30:.2f} GiB data.mdb), DataLoader "
             f"batch 256, 2 workers, shuffled; netsim {lat:,.0f} µs per round trip, {res['bandwidth_mbps']:,.0f} MB/s "
             f"link; readers in a {res['memory_mb']:,.0f} MiB memory cgroup; load average "
             f"{res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after"]
    if "zstd_bytes" in res:
        lines[0] += (f"; workload {res.get('workload', 'cifar')}, the zstd copy's data.mdb "
                     f"{res['zstd_bytes'] / 2**30:.2f} GiB ({res['bytes'] / res['zstd_bytes']:.2f}x smaller)")
    base = next((r for r in res["rows"] if r["kind"] == "per-file" and "epochs" in r), None) \
        or next((r for r in res["rows"] if r["kind"] == "kvcache" and "epochs" in r), None)
    base_name = "per-file" if base is None or base["kind"] == "per-file" else "kvcache"
    lines += ["", "| cache | stage s | first epoch µs/item | later epoch µs/item | round trips/item | "
              f"round trips of wall time/item | x {base_name} (first) |", "|---|---:|---:|---:|---:|---:|---:|"]
    per_file = base
    for r in res["rows"]:
        if "epochs" not in r:
            lines.append(f"| {LABEL[r['kind']]} | - | not run: {r.get('error', '?')[:80]} | | | | |")
            continue
        ep = r["epochs"]
        us = [e["s"] * 1e6 / res["items"] for e in ep]
        ops = ep[0]["ops"] / res["items"]
        wall_rt = us[0] / lat
        x = f"{per_file['epochs'][0]['s'] / ep[0]['s']:.1f}x" if per_file else "-"
        note = "" if r.get("memory_limited") else " (no memory limit)"
        stage = f"{r['stage_s']:.1f}" if "stage_s" in r else "-"
        later = f"{min(us[1:]):,.0f}" if len(us) > 1 else "-"
        lines.append(f"| {LABEL[r['kind']]}{note} | {stage} | {us[0]:,.0f} | {later} | "
                     f"{ops:.3f} | {wall_rt:.2f} | {x} |")
    if "dd_s" in res:
        lines += ["", f"`dd bs=4M` of the published data.mdb through the same mount: {res['dd_s']:.1f} s"]
    return "\n".join(lines)


def plot(res: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "epochs" in r]
    x = np.arange(len(rows))
    first = [r["epochs"][0]["s"] * 1e6 / res["items"] for r in rows]
    later = [min(e["s"] for e in r["epochs"][1:]) * 1e6 / res["items"] if len(r["epochs"]) > 1 else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(x - 0.2, first, 0.4, label="first epoch")
    ax.bar(x + 0.2, later, 0.4, label="later epoch")
    ax.set_xticks(x, [LABEL[r["kind"]].replace(" (", "\n(").replace("published, ", "published,\n") for r in rows],
                  fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("µs per item (log)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{res['items']:,} of {res['n']:,} items ({res['bytes'] / 2**30:.2f} GiB), "
                 f"{res['latency_us']:.0f} µs, {res['memory_mb']:.0f} MiB cgroup, DataLoader 2 workers", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main()
