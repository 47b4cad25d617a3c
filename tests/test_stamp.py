"""Every kvcache writer leaves a structural stamp that matches the file it wrote, so the
next process opens without walking ``data.mdb`` (kvcache.structure).

Each test writes with one writer, then a FRESH interpreter opens the cache and reports
whether the stamp matched before it opened and how many whole-file walks it made
(``structure.walks()``): the assertion is on what a walk leaves behind, never on time.
A raw LMDB write (not kvcache's) must make the next opener walk: that checks the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import lmdb
import pytest
import torch
import torch.multiprocessing as tmp
from _cli_helpers import Squares
from helpers import BigSource, ImageSource

from kvcache import KvCacheWarning, LmdbCachedDataset, structure
from kvcache.maintenance import compact, gc, merge, publish, verify
from kvcache.store import KEY

TESTS = os.path.dirname(os.path.abspath(__file__))
SMALL_MAP = 1 << 20  # a map this small grows (doubles) several times during these builds


def grows() -> BigSource:
    return BigSource(3000, 2048)  # ~6.5 MB of records: a 1 MiB map doubles three times

OPEN = r"""
import json, sys
import kvcache
from kvcache import structure
path = sys.argv[1]
matched = structure.stamp_matches(path)
with kvcache.LmdbCachedDataset(None, path) as ds, kvcache.open_cache(path) as v:
    n, keys = len(ds), list(v.keys())
    ds[keys[-1]]
