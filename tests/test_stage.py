"""Staging a published cache to node-local disk (kvcache.stage, LmdbCachedDataset(stage=),
``kvcache stage``): reuse across processes, republish, damage, concurrent stagers,
eviction, no space, DataLoader workers through the network simulator."""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ImageSource, same
from torch.utils.data import DataLoader, Dataset

import kvcache
from kvcache.cli import cli
from kvcache.stage import entry_id, stage_report, staged_entries

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import netsim  # noqa: E402


class Blobs(Dataset):
    """``n`` uint8 arrays of ``size`` bytes: caches of a chosen size."""

    def __init__(self, n: int, size: int, salt: int = 0) -> None:
        self.n, self.size, self.salt = n, size, salt

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.random.default_rng(i * 1009 + self.salt).integers(0, 256, self.size, dtype=np.uint8)


def make_published(root, name, source, force=False, work=None):
    """Build ``source`` into a local cache (in ``work``, else ``root``) and publish it as ``root/name``."""
    build = os.path.join(str(work or root), f".build-{name}-{getattr(source, 'salt', 0)}")
    with kvcache.LmdbCachedDataset(source, build) as ds:
        ds.build()
    dest = os.path.join(str(root), name)
    kvcache.publish(build, dest, force=force)
    shutil.rmtree(build)
    return dest


def sha(path):
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_all(path, n):
    with kvcache.LmdbCachedDataset(None, path) as ds:
        return [ds[i] for i in range(n)]


@pytest.fixture
def pub(tmp_path):
    return make_published(tmp_path / "shared", "cifar", ImageSource(200))


# --------------------------------------------------------------------------- copy and reuse


def test_copies_once_then_reuses_across_processes(pub, tmp_path):
    local = str(tmp_path / "node")
    rep, _ = stage_report(pub, local)
    assert rep.copied and not rep.in_place and rep.reason == "absent"
    assert rep.path == os.path.join(local, entry_id(pub)) and os.path.dirname(rep.path) == local
    assert sha(rep.path) == sha(pub)
    assert sorted(os.listdir(rep.path)) == ["data.mdb", "kvcache.lock", "kvcache.published"]
    assert kvcache.matches_record(rep.path)  # the publish record came along: it opens without a walk
    assert kvcache.open_cache(rep.path).info().entries == 200
    source = ImageSource(200)
    assert all(same(s, source[i]) for i, s in enumerate(read_all(rep.path, 200)))
    again, _ = stage_report(pub, local)
    assert (again.path, again.copied, again.reason) == (rep.path, False, "reused")
    # another process (a later job) finds the same copy through the installed command
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kvcache"), "stage", pub, local, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["path"], r["copied"], r["reason"]) == (rep.path, False, "reused")
    assert kvcache.stage(pub, local) == rep.path


def test_republish_is_detected(tmp_path):
    shared = tmp_path / "shared"
    pub = make_published(shared, "c", ImageSource(100, salt=0))
    local = str(tmp_path / "node")
    path = kvcache.stage(pub, local)
    old = kvcache.LmdbCachedDataset(None, path)  # a reader of the old copy, still open
    assert same(old[5], ImageSource(100, salt=0)[5])
    make_published(shared, "c", ImageSource(100, salt=1), force=True)
    rep, _ = stage_report(pub, local)
    assert rep.copied and rep.reason.startswith("out of date"), rep
    assert rep.path == path and sha(path) == sha(pub)
    assert same(old[5], ImageSource(100, salt=0)[5])  # the old reader keeps its files
    old.close()  # (this process's environment for the path: closed before the new copy is read)
    new = ImageSource(100, salt=1)
    assert all(same(s, new[i]) for i, s in enumerate(read_all(path, 100)))
    assert stage_report(pub, local)[0].reason == "reused"


