"""Caches read over a simulated network filesystem: µs and filesystem operations per item.

    python tools/bench_network.py [--n 2000] [--latency-us 200,1000] [--json out.json]
                                  [--plot docs/img/network.png]
    python tools/bench_network.py --big --root DIR ...   # larger than memory: tools/bench_bignet.py

Needs FUSE (``tools/netsim.py``: /dev/fuse, fusermount3, ``pip install -e '.[netsim]'``).
``n`` CIFAR-sized items (uint8[3,32,32] image + int label) are stored four ways on local
disk, under the directory that ``netsim`` serves with ``--latency-us`` added to every
round trip:

* ``per-file``: one ``.npy`` and one ``.label`` file per item, read with the usual
  ``os.path.exists`` + ``np.load`` + ``open().read()`` (the hand-written cache);
* ``lmdb+pickle``: the "folder2lmdb" recipe (``lmdb.open(readonly, lock=False,
  readahead=False)``, ``pickle.loads`` per item);
* ``kvcache published``: ``kvcache publish`` of a local cache, read with
  ``LmdbCachedDataset(source, path)`` and its defaults (readahead on and a sequential
  prefetch at open, for a published cache), without the prefetch
  (``KVCACHE_PREFETCH_BYTES=0``), and with ``readahead=False`` (no prefetch either);
* the same published kvcache cache read from local disk: the baseline of the steady state.

Each is read in random order (a new order each pass) in a fresh process for ``--passes``
passes (pass 0 includes opening; a cache that reads fast reads on, up to 30 passes, until
its later passes add up to a second), and through a DataLoader (2 workers, batch 32, shuffled) for ``--epochs``
epochs with ``persistent_workers`` on and off. Reported: µs per item and filesystem
operations per item (the simulator's count of round trips; it does not depend on machine
noise) for the first pass and the steady state (the fastest later pass; operations: their
mean). Times on a
shared machine are noisy: compare the ratios printed at the end, measured in one run.
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
import tempfile
import time
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netsim  # noqa: E402


class Cifarish(torch.utils.data.Dataset):
    """``(uint8 tensor [3,32,32], int label)``: a deterministic CIFAR-sized source."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        rng = np.random.default_rng(i)
        return torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)), int(rng.integers(10))


class PerFile(torch.utils.data.Dataset):
    """The hand-written cache: ``root/i.npy`` + ``root/i.label`` per item."""

    def __init__(self, root: str, n: int) -> None:
        self.root, self.n = root, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        p = os.path.join(self.root, f"{i}.npy")
        if not os.path.exists(p):
            raise KeyError(i)
        img = torch.from_numpy(np.load(p))
        with open(os.path.join(self.root, f"{i}.label")) as f:
            return img, int(f.read())


class LmdbPickle(torch.utils.data.Dataset):
    """The "folder2lmdb" recipe: pickled samples, the environment opened lazily."""

    def __init__(self, path: str, n: int) -> None:
        self.path, self.n, self.env = path, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        import lmdb

        if self.env is None:
            self.env = lmdb.open(self.path, subdir=True, readonly=True, lock=False, readahead=False,
                                 meminit=False)
        with self.env.begin() as txn:
            img, label = pickle.loads(txn.get(str(i).encode()))
        return torch.from_numpy(img), label

    def __getstate__(self) -> dict:
        return {"path": self.path, "n": self.n, "env": None}


def make_reader(kind: str, path: str, n: int) -> Any:
    if kind == "per-file":
        return PerFile(path, n)
    if kind == "lmdb+pickle":
        return LmdbPickle(path, n)
    import kvcache

    if kind == "kvcache-staged":
        return staged_reader(path, n)
    ra = {"kvcache": None, "kvcache-ra-off": False, "kvcache-no-prefetch": None}[kind]
    if kind == "kvcache-no-prefetch":
        os.environ["KVCACHE_PREFETCH_BYTES"] = "0"  # this child only
    return kvcache.LmdbCachedDataset(Cifarish(n), path, readahead=ra)


STAGE_ENV = "KVCACHE_BENCH_STAGE_DIR"


def staged_reader(path: str, n: int) -> Any:
    """The ``--staged`` rows: the published cache staged to local disk
    (``LmdbCachedDataset(..., stage=DIR)``; DIR is emptied before each row, so the first
    pass includes the copy, and a DataLoader's parent copies before its workers start)."""
    import kvcache

    return kvcache.LmdbCachedDataset(Cifarish(n), path, stage=os.environ[STAGE_ENV])


# --------------------------------------------------------------------------- building (local)


