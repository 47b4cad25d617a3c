"""The tally of metadata rows per fingerprint (kvcache.tally) equals a walk of the rows
after every kind of writer, and a cache without one still opens and counts."""

from __future__ import annotations

import json
import os
from collections import Counter

import _cli_helpers as H
import helpers
import lmdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kvcache import KvCacheWarning, LmdbCachedDataset, open_cache
from kvcache.cli import cli
from kvcache.maintenance import build, compact, gc, inspect_cache, merge, verify
from kvcache.codec import META_ROW
from kvcache.store import KEY
from kvcache.tally import MAX_LAYOUTS, TALLY_KEY, Tally


def _raw(path):
    return lmdb.open(str(path), readonly=True, lock=False, max_dbs=4, subdir=True, create=False)


def walk(path) -> tuple[dict, Tally | None, int | None]:
    """(fp -> [rows, bytes, Counter(layout)] by walking ``meta``, the stored tally, current id)."""
    env = _raw(path)
    try:
        meta, info = env.open_db(b"meta", create=False), env.open_db(b"info", create=False)
        true: dict = {}
        with env.begin() as txn:
            for _k, row in txn.cursor(db=meta):
                fp, _cs, size = META_ROW.unpack_from(row, 0)
                t = true.setdefault(fp, [0, 0, Counter()])
                t[0] += 1
                t[1] += size
                t[2][bytes(row[META_ROW.size:])] += 1
            stored = Tally.from_json(txn.get(TALLY_KEY, db=info))
            cur = txn.get(b"current", db=info)
        return true, stored, json.loads(cur)["id"] if cur else None
    finally:
        env.close()


def assert_exact(path) -> int:
    """The stored tally describes exactly the rows there; return the current count."""
    true, stored, cur = walk(path)
    assert stored is not None, "no tally row"
    assert set(stored.fps) == set(true), (stored.fps, true)
    for fp, (rows, nbytes, layouts) in true.items():
        t = stored.fps[fp]
        assert (t.rows, t.bytes) == (rows, nbytes), (fp, t, rows, nbytes)
        for lay, n in t.layouts.items():  # every tracked layout's count is exact
            assert layouts[lay] == n
        assert sum(t.layouts.values()) + t.other == rows
    with open_cache(path) as v:
        n = true.get(cur, [0])[0]
        assert len(v) == n == len(list(v.keys()))
        assert v.info().total_bytes == sum(t[1] for t in true.values())
    return n


def test_writeback_version_bump_gc_reset(tmp_path):
    path = str(tmp_path / "c")
    with LmdbCachedDataset(helpers.ImageSource(100), path, write_batch=16) as ds:
        for i in range(0, 100, 2):
            ds[i]
        ds.__getitems__(list(range(10)))
    assert assert_exact(path) == 55
    # a changed source: the new fingerprint's records replace old ones one by one
    with pytest.warns(KvCacheWarning, match="55 cached samples of the previous source will be recomputed"), \
            LmdbCachedDataset(helpers.ImageSource(100, salt=1), path, version=2) as ds:
        for i in range(0, 30):
            ds[i]
    assert assert_exact(path) == 30
    assert len(walk(path)[0]) == 2  # two fingerprints hold rows
    rep = gc(path)
    assert rep.removed == 55 - 20 and assert_exact(path) == 30
    assert len(walk(path)[0]) == 1
    # on_stale="reset" empties the cache and its tally in one transaction
    with pytest.warns(KvCacheWarning, match="emptied"), \
            LmdbCachedDataset(helpers.ImageSource(100), path, version=3, on_stale="reset") as ds:
        ds[5]
    assert assert_exact(path) == 1


def test_build_merge_compact(tmp_path):
    a, b, dest = (str(tmp_path / n) for n in "abd")
    build("_cli_helpers:small", a, workers=2)
    assert assert_exact(a) == 200
    with LmdbCachedDataset(H.small(), b) as ds:  # the same source, half of it
        for i in range(0, 200, 2):
            ds[i]
    assert assert_exact(b) == 100
    with LmdbCachedDataset(H.small(), dest) as ds:
        ds.build()
    assert assert_exact(dest) == 200
    os.rename(dest, dest + ".old")
    rep = merge(dest, [b, a])
    assert rep.entries == 200 and rep.copied == 200 and assert_exact(dest) == 200
    compact(dest)
    assert assert_exact(dest) == 200


