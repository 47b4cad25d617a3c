"""F01: a writer SIGKILLed at random points loses no acknowledged sample, leaves no orphan."""

import random
import signal
import time

import pytest
from _fault_helpers import Holder, check_child, run_child, spawn_child
from test_f14_meta_rollback import ORPHANS

WRITER = r"""
import sys, warnings
warnings.simplefilter("ignore")
from _fault_helpers import *
import kvcache
path, start, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ds = kvcache.LmdbCachedDataset(ArraySource(1000000, 1024), path, write_batch=10**9)
i = start
while True:
    todo = list(range(i, i + batch))
    for j in todo:
        ds[j]
    print("commit-started", flush=True)
    ds.flush()
    print("ack", todo[0], todo[-1], flush=True)
    i += batch
"""

CHECK = r"""
import json, sys
from _fault_helpers import *
import kvcache
path, acked = sys.argv[1], json.loads(sys.argv[2])
ds = kvcache.LmdbCachedDataset(None, path)
bad = [i for i in acked if not same(ds[i], sample_for(i, 1024))]
ds.close()
w = kvcache.LmdbCachedDataset(ArraySource(1000000, 1024), path)
w[999999]  # far past every round (round r writes from 1 + r * 20000)
w.close()
print(json.dumps({"bad": bad, "written": w.stats().writes}))
"""


def _kill_round(path, start, rng):
    p = spawn_child(WRITER, path, start, rng.choice([50, 200]))
    acked = []
    wait = rng.uniform(0.3, 1.5)
    deadline = None  # armed at the writer's first line: its start-up (importing torch) can
    after_commit_started = rng.random() < 0.5  # take seconds on a loaded machine
    for line in p.stdout:
        if deadline is None:
            deadline = time.monotonic() + wait
        if line.startswith("ack"):
            _, a, b = line.split()
            acked.extend(range(int(a), int(b) + 1))
        if time.monotonic() > deadline and (not after_commit_started or line.startswith("commit-started")):
            break
    alive = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    err = p.stderr.read() if not alive else ""
    for f in (p.stdin, p.stdout, p.stderr):
        f.close()
    assert alive, f"the writer died before the kill (rc {p.returncode}):\n{err[-3000:]}"
    return acked


def _run(tmp_path, rounds):
    import json

    path = str(tmp_path / "c")
    from _fault_helpers import build

    build(path, n=1)
    holder = Holder(path)
    holder.ok("ds = kvcache.LmdbCachedDataset(ArraySource(1000000, 1024), path); ds[0]")
    rng = random.Random(1)
    acked = []
    try:
        for r in range(rounds):
            acked += _kill_round(path, 1 + r * 20000, rng)
    finally:
        holder.close()
    assert acked, "no commit was acknowledged before the kills"
    sample = rng.sample(acked, min(len(acked), 400))
    out = check_child(run_child(CHECK, path, json.dumps(sample)))
    assert out["bad"] == [] and out["written"] == 1  # acked data intact; the next write works
    assert check_child(run_child(ORPHANS, path))["orphans"] == 0
    maintenance = pytest.importorskip("kvcache.maintenance")
    assert maintenance.verify(path).ok


def test_f01_sigkill_writer(tmp_path):
    _run(tmp_path, 1)


@pytest.mark.slow
def test_f01_sigkill_writer_many(tmp_path):
    _run(tmp_path, 12)
