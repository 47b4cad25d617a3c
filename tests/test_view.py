"""``open_cache(path)`` is a ``collections.abc.Mapping`` from index to sample."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from kvcache import CorruptRecordError, KvCacheWarning, LmdbCachedDataset, MissingSampleError, open_cache
from kvcache.codec import read_header

from helpers import ImageSource, same

HAVE = [0, 3, 4, 9]


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "c")
    with LmdbCachedDataset(ImageSource(12), p) as ds:
        for i in HAVE:
            ds[i]
    return p


def test_a_view_is_a_mapping_like_a_dict(path):
    src = ImageSource(12)
    with open_cache(path) as v:
        assert isinstance(v, Mapping)
        assert len(v) == 4 and list(v) == HAVE and list(v.keys()) == HAVE
        assert same(v[3], src[3])
        assert [i for i, _ in v.items()] == HAVE and all(same(s, src[i]) for i, s in v.items())
        assert all(same(s, src[i]) for s, i in zip(v.values(), HAVE))
        assert 3 in v and np.int64(3) in v and 5 not in v and -1 not in v and "3" not in v
        assert 3 in v.keys() and 5 not in v.keys() and len(v.keys()) == 4
        for missing in (5, -1, 1 << 70, "3", None):
            with pytest.raises(MissingSampleError) as exc:
                v[missing]
            assert isinstance(exc.value, KeyError)
        assert v.get(5) is None and v.get(5, "default") == "default"
        assert same(v.get(9, "default"), src[9])
        d = dict(v)  # the dict a Python user would expect
        assert sorted(d) == HAVE


def test_record_is_the_raw_bytes_and_corruption_is_not_a_missing_key(path):
    with open_cache(path) as v:
        rec = v.record(4)
        assert isinstance(rec, bytes) and read_header(rec)[0] == 1
        with pytest.raises(MissingSampleError):
            v.record(5)
    import lmdb

    env = lmdb.open(path, max_dbs=4, subdir=True)
    with env.begin(write=True, db=env.open_db(b"samples")) as txn:
        bad = bytearray(rec)
        bad[-1] ^= 0xFF
        txn.put((4).to_bytes(8, "big"), bytes(bad))
    env.close()
    with open_cache(path) as v:
        with pytest.raises(CorruptRecordError):
            v[4]
        with pytest.raises(CorruptRecordError):  # get() returns a default for missing keys only
            v.get(4, "default")


def test_records_of_another_source_are_not_in_the_view(path):
    with pytest.warns(KvCacheWarning, match="cached samples of the previous source"), \
            LmdbCachedDataset(ImageSource(12, salt=1), path, version=2) as ds:
        ds[9]
    with open_cache(path) as v:  # the current fingerprint wrote only 9
        assert list(v) == [9] and len(v) == 1 and 3 not in v and v.get(3) is None
        with pytest.raises(MissingSampleError, match="another source"):
            v[3]
