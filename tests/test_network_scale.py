"""Published caches over a (simulated) network at sizes past the prefetch window: opening
costs O(1) round trips (the publish record replaces the structural walk), a batch's cold
records are fetched concurrently, and readahead does not pull pages nobody reads.

Counts come from tools/netsim.py (operations, bytes read, and the most requests in flight
at once), never from timings. Skips where FUSE is unavailable.
"""

import os
import random
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
from helpers import ImageSource, same

import kvcache

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import netsim  # noqa: E402

OPEN_ROUND_TRIPS = 20  # the goal (issue 16): opening + the first sample


class Blob3k(torch.utils.data.Dataset):
    """3 KiB uint8 arrays (one overflow page per record), distinct per index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        a = np.full(3072, i % 251, np.uint8)
        a[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
        return a


@pytest.fixture
def mounted():
    why = netsim.unavailable()
    if why:
        pytest.skip(f"no FUSE here: {why}")
    root = tempfile.mkdtemp(prefix="kvcache-netscale-", dir="/tmp")
    backing, mount = os.path.join(root, "back"), os.path.join(root, "mnt")
    os.makedirs(backing)
    try:
        fs = netsim.NetSim(backing, mount, latency_us=20).start()
    except netsim.NetSimUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(str(exc))
    try:
        yield fs, backing, mount
    finally:
        fs.stop()
        shutil.rmtree(root, ignore_errors=True)


def _publish(tmp_path, backing, source, name="pub"):
    local = str(tmp_path / "local")
    with kvcache.LmdbCachedDataset(source, local) as ds:
        ds.build()
    kvcache.publish(local, os.path.join(backing, name))
    return name


def _open_ops(fs, path, source):
    c0 = fs.counts()
    ds = kvcache.LmdbCachedDataset(source, path)
    first = ds[0]
    d = netsim.delta(fs.counts(), c0)
    return ds, first, d


def test_fixture_size_published_cache_opens_in_few_round_trips(mounted, tmp_path, monkeypatch):
    fs, backing, mount = mounted
    source = ImageSource(200)
    name = _publish(tmp_path, backing, source)
    path = os.path.join(mount, name)
    monkeypatch.setenv("KVCACHE_PREFETCH_BYTES", "0")  # opening alone, without the prefetch
    ds, first, d = _open_ops(fs, path, source)
    with ds:
        assert same(first, source[0]) and ds._env.opening.trusted == "record"
        assert netsim.ops_total(d) <= OPEN_ROUND_TRIPS, d
    monkeypatch.delenv("KVCACHE_PREFETCH_BYTES")  # the default: a small file is read ahead once
    ds, first, d = _open_ops(fs, path, source)
    with ds:
        size = os.path.getsize(os.path.join(backing, name, "data.mdb"))
        assert d.get("read_bytes", 0) >= size  # the prefetch read it all ...
        c1 = fs.counts()
        assert all(same(ds[i], source[i]) for i in range(200))
        assert fs.counts().get("read", 0) == c1.get("read", 0)  # ... so no read costs a round trip


@pytest.mark.slow
def test_open_is_o1_and_batches_overlap_beyond_the_prefetch_window(mounted, tmp_path):
    fs, backing, mount = mounted
    n = 100_000  # 3 KiB records: about 400 MiB, past the 64 MiB prefetch window
    source = Blob3k(n)
    name = _publish(tmp_path, backing, source)
    size = os.path.getsize(os.path.join(backing, name, "data.mdb"))
    assert size > 300 << 20
    path = os.path.join(mount, name)
    ds, first, d = _open_ops(fs, path, source)
    with ds:
        assert np.array_equal(first, source[0])
        e = ds._env
        assert e.opening.trusted == "record" and e.lockfree and e.cold
        assert netsim.ops_total(d) <= OPEN_ROUND_TRIPS, d
        assert d.get("read_bytes", 0) < 4 << 20  # nothing like a walk or a prefetch of the file
        rng = random.Random(0)
        # a batch of 256 cold records: fetched concurrently, one page each (no readahead)
        idx = rng.sample(range(n), 256)
        fs.counts(reset_max=True)
        c0 = fs.counts()
        got = ds.__getitems__(idx)
        d = netsim.delta(fs.counts(reset_max=True), c0)
        assert all(np.array_equal(g, source[i]) for g, i in zip(got, idx))
        assert d["max_inflight"] >= 4, d  # (the counter restarted at 0: this is the batch's)
        assert d.get("read_bytes", 0) <= 256 * 3 * 4096, d  # record, leaf, maybe a branch: no 128 KiB windows
        # the same read without the concurrent fetch: one fault after another
        e.cold = False
        idx = rng.sample(range(n), 256)
        c0 = fs.counts()
        got = ds.__getitems__(idx)
        d = netsim.delta(fs.counts(reset_max=True), c0)
        assert all(np.array_equal(g, source[i]) for g, i in zip(got, idx))
        assert d.get("max_inflight", 0) <= 2, d


def test_link_queues_transfers_and_counts_bytes():
    import threading
    import time

    link = netsim.Link(1e9)  # 1 GB/s: 10 MB take 10 ms on the wire
    t0 = time.perf_counter()
    ts = [threading.Thread(target=link.transfer, args=(10_000_000,)) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert link.bytes == 20_000_000
    # the two shared the link: the second was booked after the first, not beside it
    assert link.free_at - t0 >= 0.020
    free = netsim.Link(0)
    free.transfer(1 << 30)  # no limit: returns at once, counts nothing
    assert free.bytes == 0


@pytest.mark.root
def test_memory_limit_confines_a_child():
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a memory cgroup needs root")
    with netsim.MemoryLimit(300 << 20) as cg:
        if not cg.active:
            pytest.skip(f"no memory cgroup here: {cg.why}")
        out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/cgroup').read())"],
                             capture_output=True, text=True, check=True, preexec_fn=cg.enter).stdout
        assert os.path.basename(cg.dir) in out
        knob = "memory.max" if os.path.exists(os.path.join(cg.dir, "memory.max")) else "memory.limit_in_bytes"
        with open(os.path.join(cg.dir, knob)) as f:
            assert int(f.read()) == 300 << 20
        d = cg.dir
    assert not os.path.exists(d)  # removed afterwards
    with netsim.MemoryLimit(0) as cg:  # no limit asked for: nothing made, enter does nothing
        assert not cg.active
        cg.enter()
