"""Caches on a (simulated) network filesystem: tools/netsim.py mounts a latency-injecting
FUSE passthrough; kvcache must see it as FUSE, never write an LMDB environment there,
read any cache there lock-free, and serve correct samples from many process trees.

Skips where FUSE is unavailable (no /dev/fuse, fusermount3 or mfusepy).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
from click.testing import CliRunner
from helpers import ImageSource, same, tree_hashes

import kvcache
from kvcache.cli import cli
from kvcache.mounts import filesystem_of
from kvcache.maintenance import inspect_cache
from kvcache.store import Store

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import netsim  # noqa: E402


@pytest.fixture
def net():
    """A netsim mount (20 µs per operation) in a world-traversable directory:
    ``(fs, backing, mount)``."""
    why = netsim.unavailable()
    if why:
        pytest.skip(f"no FUSE here: {why}")
    root = tempfile.mkdtemp(prefix="kvcache-net-", dir="/tmp")
    os.chmod(root, 0o755)
    backing, mount = os.path.join(root, "back"), os.path.join(root, "mnt")
    try:
        fs = netsim.NetSim(backing, mount, latency_us=20).start()
    except netsim.NetSimUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(str(exc))
    os.chmod(backing, 0o755)
    try:
        yield fs, backing, mount
    finally:
        fs.stop()
        for d, _, _files in os.walk(root):
            os.chmod(d, 0o755)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def local(tmp_path):
    """A complete local cache of ImageSource(200)."""
    path = str(tmp_path / "local")
    with kvcache.LmdbCachedDataset(ImageSource(200), path) as ds:
        ds.build()
    return path


def test_detected_as_fuse(net):
    _fs, _backing, mount = net
    info = filesystem_of(os.path.join(mount, "some", "cache"))
    assert info.fstype == "fuse" and info.network == "FUSE" and info.mount_point == mount


def test_new_cache_refused_dataset_still_serves(net):
    fs, backing, mount = net
    source = ImageSource(200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kvcache.LmdbCachedDataset(source, os.path.join(mount, "c")) as ds:
            assert all(same(ds[i], source[i]) for i in range(200))
            batch = ds.__getitems__(list(range(10)))
            assert all(same(b, source[i]) for i, b in enumerate(batch))
            st = ds.stats()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert "FUSE filesystem" in msgs[0] and "kvcache publish" in msgs[0] and "allow_network_writes" in msgs[0]
    assert (st.hits, st.misses, st.writes) == (0, 210, 0)
    assert os.listdir(backing) == []  # nothing was created, not even the directory
    with pytest.raises(kvcache.NetworkFilesystemError, match="kvcache publish"):
        Store(os.path.join(mount, "m")).handle()  # without a dataset to degrade: an error
    assert os.listdir(backing) == []


def test_build_cli_refused(net, tmp_path):
    _fs, backing, mount = net
    spec = tmp_path / "spec.py"
    spec.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nfrom helpers import ImageSource\n"
                    "def make():\n    return ImageSource(50)\n")
    r = CliRunner().invoke(cli, ["build", f"{spec}:make", os.path.join(mount, "b")])
    assert r.exit_code == 1, r.output
    assert "kvcache publish" in r.output and "FUSE filesystem" in r.output
    assert os.listdir(backing) == []


def test_existing_cache_on_network_read_lock_free(net, local):
    _fs, backing, mount = net
    shutil.copytree(local, os.path.join(backing, "copy"),
                    ignore=shutil.ignore_patterns("lock.mdb"))  # an unpublished cache, copied there
    before = tree_hashes(os.path.join(backing, "copy"))
    source = ImageSource(250)  # a longer source: another fingerprint, so every read misses
    path = os.path.join(mount, "copy")
    with kvcache.LmdbCachedDataset(ImageSource(200), path) as ds:
        assert ds._env.lockfree and ds._env.env.flags()["lock"] is False
        assert all(same(ds[i], source[i]) for i in range(200))
        assert ds.stats().hits == 200
    with pytest.warns(kvcache.KvCacheWarning, match="source changed"):  # the longer source
        with pytest.warns(kvcache.KvCacheWarning, match="FUSE filesystem"):
            with kvcache.LmdbCachedDataset(source, path) as ds:
                assert all(same(ds[i], source[i]) for i in range(240, 250))
    assert tree_hashes(os.path.join(backing, "copy")) == before
    assert "lock.mdb" not in os.listdir(os.path.join(backing, "copy"))
    rep = inspect_cache(path)
    assert rep.network == "FUSE" and rep.lockfree and not rep.published


def test_publish_onto_network_fs_and_read(net, local):
    fs, backing, mount = net
    dest = os.path.join(mount, "pub")
    r = CliRunner().invoke(cli, ["publish", "--json", local, dest])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["entries"] == 200
    assert sorted(os.listdir(backing)) == ["pub"]  # the temp dir was renamed into place
    before = tree_hashes(os.path.join(backing, "pub"))
    c0 = fs.counts()
    source = ImageSource(200)
    with kvcache.LmdbCachedDataset(source, dest) as ds:
        c1 = fs.counts()  # opening read the file ahead, sequentially (it is under 256 MiB)
        assert all(same(ds[i], source[i]) for i in reversed(range(200)))
        assert ds.stats().hits == 200
        assert fs.counts().get("read", 0) == c1.get("read", 0)  # so the reads cost no round trip
    # Opening pays a bounded number of round trips: the structural validation's walk of
    # the tree pages (one pread each; overflow pages are not read) and the prefetch's
    # 128 KiB requests, fewer than the file's pages; after it, none (asserted above).
    pages = os.path.getsize(os.path.join(backing, "pub", "data.mdb")) // 4096
    assert 0 < c1.get("read", 0) - c0.get("read", 0) < pages
    r = CliRunner().invoke(cli, ["inspect", dest])
    assert "published:     yes" in r.output and "FUSE filesystem" in r.output, r.output
    assert tree_hashes(os.path.join(backing, "pub")) == before
    assert sorted(os.listdir(os.path.join(backing, "pub"))) == ["data.mdb", "kvcache.lock", "kvcache.published"]


def test_override_allows_writing(net):
    _fs, backing, mount = net
    code = textwrap.dedent("""
        import sys
        from helpers import ImageSource
        import kvcache
        ds = kvcache.LmdbCachedDataset(ImageSource(10), sys.argv[1], allow_network_writes=True)
        assert ds._store.writable and not ds._env.lockfree
        ds.close()
        print("writable")
    """)
    env = dict(os.environ, PYTHONPATH=HERE)
    p = subprocess.run([sys.executable, "-c", code, os.path.join(mount, "rw")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0 and "writable" in p.stdout, p.stderr[-2000:]
    assert "data.mdb" in os.listdir(os.path.join(backing, "rw"))


TREE = r"""
import json, sys, warnings
import torch
from helpers import ImageSource
import kvcache
path, n, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
warnings.simplefilter("error")  # a warning here would mean a miss: the cache is complete
source = ImageSource(n)
ds = kvcache.LmdbCachedDataset(source, path)
dl = torch.utils.data.DataLoader(ds, batch_size=25, num_workers=2, multiprocessing_context="fork",
                                 persistent_workers=True)
