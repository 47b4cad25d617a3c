"""Path hygiene: what is not a cache is refused and left exactly as it was; another
format version is refused with how to rebuild; a read-only location is served
read-only with one warning."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import warnings

import lmdb
import pytest

from kvcache import (
    IncompatibleCacheError,
    LmdbCachedDataset,
    NotACacheError,
    open_cache,
)

from helpers import ImageSource, same

N = 30


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes, and every directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def openers(path):
    yield lambda: LmdbCachedDataset(ImageSource(N), path)
    yield lambda: LmdbCachedDataset(None, path)
    yield lambda: open_cache(path)


def test_directory_with_other_files(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8 not a cache")
    (d / "sub").mkdir()
    before = snapshot(tmp_path)
    for open_it in openers(str(d)):
        with pytest.raises(NotACacheError) as info:
            open_it()
        assert str(d) in str(info.value)
    assert snapshot(tmp_path) == before


def test_plain_file(tmp_path):
    f = tmp_path / "cache"
    f.write_bytes(b"hello")
    before = snapshot(tmp_path)
    for open_it in openers(str(f)):
        with pytest.raises(NotACacheError, match="file"):
            open_it()
    assert snapshot(tmp_path) == before


def test_foreign_lmdb_is_refused_and_untouched(tmp_path):
    d = str(tmp_path / "foreign")
    env = lmdb.open(d, max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    before = snapshot(tmp_path)
    for open_it in openers(d):
        with pytest.raises(NotACacheError, match="not a kvcache"):
            open_it()
    assert snapshot(tmp_path) == before


def test_missing_path_read_only_is_refused_and_not_created(tmp_path):
    d = tmp_path / "nothing"
    for open_it in list(openers(str(d)))[1:]:
        with pytest.raises(NotACacheError):
            open_it()
    assert not d.exists()


def test_new_path_and_empty_directory_are_created(tmp_path):
    for d in (tmp_path / "a" / "b", tmp_path / "empty"):
        if d.name == "empty":
            d.mkdir()
        with LmdbCachedDataset(ImageSource(N), str(d)) as ds:
            ds[0]
        assert {"data.mdb", "lock.mdb"} <= set(os.listdir(d))


def test_other_format_version_is_incompatible(tmp_path):
    d = str(tmp_path / "cache")
    with LmdbCachedDataset(ImageSource(N), d) as ds:
        ds.build()
    env = lmdb.open(d, max_dbs=4)
    info = env.open_db(b"info", create=False)
    with env.begin(write=True, db=info) as txn:
        fmt = json.loads(txn.get(b"format"))
        fmt["version"] = 999
        txn.put(b"format", json.dumps(fmt).encode())
    env.close()
    before = snapshot(tmp_path)
    for open_it in openers(d):
        with pytest.raises(IncompatibleCacheError) as exc:
            open_it()
        msg = str(exc.value)
        assert "999" in msg and d in msg and "Rebuild" in msg
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- read-only location


@pytest.fixture
def readonly_cache(tmp_path):
    """A cache holding the even indices, at a location that cannot be written."""
    src_dir = tmp_path / "rw"
    with LmdbCachedDataset(ImageSource(N), str(src_dir)) as ds:
        for i in range(0, N, 2):
            ds[i]
    if os.geteuid() != 0:
        for p in [src_dir, *src_dir.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield str(src_dir)
        for p in [src_dir, *src_dir.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        return
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src_dir), str(ro_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro_dir)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only: {ro.stderr.decode().strip()}")
        yield str(ro_dir)
    finally:
        subprocess.run(["umount", str(ro_dir)], check=True)


@pytest.mark.root
def test_read_only_location_serves_hits_and_computes_misses(readonly_cache, tmp_path):
    src = ImageSource(N)
    before = snapshot(tmp_path / "rw")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = LmdbCachedDataset(src, readonly_cache)
        for _ in range(2):
            for i in range(N):
                assert same(ds[i], src[i])
        ds.flush()
        ds.close()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "write-back is off" in msgs[0] and readonly_cache in msgs[0], msgs
    st = ds.stats()
    assert st.hits >= N // 2 and st.misses == N and st.writes == 0
    with LmdbCachedDataset(None, readonly_cache) as ro:
        assert same(ro[2], src[2])
    with open_cache(readonly_cache) as view:
        assert list(view.keys()) == list(range(0, N, 2))
    assert snapshot(tmp_path / "rw") == before