print(json.dumps({"matched": matched, "walks": structure.walks(), "n": n, "keys": len(keys)}))
"""


def fresh_open(path: str) -> dict:
    """Open ``path`` in a new interpreter: ``matched`` (the stamp, before opening),
    ``walks`` (whole-file walks the opens made), ``n`` and ``keys``."""
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", OPEN, path], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_opens_without_walking(path: str, n: int, keys: int | None = None) -> None:
    got = fresh_open(path)
    assert got["n"] == n and got["keys"] == (n if keys is None else keys), got
    assert got["matched"] and got["walks"] == 0, f"the next opener walked the file: {got}"


def stamped_on_disk(path: str) -> bool:
    """What a fresh process checks first: the sidecar stamp names data.mdb as it is now
    (this process's in-memory stamp does not count)."""
    try:
        with open(os.path.join(path, structure.STAMP_NAME)) as f:
            return json.load(f)["identity"] == list(structure.identity(path))
    except FileNotFoundError:
        return False


def map_grew(path: str) -> int:
    """The map size the cache recorded (written with the write that grew it), read with
    raw LMDB: opening through kvcache would walk and stamp a file whose stamp is behind."""
    env = lmdb.open(path, subdir=True, readonly=True, lock=False, max_dbs=4)
    try:
        info = env.open_db(b"info", create=False)
        with env.begin(db=info) as txn:
            raw = txn.get(b"map_size")
    finally:
        env.close()
    return int(raw) if raw else 0


def test_a_foreign_write_makes_the_next_opener_walk(tmp_path):
    """The check itself: a write kvcache did not make (raw LMDB) leaves the stamp behind,
    and the next opener walks once (then stamps, so the one after does not)."""
    path = str(tmp_path / "c")
    with LmdbCachedDataset(ImageSource(50), path) as ds:
        ds.build()
    assert stamped_on_disk(path)
    env = lmdb.open(path, subdir=True, max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"not-kvcache", b"x")
    env.close()
    got = fresh_open(path)
    assert not got["matched"] and got["walks"] == 1, got
    assert_opens_without_walking(path, 50)


@pytest.mark.parametrize("map_size", [pytest.param(None, marks=pytest.mark.slow), SMALL_MAP],
                         ids=["default-map", "map-grows"])
def test_serial_build(tmp_path, map_size):
    path = str(tmp_path / "c")
    with LmdbCachedDataset(grows(), path, map_size=map_size, write_batch=256) as ds:
        ds.build()
    if map_size:
        assert map_grew(path) >= 4 * SMALL_MAP  # it grew at least twice
    assert_opens_without_walking(path, 3000)


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_build_with_workers_while_the_map_grows(tmp_path, method):
    """The issue's case: build(num_workers=2) where the map grows. The growth used to be
    recorded in a commit of its own, which no stamp followed: every later commit then
    found the stamp behind the file and left it so."""
    path = str(tmp_path / "c")
    with LmdbCachedDataset(grows(), path, map_size=SMALL_MAP) as ds:
        rep = ds.build(num_workers=2, start_method=method)
        assert rep.computed == 3000
    assert map_grew(path) >= 4 * SMALL_MAP
    assert structure.stamp_matches(path)
    assert_opens_without_walking(path, 3000)


def _rank(rank: int, world: int, init: str, path: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with LmdbCachedDataset(grows(), path, map_size=SMALL_MAP) as ds:
            ds.build(distributed=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks
def test_distributed_build(tmp_path):
    path = str(tmp_path / "c")
    tmp.spawn(_rank, args=(2, f"file://{tmp_path}/pg-{time.time_ns()}", path), nprocs=2, join=True)
    assert map_grew(path) >= 4 * SMALL_MAP
    assert_opens_without_walking(path, 3000)


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_write_back_from_dataloader_workers(tmp_path, method):
    """Two workers write back in small batches (and at their exit): their commits
    interleave, and a commit that began between another's commit and its re-stamp used
    to find the stamp behind the file (and leave it so)."""
    path = str(tmp_path / "c")
    ds = LmdbCachedDataset(ImageSource(2000), path, write_batch=8)
    dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=method)
    seen = sum(len(b[1]) for b in dl)
    assert seen == 2000
    ds.close()
    assert_opens_without_walking(path, 2000)


def _cache(path: str, n: int = 400, version: int | None = None, indices=None) -> None:
    with LmdbCachedDataset(Squares(n), path, version=version, write_batch=64) as ds:
        for i in (range(n) if indices is None else indices):
            ds[i]


def test_merge(tmp_path):
    a, b, dest = (str(tmp_path / x) for x in "abd")
    _cache(a, indices=range(0, 400, 2))
    _cache(b, indices=range(1, 400, 2))
    rep = merge(dest, [a, b])
    assert rep.copied == 400
    assert stamped_on_disk(dest)
    _cache(a, indices=range(400))  # into an existing destination
    merge(dest, [a])
    assert_opens_without_walking(dest, 400)


def test_compact(tmp_path):
    path = str(tmp_path / "c")
    _cache(path, n=600, version=1)
    with pytest.warns(KvCacheWarning, match="the source changed"):  # shorter: not version= alone
        _cache(path, version=2)  # 200 rows of another fingerprint: gc frees pages, compact gives them back
    assert gc(path).removed == 200
    assert stamped_on_disk(path)
    rep = compact(path)
    assert rep.reclaimed > 0
    assert_opens_without_walking(path, 400)


@pytest.mark.slow  # test_compact checks gc's stamp on disk; this opens in a fresh process
def test_gc(tmp_path):
    path = str(tmp_path / "c")
    _cache(path, n=600, version=1)
    with pytest.warns(KvCacheWarning, match="the source changed"):
        _cache(path, version=2)  # rewrites 0..399: 400..599 are another fingerprint's
    assert gc(path).removed == 200
    assert_opens_without_walking(path, 400)


def damage_record(path: str, i: int) -> None:
    """Flip a byte in the middle of record ``i``'s value wherever its bytes lie in
    data.mdb (found through raw LMDB, then in the file): its checksum no longer matches."""
    env = lmdb.open(path, subdir=True, readonly=True, lock=False, max_dbs=4)
    try:
        samples = env.open_db(b"samples", create=False)
        with env.begin(db=samples) as txn:
            value = bytes(txn.get(KEY.pack(i)))
    finally:
        env.close()
    data = os.path.join(path, "data.mdb")
    with open(data, "rb") as f:
        raw = f.read()
    found, p = [], raw.find(value)
    while p >= 0:
        found.append(p)
        p = raw.find(value, p + 1)
    assert found, f"record {i} ({len(value)} bytes) not found in {data}"
    with open(data, "r+b") as f:
        for p in found:
            f.seek(p + len(value) // 2)
            f.write(bytes([raw[p + len(value) // 2] ^ 0xFF]))


def test_repair_of_bad_records(tmp_path):
    path = str(tmp_path / "c")
    _cache(path, n=200)
    damage_record(path, 17)
    rep = verify(path, repair=True)
    assert rep.repaired and rep.ok and rep.after.checked == 199
    assert_opens_without_walking(path, 200, keys=199)


@pytest.mark.slow
def test_repair_by_salvage(tmp_path):
    from test_cli import _break_page

    path = str(tmp_path / "c")
    _cache(path, n=200)
    _break_page(path, 40)
    rep = verify(path, repair=True)
    assert rep.repaired and rep.ok and rep.salvaged
    got = fresh_open(path)
    assert got["matched"] and got["walks"] == 0, got


def test_the_installed_command_builds_with_workers(tmp_path):
    """``kvcache build SPEC PATH --workers 2`` (the console script, a real subprocess)."""
    path = str(tmp_path / "c")
    console = os.path.join(os.path.dirname(sys.executable), "kvcache")
    cmd = [console] if os.path.exists(console) else [sys.executable, "-m", "kvcache"]
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KVTEST_N="1000")
    r = subprocess.run(cmd + ["build", "_cli_helpers:small", path, "--workers", "2"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert_opens_without_walking(path, 1000)


@pytest.mark.slow
def test_publish_leaves_the_source_stamped_and_writes_no_stamp_into_the_copy(tmp_path):
    path, dest = str(tmp_path / "c"), str(tmp_path / "pub")
    _cache(path)
    publish(path, dest)
    assert not os.path.exists(os.path.join(dest, structure.STAMP_NAME))
    assert stamped_on_disk(path)
    got = fresh_open(dest)
    assert got["n"] == 400
    assert not os.path.exists(os.path.join(dest, structure.STAMP_NAME))


def test_stamping_lock_spans_trust_commit_and_restamp(tmp_path):
    """While one process holds the stamping lock, another process's kvcache write waits
    for it (LMDB's own writer lock ends at the commit, before the re-stamp)."""
    path = str(tmp_path / "c")
    _cache(path, n=20)
    ready, done = str(tmp_path / "ready"), str(tmp_path / "done")
    code = r"""
import sys, time
from kvcache.store import Store
with Store(sys.argv[1], create=False) as s:
    e = s.handle()
    open(sys.argv[2], "w").close()
    s.transact(lambda txn: txn.put(b"k", b"v", db=e.info))
    with open(sys.argv[3], "w") as f:
        f.write(repr(time.monotonic()))  # CLOCK_MONOTONIC: one clock for every process
"""
    with structure.stamping(path):
        p = subprocess.Popen([sys.executable, "-c", code, path, ready, done])
        deadline = time.monotonic() + 120
        while not os.path.exists(ready) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(ready)
        deadline = time.monotonic() + 2.0  # without the lock its one small commit ends in this
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
        released = time.monotonic()
    assert p.wait(timeout=120) == 0
    with open(done) as f:
        assert float(f.read()) >= released  # it committed only once we let go
    assert stamped_on_disk(path)
