"""Many training jobs filling one local cache lazily at once, with faults and tools beside them.

    .venv/bin/python tools/many_jobs.py                         # 1 job, then 4 jobs (one SIGKILLed)
    .venv/bin/python tools/many_jobs.py --jobs 1,4 --n 3000 --json out.json

Each job is an independent process (its own session) running what a training script runs:
``LmdbCachedDataset(source, path)`` over a source that costs ~``--cost-ms`` of CPU per
sample, a DataLoader with 2 fork workers, shuffled, for ``--epochs`` epochs, checking every
sample against the source. With more than one job, the first is SIGKILLed together with its
DataLoader workers (its whole process group) once it has read a quarter of an epoch, while
``kvcache inspect``, ``kvcache verify`` and ``kvcache gc`` (the installed command) run in a
loop beside the jobs. Afterwards: every surviving job saw every sample right, the cache
holds every index with the right sample, every index that was cached when the job was
killed is still there, ``kvcache verify`` is clean, and nothing hung (every process has a
deadline). Prints items/s (all jobs' samples served / wall time) for each job count and the
counts: faults injected, samples checked, tool runs and their exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
KVCACHE = os.path.join(os.path.dirname(PY), "kvcache")

JOB = r"""
import json, os, sys, time, warnings
import numpy as np, torch, torch.utils.data
import kvcache
warnings.simplefilter("ignore")
path, n, epochs, cost = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) / 1000


class Source(torch.utils.data.Dataset):
    def __len__(self):
        return n

    def __getitem__(self, i):
        end = time.perf_counter() + cost
        while time.perf_counter() < end:
            pass
        return (torch.from_numpy(np.random.default_rng(i).integers(0, 256, (3, 32, 32), dtype=np.uint8)), i)


def expect(i):
    return (torch.from_numpy(np.random.default_rng(i).integers(0, 256, (3, 32, 32), dtype=np.uint8)), i)


ds = kvcache.LmdbCachedDataset(Source(), path, write_batch=64)
dl = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2, shuffle=True,
                                 multiprocessing_context="fork", collate_fn=list)
wrong, seen = [], 0
t0 = time.perf_counter()
for epoch in range(epochs):
    for batch in dl:
        for x, i in batch:
            seen += 1
            if not torch.equal(x, expect(i)[0]):
                wrong.append(i)
        if seen >= n // 8:
            print(json.dumps({"progress": seen}), flush=True)
wall = time.perf_counter() - t0
ds.close()
print(json.dumps({"seen": seen, "wrong": wrong, "wall": wall}), flush=True)
"""

CACHED = r"""
import json, sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=4)
with env.begin(db=env.open_db(b"samples", create=False)) as txn:
    print(json.dumps([int.from_bytes(k, "big") for k in txn.cursor().iternext(values=False)]))
"""

CHECK = r"""
import json, sys, warnings
import numpy as np, torch
import kvcache
warnings.simplefilter("ignore")
path, n = sys.argv[1], int(sys.argv[2])
with kvcache.open_cache(path) as v:
    keys = sorted(v.keys())
    bad = [i for i in keys if not torch.equal(torch.as_tensor(v[i][0]),
           torch.from_numpy(np.random.default_rng(i).integers(0, 256, (3, 32, 32), dtype=np.uint8)))]