def test_not_published_is_refused(tmp_path):
    live = str(tmp_path / "live")
    with kvcache.LmdbCachedDataset(ImageSource(20), live) as ds:
        ds.build()
    with pytest.raises(kvcache.NotACacheError, match="kvcache publish"):
        kvcache.stage(live, tmp_path / "node")
    os.unlink(os.path.join(live, "lock.mdb"))  # a hand-made copy without lock.mdb: found after the copy
    with pytest.raises(kvcache.NotACacheError, match="not a published cache"):
        kvcache.stage(live, tmp_path / "node")
    assert staged_entries(tmp_path / "node") == []
    assert not [n for n in os.listdir(tmp_path / "node") if n.startswith(".") and "tmp" in n]
    with pytest.raises(kvcache.NotACacheError, match="no kvcache cache"):
        kvcache.stage(tmp_path / "nothing", tmp_path / "node")


# --------------------------------------------------------------------------- damage


def _writable(path):
    os.chmod(path, 0o755)
    os.chmod(os.path.join(path, "data.mdb"), 0o644)


@pytest.mark.parametrize("damage", ["truncate", "flip_same_mtime", "no_marker", "missing_file"])
def test_damaged_copy_is_copied_again(pub, tmp_path, damage):
    local = str(tmp_path / "node")
    path = kvcache.stage(pub, local)
    data = os.path.join(path, "data.mdb")
    st = os.stat(data)
    if damage == "truncate":
        _writable(path)
        os.truncate(data, st.st_size // 2)
    elif damage == "flip_same_mtime":  # mtime put back: only ctime tells
        _writable(path)
        with open(data, "r+b") as f:
            f.seek(st.st_size - 100)
            b = f.read(1)
            f.seek(st.st_size - 100)
            f.write(bytes([b[0] ^ 0xFF]))
        os.chmod(data, 0o444)
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(data).st_mtime_ns == st.st_mtime_ns and sha(path) != sha(pub)
    elif damage == "no_marker":
        os.unlink(os.path.join(local, entry_id(pub) + ".staged"))
    else:
        _writable(path)
        os.unlink(os.path.join(path, "kvcache.lock"))
    rep, _ = stage_report(pub, local)
    assert rep.copied and rep.reason.startswith("damaged"), rep
    assert sha(path) == sha(pub)
    assert sorted(os.listdir(path)) == sorted(os.listdir(pub))
    assert stage_report(pub, local)[0].reason == "reused"


KILLED_STAGER = """
import os, signal, sys
import kvcache
def die(done, total):
    if done >= 8:  # a chunk is written: die half way, as a killed job does
        os.kill(os.getpid(), signal.SIGKILL)
kvcache.stage(sys.argv[1], sys.argv[2], progress=die)
"""


def test_stager_killed_half_way_leaves_nothing_reused(tmp_path):
    pub = make_published(tmp_path / "shared", "big", Blobs(80, 256 << 10))  # ~20 MiB: 3 chunks
    local = str(tmp_path / "node")
    p = subprocess.run([sys.executable, "-c", KILLED_STAGER, pub, local], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    leftovers = [n for n in os.listdir(local) if ".tmp-" in n]
    assert leftovers and staged_entries(local) == []  # a temp dir, no copy in place
    rep, _ = stage_report(pub, local)
    assert rep.copied and rep.reason == "absent"
    assert sha(rep.path) == sha(pub)
    assert not [n for n in os.listdir(local) if ".tmp-" in n]


# --------------------------------------------------------------------------- concurrency


def _stage_in_child(args):
    pub, local, barrier = args
    barrier.wait()
    rep, _ = stage_report(pub, local)
    return rep.copied, rep.reason, rep.path


def _child(pub, local, barrier, q):
    try:
        q.put(_stage_in_child((pub, local, barrier)))
    except BaseException as exc:  # pragma: no cover - reported to the test
        q.put(repr(exc))


def test_concurrent_stagers_one_copies(tmp_path):
    pub = make_published(tmp_path / "shared", "big", Blobs(100, 256 << 10))  # ~25 MiB
    local = str(tmp_path / "node")
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(pub, local, barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=180) for _ in range(n)]
    for p in procs:
        p.join(60)
    assert all(isinstance(r, tuple) for r in results), results
    assert sorted(r[0] for r in results) == [False] * (n - 1) + [True], results
    assert {r[1] for r in results if not r[0]} == {"reused"}
    assert len({r[2] for r in results}) == 1
    assert sha(results[0][2]) == sha(pub)


# --------------------------------------------------------------------------- eviction and space


def test_eviction_least_recently_used_and_never_in_use(tmp_path):
    shared = tmp_path / "shared"
    a, b, c = (make_published(shared, name, Blobs(20, 32 << 10, salt=k)) for k, name in enumerate("abc"))
    size = os.path.getsize(os.path.join(a, "data.mdb")) + os.path.getsize(os.path.join(a, "kvcache.lock"))
    assert size == os.path.getsize(os.path.join(c, "data.mdb"))
    local = str(tmp_path / "node")
    cap = 2 * size + size // 2  # room for two
    pa, pb = kvcache.stage(a, local, max_bytes=cap), kvcache.stage(b, local, max_bytes=cap)
    assert stage_report(a, local, max_bytes=cap)[0].reason == "reused"  # a used after b
    rep, _ = stage_report(c, local, max_bytes=cap)
    assert rep.copied and rep.evicted == (pb,), rep
    assert [e["path"] for e in staged_entries(local)] == [pa, rep.path]
    assert not os.path.exists(os.path.join(local, entry_id(b) + ".staged"))
    # a is the least recently used now, but a dataset has it open: c goes instead
    with kvcache.LmdbCachedDataset(None, a, stage=local) as ds:
        assert ds.path == pa
        rep_b, _ = stage_report(b, local, max_bytes=cap)
        assert rep_b.copied and rep_b.evicted == (rep.path,), rep_b
        assert all(same(ds[i], Blobs(20, 32 << 10, salt=0)[i]) for i in range(20))
        # both copies in use now, and no room for a third: read in place, with a warning
        with kvcache.LmdbCachedDataset(None, b, stage=local):
            with pytest.warns(kvcache.KvCacheWarning, match="in use"):
                rep_c, _ = stage_report(c, local, max_bytes=cap)
            assert rep_c.in_place and rep_c.path == c and rep_c.evicted == ()
    assert sorted(e["path"] for e in staged_entries(local)) == sorted([pa, rep_b.path])


def test_larger_than_max_bytes_reads_in_place(pub, tmp_path):
    local = str(tmp_path / "node")
    with pytest.warns(kvcache.KvCacheWarning, match="larger than max_bytes"):
        assert kvcache.stage(pub, local, max_bytes=1000) == pub
    assert staged_entries(local) == []
    r = CliRunner().invoke(cli, ["stage", pub, local, "--max-bytes", "1K", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["in_place"] and out["path"] == pub and "max_bytes" in out["warnings"][0]


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small tmpfs)")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode()[-200:]}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_no_space_on_a_small_disk_reads_in_place(tmp_path, tmpfs):
    big = make_published(tmp_path / "shared", "big", Blobs(40, 256 << 10))  # ~10 MiB > 4 MiB
    with pytest.warns(kvcache.KvCacheWarning, match="free"):
        with kvcache.LmdbCachedDataset(None, big, stage=tmpfs) as ds:
            assert ds.path == big
            assert all(same(ds[i], Blobs(40, 256 << 10)[i]) for i in range(40))
    assert staged_entries(tmpfs) == []


@pytest.mark.root
def test_disk_filled_during_the_copy_reads_in_place(tmp_path, tmpfs):
    pub = make_published(tmp_path / "shared", "c", Blobs(8, 128 << 10))  # ~1 MiB: fits at first
    filler = os.path.join(tmpfs, "filler")

    def fill(done, total):  # another process fills the disk as the copy starts
        if not os.path.exists(filler):
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                except OSError:
                    pass

    with pytest.warns(kvcache.KvCacheWarning, match="filled up"):
        rep, _ = stage_report(pub, tmpfs, progress=fill)
    assert rep.in_place and rep.path == pub
    assert [n for n in os.listdir(tmpfs) if ".tmp-" in n] == []
    os.unlink(filler)
    assert stage_report(pub, tmpfs)[0].copied


# --------------------------------------------------------------------------- datasets and workers


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataset_workers_read_the_staged_copy(pub, tmp_path, method):
    local = str(tmp_path / "node")
    ds = kvcache.LmdbCachedDataset(None, pub, stage=local)
    path = os.path.join(local, entry_id(pub))
    assert ds.path == path
    marker = os.stat(os.path.join(local, entry_id(pub) + ".staged")).st_mtime_ns
    loader = DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=method, shuffle=True)
    source = ImageSource(200)
    for _ in range(2):
        seen = 0
        for imgs, labels in loader:
            seen += len(labels)
        assert seen == 200
    batch = ds.__getitems__([3, 7])
    assert same(batch[0], source[3]) and same(batch[1], source[7])
    assert os.stat(os.path.join(local, entry_id(pub) + ".staged")).st_mtime_ns == marker  # copied once
    assert len(staged_entries(local)) == 1
    ds.close()
    # the pickled state is the constructor's arguments
    assert ds.__getstate__()["_args"]["stage"] == local and ds.__getstate__()["_args"]["path"] == pub


@pytest.fixture
def net():
    why = netsim.unavailable()
    if why:
        pytest.skip(f"no FUSE here: {why}")
    root = tempfile.mkdtemp(prefix="kvcache-stage-net-", dir="/tmp")
    os.chmod(root, 0o755)
    backing, mount = os.path.join(root, "back"), os.path.join(root, "mnt")
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


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_staged_through_the_network_makes_no_read_of_the_published_copy(net, tmp_path, method):
    fs, _backing, mount = net
    pub = make_published(mount, "pub", ImageSource(300), work=tmp_path)
    local = str(tmp_path / "node")
    before = fs.counts()
    ds = kvcache.LmdbCachedDataset(ImageSource(300), pub, stage=local)
    copied = netsim.delta(fs.counts(), before)
    assert copied.get("read", 0) >= 1 and ds.path.startswith(local)
    after = fs.counts()
    source = ImageSource(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            loader = DataLoader(ds, batch_size=32, num_workers=2, multiprocessing_context=method)
            got = [(img, int(label)) for imgs, labels in loader for img, label in zip(imgs, labels)]
            assert len(got) == 300 and all(same(g, source[i]) for i, g in enumerate(got))
        assert all(same(ds[i], source[i]) for i in range(300))
    used = netsim.delta(fs.counts(), after)
    assert used.get("read", 0) == 0 and used.get("open", 0) == 0, used
    assert ds.stats().misses == 0
    ds.close()


# --------------------------------------------------------------------------- the CLI


def test_cli_stage(pub, tmp_path):
    local = str(tmp_path / "node")
    r = CliRunner().invoke(cli, ["stage", pub, local])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == os.path.join(local, entry_id(pub))
    r = CliRunner().invoke(cli, ["stage", pub, local, "--json", "--max-bytes", "20M"])
    out = json.loads(r.stdout)
    assert (out["copied"], out["reason"], out["in_place"]) == (False, "reused", False)
    r = CliRunner().invoke(cli, ["stage", str(tmp_path / "nothing"), local])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["stage", pub, local, "--max-bytes", "lots"])
    assert r.exit_code == 2 and "not a size" in r.output
    p = subprocess.run([sys.executable, "-m", "kvcache", "stage", str(tmp_path / "nothing"), local],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("kvcache: error:") and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- the publish record


def test_published_copy_damaged_after_publishing_is_not_staged(pub, tmp_path):
    data = os.path.join(pub, "data.mdb")
    os.chmod(data, 0o644)
    with open(data, "r+b") as f:  # a byte of a record page: the meta pages still match the record
        f.seek(os.path.getsize(data) // 2)
        b = f.read(1)
        f.seek(os.path.getsize(data) // 2)
        f.write(bytes([b[0] ^ 0x55]))
    assert kvcache.matches_record(pub)
    local = str(tmp_path / "node")
    with pytest.raises(kvcache.CacheCorruptError, match="kvcache verify"):
        kvcache.stage(pub, local)
    assert staged_entries(local) == [] and not [n for n in os.listdir(local) if ".tmp-" in n]


def test_published_without_a_record_is_walked_and_staged(pub, tmp_path):
    os.chmod(pub, 0o755)
    os.unlink(os.path.join(pub, "kvcache.published"))  # as a kvcache before publish records wrote it
    rep, _ = stage_report(pub, tmp_path / "node")
    assert rep.copied and sorted(os.listdir(rep.path)) == ["data.mdb", "kvcache.lock"]
    source = ImageSource(200)
    assert all(same(s, source[i]) for i, s in enumerate(read_all(rep.path, 200)))
