"""F16: wrong things at the path: clear errors, and nothing created."""

import os
import sqlite3

import pytest
from _fault_helpers import ArraySource, snapshot

import kvcache


def _listing(root):
    return sorted((d, sorted(fs)) for d, _, fs in os.walk(root))


def test_f16_empty_data_mdb_not_ours(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "data.mdb").write_bytes(b"")
    before = _listing(tmp_path)
    for fn in (lambda: kvcache.LmdbCachedDataset(ArraySource(10), d),
               lambda: kvcache.LmdbCachedDataset(None, d), lambda: kvcache.open_cache(d)):
        with pytest.raises(kvcache.NotACacheError, match="empty"):
            fn()
    assert _listing(tmp_path) == before


def test_f16_empty_data_mdb_ours_is_empty_cache(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "data.mdb").write_bytes(b"")
    (d / "kvcache.lock").write_bytes(b"")  # kvcache created it, then stopped before a commit
    with kvcache.LmdbCachedDataset(ArraySource(10), d) as ds:
        assert ds[3][1] == 3


@pytest.mark.parametrize("what", ["unrelated_dir", "regular_file", "sqlite", "data_mdb_path"])
def test_f16_refused_and_nothing_created(tmp_path, what):
    d = tmp_path / "c"
    if what == "unrelated_dir":
        d.mkdir()
        (d / "notes.txt").write_text("mine")
        target, err = d, kvcache.NotACacheError
    elif what == "regular_file":
        d.write_text("a file")
        target, err = d, kvcache.NotACacheError
    elif what == "sqlite":
        d.mkdir()
        con = sqlite3.connect(d / "data.mdb")
        con.execute("create table t (x)")
        con.commit()
        con.close()
        target, err = d, (kvcache.NotACacheError, kvcache.CacheCorruptError)
    else:
        from _fault_helpers import build

        build(str(d), n=5)
        target, err = d / "data.mdb", kvcache.NotACacheError  # split-lock hazard: refuse
    before = _listing(tmp_path)
    snap = snapshot(str(d)) if d.is_dir() else None
    for fn in (lambda: kvcache.LmdbCachedDataset(ArraySource(10), target),
               lambda: kvcache.open_cache(target)):
        with pytest.raises(err):
            fn()
    assert _listing(tmp_path) == before
    if snap is not None:
        assert snapshot(str(d)) == snap