def build_all(work: str, n: int) -> None:
    import lmdb

    import kvcache

    src = Cifarish(n)
    os.makedirs(os.path.join(work, "per-file"))
    env = lmdb.open(os.path.join(work, "lmdb+pickle"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(n):
            img, label = src[i]
            np.save(os.path.join(work, "per-file", f"{i}.npy"), img.numpy())
            with open(os.path.join(work, "per-file", f"{i}.label"), "w") as f:
                f.write(str(label))
            txn.put(str(i).encode(), pickle.dumps((img.numpy(), label), protocol=pickle.HIGHEST_PROTOCOL))
    env.close()
    os.unlink(os.path.join(work, "lmdb+pickle", "lock.mdb"))
    local = os.path.join(work, "kvcache-build")
    with kvcache.LmdbCachedDataset(src, local) as ds:
        ds.build()
    kvcache.publish(local, os.path.join(work, "kvcache"))
    shutil.rmtree(local)


# --------------------------------------------------------------------------- children


def _counts(control: str | None) -> dict[str, int]:
    if not control:
        return {}
    fs = netsim.NetSim.__new__(netsim.NetSim)
    fs.control = control
    return fs.counts()


def _timed_pass(ds: Any, order: list[int]) -> float:
    t0 = time.perf_counter()
    for i in order:
        ds[i]
    return time.perf_counter() - t0


def child_passes(kind: str, path: str, n: int, passes: int, control: str | None, seed: int,
                 baseline: str | None = None) -> dict:
    import kvcache  # noqa: F401  (imports are not the cache's cost)

    c0 = _counts(control)
    t0 = time.perf_counter()
    ds = make_reader(kind, path, n)
    open_s, open_ops = time.perf_counter() - t0, netsim.delta(_counts(control), c0)
    out = []
    rng = random.Random(seed)
    steady_s = 0.0
    # at least `passes` passes; fast caches read on (up to 30) until their later passes
    # add up to a second, so that one scheduling hiccup on a shared CPU does not decide
    while len(out) < passes or (steady_s < 1.0 and len(out) < 30):
        order = list(range(n))
        rng.shuffle(order)
        for i in order:
            ds[i]
        t1 = time.perf_counter()
        c1 = _counts(control)
        d = netsim.delta(c1, c0)
        out.append({"us": (t1 - t0) * 1e6 / n, "ops": netsim.ops_total(d) / n, "by_kind": d})
        if len(out) > 1:
            steady_s += t1 - t0
        t0, c0 = time.perf_counter(), _counts(control)
    res = {"passes": out, "open_ms": open_s * 1e3, "open_ops": open_ops}
    if baseline:
        # the steady state against the same cache on local disk, paired: the two are read
        # alternately in this process, so both see the same noise from the rest of the machine
        base = make_reader(kind, baseline, n)
        _timed_pass(base, list(range(n)))  # its first pass
        mine, theirs = [], []
        for _r in range(15):
            order = list(range(n))
            rng.shuffle(order)
            mine.append(_timed_pass(ds, order) * 1e6 / n)
            theirs.append(_timed_pass(base, order) * 1e6 / n)
        res["paired_us"], res["paired_base_us"] = min(mine), min(theirs)
    return res


def child_loader(kind: str, path: str, n: int, epochs: int, persistent: bool, control: str | None) -> dict:
    import kvcache  # noqa: F401

    ds = make_reader(kind, path, n)  # workers reopen it (kvcache: an at-fork hook)
    dl = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=2,
                                     persistent_workers=persistent, multiprocessing_context="fork")
    out = []
    for _e in range(epochs):
        c0, t0 = _counts(control), time.perf_counter()
        seen = sum(len(b[1]) for b in dl)
        t1 = time.perf_counter()
        d = netsim.delta(_counts(control), c0)
        assert seen == n
        out.append({"us": (t1 - t0) * 1e6 / n, "ops": netsim.ops_total(d) / n, "by_kind": d})
    return {"passes": out}


def run_child(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)],
                       capture_output=True, text=True, check=False,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if p.returncode:
        raise SystemExit(f"child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


KINDS = ["per-file", "lmdb+pickle", "kvcache", "kvcache-no-prefetch", "kvcache-ra-off"]
LABEL = {"per-file": "per-file .npy + label", "lmdb+pickle": "LMDB + pickle",
         "kvcache": "kvcache published (default: readahead on)",
         "kvcache-ra-off": "kvcache published, readahead=False",
         "kvcache-no-prefetch": "kvcache published, KVCACHE_PREFETCH_BYTES=0",
         "kvcache-staged": "kvcache published, staged to local disk (stage=)"}


def summarize(r: dict) -> dict:
    """First pass, and the steady state: the fastest later pass (the least disturbed by
    the other work on a shared machine) and the mean of their operation counts."""
    r = dict(r)
    passes = r["passes"]
    steady = passes[1:] or passes
    return {"first_us": passes[0]["us"], "first_ops": passes[0]["ops"],
            "steady_us": min(p["us"] for p in steady),
            "steady_ops": sum(p["ops"] for p in steady) / len(steady),
            "first_by_kind": passes[0]["by_kind"], "all_us": [p["us"] for p in passes],
            "open_ms": r.get("open_ms"), "open_ops": r.get("open_ops"), "n_passes": len(passes),
            "paired_us": r.get("paired_us"), "paired_base_us": r.get("paired_base_us")}


def main() -> None:
    if "--big" in sys.argv[1:]:  # the larger-than-memory mode: tools/bench_bignet.py
        import bench_bignet

        bench_bignet.main([x for x in sys.argv[1:] if x != "--big"])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--latency-us", default="200,1000")
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0, help="the simulated link, MB/s (0: unlimited)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir in /tmp)")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib: the bench extra)")
    ap.add_argument("--no-loader", action="store_true", help="skip the DataLoader runs")
    ap.add_argument("--staged", action="store_true", help="add rows for the cache staged to local disk (stage=)")
    ap.add_argument("--from-json", help="print the table (and --plot) of an earlier run's --json")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            results = json.load(f)
        print(table(results))
        if a.plot:
            plot(results, a.plot)
        return
    if a.child:
        c = json.loads(a.child)
        res = child_passes(*c[1:]) if c[0] == "passes" else child_loader(*c[1:])
        print(json.dumps(res))
        return
    why = netsim.unavailable()
    if why:
        sys.exit(f"bench_network: no FUSE here ({why})")
    work = tempfile.mkdtemp(prefix="kvcache-benchnet-", dir=a.work)
    back, mnt = os.path.join(work, "back"), os.path.join(work, "mnt")
    results: dict[str, Any] = {"n": a.n, "passes": a.passes, "epochs": a.epochs, "runs": []}
    kinds = KINDS + (["kvcache-staged"] if a.staged else [])
    stage_dir = os.environ[STAGE_ENV] = os.path.join(work, "stage")
    try:
        t = time.perf_counter()
        build_all(back, a.n)
        print(f"built {a.n} items four ways in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        sizes = {k: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(back, k))
                        for f in fs) for k in ("per-file", "lmdb+pickle", "kvcache")}
        results["bytes"] = sizes
        for lat in [float(x) for x in a.latency_us.split(",")]:
            # the baseline: the same published cache on local disk, measured next to it
            r = run_child(["passes", "kvcache", os.path.join(back, "kvcache"), a.n, a.passes, None, 1])
            results["runs"].append({"latency_us": lat, "kind": "kvcache", "mode": "local", **summarize(r)})
            _log(results["runs"][-1])
            with netsim.NetSim(back, mnt, latency_us=lat, bandwidth_mbps=a.bandwidth_mbps) as fs:
                for kind in kinds:
                    paired = os.path.join(back, "kvcache") if kind == "kvcache" else None
                    shutil.rmtree(stage_dir, ignore_errors=True)
                    r = run_child(["passes", kind, os.path.join(mnt, _stored_as(kind)), a.n,
                                   a.passes, fs.control, 1, paired])
                    results["runs"].append({"latency_us": lat, "kind": kind, "mode": "process",
                                            **summarize(r)})
                    _log(results["runs"][-1])
                if a.no_loader:
                    continue
                for kind in ("per-file", "lmdb+pickle", "kvcache") + (("kvcache-staged",) if a.staged else ()):
                    for pw in (False, True):
                        shutil.rmtree(stage_dir, ignore_errors=True)
                        r = run_child(["loader", kind, os.path.join(mnt, _stored_as(kind)), a.n, a.epochs, pw,
                                       fs.control])
                        results["runs"].append({"latency_us": lat, "kind": kind,
                                                "mode": f"loader pw={'on' if pw else 'off'}",
                                                **summarize(r)})
                        _log(results["runs"][-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.plot:
        plot(results, a.plot)


def _stored_as(kind: str) -> str:
    """The directory under the mount that a row reads."""
    return kind.replace("-ra-off", "").replace("-no-prefetch", "").replace("-staged", "")


def _log(r: dict) -> None:
    print(f"  {r['latency_us']:>6.0f} µs {r['kind']:<15} {r['mode']:<15} first {r['first_us']:9.1f} µs "
          f"{r['first_ops']:7.3f} ops | steady {r['steady_us']:8.1f} µs {r['steady_ops']:7.3f} ops"
          f" | open {r['open_ms'] or 0:.1f} ms {r['open_ops']} | first pass {r['first_by_kind']}",
          file=sys.stderr)


def table(res: dict) -> str:
    runs = res["runs"]
    lines = [f"{res['n']:,} CIFAR-sized items, random order; µs and filesystem operations per item; "
             f"first pass (fresh process, includes opening) / steady state (the fastest later pass; "
             f"ops: their mean)", "",
             "| latency | cache | how | first µs/item | (of which opening) | first ops/item | steady µs/item "
             "| steady ops/item |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]

    def opening(r: dict) -> str:
        return f"{r['open_ms'] * 1e3 / res['n']:,.1f}" if r.get("open_ms") else "-"

    for r in runs:
        if r["mode"] == "local":
            lines.append(f"| none (local disk) | {LABEL['kvcache']}: the baseline | 1 process | {r['first_us']:,.1f} | "
                         f"{opening(r)} | - | {r['steady_us']:,.1f} | - |")
            continue
        how = "1 process" if r["mode"] == "process" else f"DataLoader, 2 workers, {r['mode'].split()[1]}"
        lines.append(f"| {r['latency_us']:,.0f} µs | {LABEL[r['kind']]} | {how} | {r['first_us']:,.1f} | "
                     f"{opening(r)} | {r['first_ops']:.3f} | {r['steady_us']:,.1f} | {r['steady_ops']:.3f} |")
    lines += ["", "Ratios (same run):", ""]
    for lat in sorted({r["latency_us"] for r in runs}):
        get = {(r["kind"], r["mode"]): r for r in runs if r["latency_us"] == lat}
        base = get[("kvcache", "local")]
        pf, kv = get[("per-file", "process")], get[("kvcache", "process")]
        kv_read = kv["first_us"] - kv["open_ms"] * 1e3 / res["n"]
        lines.append(f"- {lat:,.0f} µs: kvcache published vs per-file, first pass: "
                     f"**{pf['first_us'] / kv['first_us']:,.0f}x** faster ({pf['first_us'] / kv_read:,.0f}x "
                     f"leaving out kvcache's opening, {kv['open_ms']:.0f} ms once per process); steady state: "
                     f"{pf['steady_us'] / kv['steady_us']:,.0f}x; steady state vs the same cache on local "
                     f"disk: {kv['steady_us'] / base['steady_us']:.2f}x (separate processes), "
                     f"**{kv['paired_us'] / kv['paired_base_us']:.2f}x** (paired: read alternately in one "
                     f"process, {kv['paired_us']:.1f} vs {kv['paired_base_us']:.1f} µs/item); "
                     f"first-pass ops/item {kv['first_ops']:.3f}")
        pw = get.get(("kvcache", "loader pw=on"))
        if pw:
            lines.append(f"  DataLoader with persistent_workers=True: {pw['steady_ops']:.3f} ops/item after "
                         f"the first epoch (off: {get[('kvcache', 'loader pw=off')]['steady_ops']:.3f})")
        lines += staged_ratios(get, base)
    return "\n".join(lines)


def staged_ratios(get: dict, base: dict) -> list[str]:
    """The ``--staged`` rows against reading in place and the local disk (same run)."""
    st, kv = get.get(("kvcache-staged", "process")), get.get(("kvcache", "process"))
    if not st:
        return []
    out = [f"  staged (stage=): first pass {st['first_us']:,.1f} µs/item with the copy "
           f"({st['open_ms']:.0f} ms to stage and open) vs {kv['first_us']:,.1f} in place; steady state "
           f"{st['steady_ops']:.3f} ops/item, {st['steady_us'] / base['steady_us']:.2f}x the cache on local disk"]
    for pw in ("off", "on"):
        r = get.get(("kvcache-staged", f"loader pw={pw}"))
        if r:
            out.append(f"  staged DataLoader, persistent_workers {pw}: later epochs {r['steady_ops']:.3f} ops/item, "
                       f"{r['steady_us']:,.1f} µs/item (in place: "
                       f"{get[('kvcache', f'loader pw={pw}')]['steady_us']:,.1f})")
    return out


def plot(res: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if r["mode"] == "process"]
    lats = sorted({r["latency_us"] for r in runs})
    fig, axes = plt.subplots(1, len(lats), figsize=(4.2 * len(lats), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, lat in zip(axes, lats):
        rs = [r for r in runs if r["latency_us"] == lat]
        base = next(r for r in res["runs"] if r["mode"] == "local" and r["latency_us"] == lat)
        x = np.arange(len(rs) + 1)
        first = [r["first_us"] for r in rs] + [base["first_us"]]
        steady = [r["steady_us"] for r in rs] + [base["steady_us"]]
        ax.bar(x - 0.2, first, 0.4, label="first pass")
        ax.bar(x + 0.2, steady, 0.4, label="steady state")
        ax.set_xticks(x, [r["kind"].replace("kvcache-ra-off", "kvcache\nra off").replace(
            "kvcache-no-prefetch", "kvcache\nno prefetch") for r in rs] + ["kvcache\nlocal"],
                      fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{lat:,.0f} µs per operation", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("µs per item (log)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{res['n']:,} CIFAR-sized items, random order, one process", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main()
