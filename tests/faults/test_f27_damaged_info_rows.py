"""F27: damaged info, format and fingerprint rows give CacheCorruptError, or are rebuilt
by a dataset that has its source; a damaged kvcache cache is never "not a cache".

Issue 11, item 1: a damaged ``current`` row made the constructor raise a bare
``UnicodeDecodeError`` (``catalog.resolve`` -> ``Store.info_get`` -> ``json.loads``), and a
damaged info table was refused with ``NotACacheError`` (the CLI then exits 2, "not a
cache", instead of 1).
"""

import warnings

import lmdb
import pytest
from _fault_helpers import ArraySource, same, sample_for
from click.testing import CliRunner

import kvcache
from kvcache.cli import cli

GARBAGE = b"\xff\xfe{\x80 not json"  # invalid UTF-8: json.loads raised UnicodeDecodeError


def _put_info(path, key, value):
    env = lmdb.open(path, max_dbs=4)
    try:
        db = env.open_db(b"info", create=False)
        with env.begin(write=True, db=db) as txn:
            if value is None:
                txn.delete(key)
            else:
                txn.put(key, value)
    finally:
        env.close()


def _fp_key(path):
    env = lmdb.open(path, max_dbs=4, readonly=True, lock=False)
    try:
        db = env.open_db(b"info", create=False)
        with env.begin(db=db) as txn:
            return next(bytes(k) for k, _ in txn.cursor() if bytes(k).startswith(b"fp:"))
    finally:
        env.close()


def _all_served(path, n=100):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvcache.KvCacheWarning)
        with kvcache.LmdbCachedDataset(ArraySource(n), path) as ds:
            assert all(same(ds[i], sample_for(i)) for i in range(n))
            return ds.stats()


@pytest.mark.parametrize("row", [b"current", b"fp", b"fp_next"])
@pytest.mark.parametrize("value", [GARBAGE, b'"a string"', b'{"id": "x"}'])
def test_f27_damaged_fingerprint_rows(cache, row, value):
    key = _fp_key(cache) if row == b"fp" else row
    _put_info(cache, key, value)
    if row == b"current":  # readers go by it; the fingerprint rows only matter to a source
        with pytest.raises(kvcache.CacheCorruptError, match="verify --repair"):
            kvcache.LmdbCachedDataset(None, cache)
        with pytest.raises(kvcache.CacheCorruptError):
            with kvcache.open_cache(cache) as v:
                v.info()
                v.keys()
        r = CliRunner().invoke(cli, ["inspect", cache])
        assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit), r.output
        assert "damaged" in r.output
    else:
        with kvcache.open_cache(cache) as v:  # a reader does not need them
            assert len(v.keys()) == 100 and v.info().entries == 100
    st = _all_served(cache)  # the source rebuilds the row; every sample is right
    assert st.hits + st.misses == 100
    with kvcache.open_cache(cache) as v:  # and the cache is readable again
        assert len(v.keys()) == 100 and same(v.get(7), sample_for(7))


@pytest.mark.parametrize("value", [GARBAGE, b"[1, 2]", None])
def test_f27_damaged_format_row_is_corrupt_not_foreign(cache, value):
    _put_info(cache, b"format", value)
    for open_ in (lambda: kvcache.LmdbCachedDataset(None, cache), lambda: kvcache.open_cache(cache)):
        with pytest.raises(kvcache.CacheCorruptError, match="verify --repair"):
            open_()
    r = CliRunner().invoke(cli, ["inspect", cache])
    assert r.exit_code == 1, r.output  # 1: a damaged cache; 2 would say "not a cache"
    # with its source, the dataset repairs it (kvcache.selfrepair) and keeps every record
    with pytest.warns(kvcache.KvCacheWarning, match="the 100 intact records were kept"):
        ds = kvcache.LmdbCachedDataset(ArraySource(100), cache)
    assert all(same(ds[i], sample_for(i)) for i in range(100)) and ds.stats().hits == 100
    ds.close()
    r = CliRunner().invoke(cli, ["verify", "--repair", cache])
    r = CliRunner().invoke(cli, ["verify", cache])
    assert r.exit_code == 0, r.output
    _all_served(cache)


def test_f27_foreign_lmdb_is_still_not_a_cache(tmp_path):
    """An LMDB environment kvcache did not make stays NotACacheError (exit 2)."""
    path = str(tmp_path / "other")
    env = lmdb.open(path, max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    with pytest.raises(kvcache.NotACacheError):
        kvcache.open_cache(path)
    assert CliRunner().invoke(cli, ["inspect", path]).exit_code == 2