want_i = torch.stack([source[i][0] for i in range(n)])
want_l = torch.tensor([source[i][1] for i in range(n)])
checked = 0
for _ in range(epochs):
    bs = list(dl)
    assert torch.equal(torch.cat([b[0] for b in bs]), want_i)
    assert torch.equal(torch.cat([b[1] for b in bs]), want_l)
    checked += n
print(json.dumps({"checked": checked}))
"""


@pytest.mark.slow
def test_three_process_trees_read_a_published_cache(net, local):
    _fs, backing, mount = net
    dest = os.path.join(mount, "pub")
    kvcache.publish(local, dest)
    before = tree_hashes(os.path.join(backing, "pub"))
    env = dict(os.environ, PYTHONPATH=HERE)
    procs = [subprocess.Popen([sys.executable, "-c", TREE, dest, "200", "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["checked"] == 600
    assert tree_hashes(os.path.join(backing, "pub")) == before
    assert sorted(os.listdir(os.path.join(backing, "pub"))) == ["data.mdb", "kvcache.lock", "kvcache.published"]


NOBODY = r"""
import json, os, sys, warnings
import torch
from helpers import ImageSource
import kvcache
path = sys.argv[1]
source = ImageSource(200)
source[0]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
assert os.geteuid() == 65534
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with kvcache.LmdbCachedDataset(source, path, version="other") as ds:  # every read misses
        got = [ds[i] for i in range(20)]
    with kvcache.LmdbCachedDataset(source, path) as ds:
        got += [ds[i] for i in range(20, 200)]
        st = ds.stats().as_dict()
    wrong = [i for i in range(200) if not (torch.equal(got[i][0], source[i][0]) and got[i][1] == source[i][1])]
print(json.dumps({"wrong": wrong, "stats": st, "msgs": [str(w.message) for w in caught]}))
"""


@pytest.mark.slow
@pytest.mark.root
def test_read_only_tree_as_nobody(net, local):
    if os.geteuid() != 0:
        pytest.skip("needs root (runs a child as nobody)")
    _fs, backing, mount = net
    kvcache.publish(local, os.path.join(mount, "pub"))
    os.chmod(os.path.join(backing, "pub"), 0o555)
    os.chmod(backing, 0o555)
    before = tree_hashes(os.path.join(backing, "pub"))
    env = dict(os.environ, PYTHONPATH=HERE)
    p = subprocess.run([sys.executable, "-c", NOBODY, os.path.join(mount, "pub")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["wrong"] == []
    assert (out["stats"]["hits"], out["stats"]["misses"], out["stats"]["writes"]) == (180, 0, 0)
    assert len(out["msgs"]) == 1 and "published cache" in out["msgs"][0], out["msgs"]
    assert tree_hashes(os.path.join(backing, "pub")) == before
    assert sorted(os.listdir(os.path.join(backing, "pub"))) == ["data.mdb", "kvcache.lock", "kvcache.published"]