print(json.dumps({"keys": keys, "bad": bad}))
"""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)


def _last_json(text: str) -> dict | list:
    lines = [ln for ln in text.splitlines() if ln.startswith(("{", "["))]
    return json.loads(lines[-1]) if lines else {}


def run(path: str, jobs: int, n: int, epochs: int = 2, cost_ms: float = 2.0, kill: bool = True,
        tools: bool = True, deadline_s: float = 600) -> dict:
    """Run ``jobs`` jobs on a fresh cache at ``path``; see the module docstring."""
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    procs = [_start(JOB, path, n, epochs, cost_ms) for _ in range(jobs)]
    killed = kill and jobs > 1
    tool_runs: dict[str, list[int]] = {"inspect": [], "verify": [], "gc": []}
    cached_at_kill: list[int] = []
    victim_done = not killed
    hung: list[str] = []
    end = time.monotonic() + deadline_s
    stop = threading.Event()

    def tools_loop(name: str) -> None:  # one thread per tool, each in a loop
        args = [name, path]
        while not stop.is_set():
            if not os.path.exists(os.path.join(path, "data.mdb")):
                time.sleep(0.2)
                continue
            try:
                r = subprocess.run([KVCACHE, *args], capture_output=True, text=True, timeout=300, env=_env())
                tool_runs[name].append(r.returncode)
                if r.returncode != 0:
                    tool_errors.append(f"{' '.join(args)}: {(r.stdout + r.stderr)[-300:]}")
            except subprocess.TimeoutExpired:
                hung.append(f"kvcache {' '.join(args)}")
            except Exception as exc:  # noqa: BLE001 - report it, keep the loop going
                tool_errors.append(f"{' '.join(args)}: {type(exc).__name__}: {exc}")

    tool_errors: list[str] = []
    threads = [threading.Thread(target=tools_loop, args=(name,), daemon=True) for name in tool_runs]
    if tools:
        for th in threads:
            th.start()
    # the victim: wait for its first progress line, then kill its whole process group
    if killed:
        v = procs[0]
        while time.monotonic() < end:
            line = v.stdout.readline()  # type: ignore[union-attr]
            if not line or "progress" in line:
                break
        os.killpg(v.pid, signal.SIGKILL)
        v.wait()
        # what is committed now (a killed job commits nothing more), read without torch
        out = subprocess.run([PY, "-c", CACHED, path], capture_output=True, text=True, timeout=120)
        cached_at_kill = list(_last_json(out.stdout) or [])
        victim_done = True
    others = procs[1:] if killed else procs
    results = []
    for k, p in enumerate(others):
        try:
            so, se = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            so, se = p.communicate()
            hung.append(f"job {k}")
        res = _last_json(so)
        if p.returncode != 0 or "seen" not in res:
            res = {"seen": 0, "wrong": [f"rc {p.returncode}: {se[-1500:]}"]}
        results.append(res)
    wall = time.perf_counter() - t0
    stop.set()
    for th in threads if tools else ():
        th.join(timeout=600)
    if killed:
        procs[0].stdout.close()  # type: ignore[union-attr]
        procs[0].stderr.close()  # type: ignore[union-attr]
    check = _last_json(subprocess.run([PY, "-c", CHECK, path, str(n)], capture_output=True, text=True, env=_env(),
                                      timeout=300).stdout)
    ver = subprocess.run([KVCACHE, "verify", path], capture_output=True, text=True, timeout=300, env=_env())
    served = sum(r["seen"] for r in results)
    return {
        "jobs": jobs, "n": n, "epochs": epochs, "wall_s": round(wall, 2),
        "items_per_s": round(served / wall, 1), "served": served,
        "wrong": [w for r in results for w in r["wrong"]],
        "expected_served": len(others) * n * epochs,
        "faults_injected": 1 if killed else 0, "killed_processes": 3 if killed else 0,
        "cached_at_kill": len(cached_at_kill),
        "lost_after_kill": sorted(set(cached_at_kill) - set(check.get("keys", []))),
        "final_keys": len(check.get("keys", [])), "final_bad": check.get("bad", ["no check"]),
        "verify_rc": ver.returncode, "tool_runs": {k: len(v) for k, v in tool_runs.items()},
        "tool_rcs": {k: sorted(set(v)) for k, v in tool_runs.items()}, "hung": hung,
        "tool_errors": tool_errors[:5],
        "samples_checked": served + len(check.get("keys", [])),
    }


def ok(res: dict) -> bool:
    return (not res["wrong"] and res["served"] == res["expected_served"] and not res["lost_after_kill"]
            and res["final_keys"] == res["n"] and not res["final_bad"] and res["verify_rc"] == 0
            and not res["hung"] and all(rc in (0,) for rcs in res["tool_rcs"].values() for rc in rcs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="1,4", help="comma list of job counts")
    p.add_argument("--n", type=int, default=3000, help="samples in the source")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cost-ms", type=float, default=2.0, help="CPU per computed sample")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="kvjobs-")
    out = []
    try:
        for jobs in [int(j) for j in a.jobs.split(",") if j]:
            res = run(os.path.join(root, f"c{jobs}"), jobs, a.n, a.epochs, a.cost_ms)
            out.append(res)
            print(json.dumps(res), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}\n")
    print("| jobs | killed | items/s | wall s | samples checked | wrong | tool runs (inspect/verify/gc) | "
          "cached at kill | lost | final keys | verify |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in out:
        t = r["tool_runs"]
        print(f"| {r['jobs']} | {r['faults_injected']} | {r['items_per_s']} | {r['wall_s']} | {r['samples_checked']} | "
              f"{len(r['wrong'])} | {t['inspect']}/{t['verify']}/{t['gc']} {r['tool_rcs']} | {r['cached_at_kill']} | "
              f"{len(r['lost_after_kill'])} | {r['final_keys']}/{r['n']} | {r['verify_rc']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(ok(r) for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