def test_verify_repair_removes_rows_and_keeps_tally(tmp_path):
    path = str(tmp_path / "c")
    build("_cli_helpers:small", path)
    env = lmdb.open(path, max_dbs=4, subdir=True)
    samples, meta = env.open_db(b"samples"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        rec = bytearray(txn.get(KEY.pack(3), db=samples))
        rec[-1] ^= 0xFF  # a bad checksum
        txn.put(KEY.pack(3), bytes(rec), db=samples)
        txn.delete(KEY.pack(9), db=samples)  # an orphan metadata row
    env.close()
    assert assert_exact(path) == 200  # values changed, not rows: the tally still holds
    rep = verify(path, repair=True)
    assert rep.ok and rep.repaired and sorted(rep.bad + rep.orphans) == [3, 9]
    assert assert_exact(path) == 198
    with open_cache(path) as v:
        assert 3 not in v and 9 not in v and 4 in v


def test_a_cache_without_tally_opens_and_gets_one(tmp_path):
    """A cache written before the tally existed: readers walk, a writable open recounts."""
    path = str(tmp_path / "c")
    build("_cli_helpers:small", path)
    env = lmdb.open(path, max_dbs=4, subdir=True)
    with env.begin(write=True, db=env.open_db(b"info")) as txn:
        assert txn.delete(TALLY_KEY)
    env.close()
    assert walk(path)[1] is None
    with open_cache(path) as v:  # read-only: counts by walking, writes nothing
        assert len(v) == 200 and v.info().total_bytes > 0
    assert inspect_cache(path).current_entries == 200
    assert walk(path)[1] is None
    with LmdbCachedDataset(H.small(), path) as ds:  # an unchanged source: open writes nothing
        ds[0]
    assert walk(path)[1] is None
    with LmdbCachedDataset(H.small(), path, version="2") as ds:  # the next write counts once
        ds[0]
    assert assert_exact(path) == 1


def test_a_tally_that_disagrees_with_the_rows_is_not_trusted(tmp_path):
    """A writer that does not keep the tally (an older kvcache) changes the row count."""
    path = str(tmp_path / "c")
    build("_cli_helpers:small", path)
    env = lmdb.open(path, max_dbs=4, subdir=True)
    with env.begin(write=True) as txn:
        for i in range(10):
            txn.delete(KEY.pack(i), db=env.open_db(b"samples", txn=txn))
            txn.delete(KEY.pack(i), db=env.open_db(b"meta", txn=txn))
    env.close()
    with open_cache(path) as v:
        assert len(v) == 190
    assert inspect_cache(path).current_entries == 190
    with LmdbCachedDataset(H.small(), path) as ds:
        ds[0]
    assert assert_exact(path) == 191


class Varied(torch.utils.data.Dataset):
    """A vector whose length (so its layout) changes with the index: 40 layouts."""

    def __len__(self) -> int:
        return 120

    def __getitem__(self, i: int):
        return np.arange(i % 40, dtype=np.int32)


def test_layouts_past_the_bound_are_counted_together(tmp_path):
    path = str(tmp_path / "c")
    with LmdbCachedDataset(Varied(), path, write_batch=7) as ds:
        for i in [*range(0, 120, 3), *range(1, 120, 3), *range(2, 120, 3)]:
            ds[i]
    assert assert_exact(path) == 120
    stored = walk(path)[1]
    fp = next(iter(stored.fps.values()))
    assert len(fp.layouts) == MAX_LAYOUTS and fp.other == 120 - 3 * MAX_LAYOUTS
    rep = inspect_cache(path)
    assert rep.layouts == MAX_LAYOUTS and rep.other_layout_entries == fp.other
    out = CliRunner().invoke(cli, ["inspect", path]).output
    assert f"layouts:       {MAX_LAYOUTS} (and {fp.other:,} records of further layouts)" in out
    # deleting and rewriting rows keeps every tracked count exact
    with LmdbCachedDataset(Varied(), path, version=2) as ds:
        for i in range(0, 120, 5):
            ds[i]
    assert assert_exact(path) == 24
    gc(path)
    assert assert_exact(path) == 24


@pytest.mark.slow  # publish and salvage each run verify children: ~14 s
def test_publish_salvage_and_spot_check_repair_keep_the_tally(tmp_path):
    from kvcache.maintenance import publish

    path, pub = str(tmp_path / "c"), str(tmp_path / "pub")
    build("_cli_helpers:small", path)
    publish(path, pub)
    assert assert_exact(pub) == 200
    # a spot check that finds the source changed (same fingerprint) replaces records
    with pytest.warns(KvCacheWarning, match="spot check"), \
            LmdbCachedDataset(H.shifted(), path, spot_check=20) as ds:
        assert ds.spot_check_report.repaired == 20
    assert assert_exact(path) == 200
    # a truncated file: repair salvages every readable record into a fresh file
    data = os.path.join(path, "data.mdb")
    os.truncate(data, os.path.getsize(data) - 8 * 4096)
    rep = verify(path, repair=True)
    assert rep.repaired and rep.salvaged is not None and rep.ok, rep
    assert_exact(path)  # the salvaged file's tally describes exactly the rows it holds
    true, _stored, _cur = walk(path)
    # every salvaged record is counted under the fingerprint that wrote it; whether that
    # is still the current one depends on whether the truncation took the info rows with
    # it (the layout of the file's last pages varies with batch timing)
    assert sum(rows for rows, _b, _l in true.values()) == rep.salvaged


def test_verify_finds_and_repair_recounts_a_tally_that_lies(tmp_path):
    """A tally whose total matches the rows but whose counts do not (a damaged info row, or
    a writer that does not keep it): readers cannot tell, verify reports it (the records
    themselves are fine: exit 0), and --repair recounts it."""
    path = str(tmp_path / "c")
    build("_cli_helpers:small", path)
    true, stored, cur = walk(path)
    t = stored.fps[cur]
    t.bytes += 1  # same number of rows, wrong sizes
    env = lmdb.open(path, max_dbs=4, subdir=True)
    with env.begin(write=True, db=env.open_db(b"info")) as txn:
        txn.put(TALLY_KEY, stored.to_json())
    env.close()
    rep = verify(path)
    assert rep.ok and not rep.tally_ok
    out = CliRunner().invoke(cli, ["verify", path])
    assert out.exit_code == 0 and "disagrees with the metadata rows" in out.output
    assert out.output.rstrip().endswith("records ok")
    out = CliRunner().invoke(cli, ["verify", "--repair", path])
    assert out.exit_code == 0, out.output
    assert "repair: recounted the records per source; verified again: ok" in out.output
    rep = verify(path)
    assert rep.ok and rep.tally_ok and assert_exact(path) == 200
