"""The Store: first writer wins, stale and corrupt rows are replaced, the map grows and
remembers its size, a capped map raises CacheFullError, and lmdb errors are translated."""

from __future__ import annotations

import errno

import lmdb
import pytest

from kvcache import (
    CacheCorruptError,
    CacheFullError,
    CacheReadOnlyError,
    CacheWriteError,
    codec,
)
from kvcache.store import KEY, Store, translate


def row(i: int, value, fp: int = 1):
    rec, layout, checksum = codec.encode(value, fp)
    return i, rec, codec.meta_row(fp, checksum, len(rec), layout)


def stored(store: Store, i: int):
    with store.begin() as txn:
        raw = txn.get(KEY.pack(i))
        return None if raw is None else codec.decode(bytes(raw))


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "cache"))
    s.handle()
    yield s
    s.close()


def test_first_writer_wins_stale_and_corrupt_are_replaced(store):
    assert store.write_records([row(0, "first"), row(1, "one")], 1) == 2
    assert store.write_records([row(0, "second")], 1) == 0
    assert stored(store, 0) == "first"
    # A record of another fingerprint is stale: replaced.
    assert store.write_records([row(1, "new", fp=2)], 2) == 1
    assert stored(store, 1) == "new"
    # A corrupt record is replaced even by the same fingerprint.
    e = store.handle()
    with e.env.begin(write=True, db=e.samples) as txn:
        rec = bytearray(txn.get(KEY.pack(0)))
        rec[-1] ^= 1
        txn.put(KEY.pack(0), bytes(rec))
    assert store.write_records([row(0, "third")], 1) == 1
    assert stored(store, 0) == "third"
    # Duplicates inside one batch: the last one is written, once.
    assert store.write_records([row(5, "a"), row(5, "b")], 1) == 1
    with store.begin(e.meta) as txn:
        assert txn.stat(e.meta)["entries"] == 3
        fp, checksum, size = codec.meta_fields(txn.get(KEY.pack(5)))
    assert (fp, size) == (1, len(row(5, "b")[1])) and stored(store, 5) == "b"
    assert store.info_get(b"last_written") is not None


def test_map_grows_and_its_size_is_remembered(tmp_path):
    path = str(tmp_path / "cache")
    s = Store(path, map_size=1 << 20)
    blob = bytes(range(256)) * 1024  # 256 KiB
    for b in range(4):
        s.write_records([row(b * 4 + k, blob) for k in range(4)], 1)  # 1 MiB a batch
    grown = s.handle().env.info()["map_size"]
    assert grown >= 4 << 20
    assert int(s.info_get(b"map_size")) == grown
    s.close()
    s = Store(path, map_size=1 << 20)
    assert s.handle().env.info()["map_size"] >= grown  # max(configured, recorded)
    assert stored(s, 15) == blob
    s.close()


def test_capped_map_raises_cache_full_and_writes_nothing(tmp_path):
    s = Store(str(tmp_path / "cache"), map_size=1 << 20, max_map_size=1 << 20)
    s.write_records([row(0, b"small")], 1)
    with pytest.raises(CacheFullError) as info:
        s.write_records([row(i, bytes(300 << 10)) for i in range(1, 5)], 1)
    assert isinstance(info.value, CacheWriteError) and isinstance(info.value, OSError)
    assert "max_map_size" in str(info.value)
    assert stored(s, 0) == b"small" and stored(s, 1) is None  # the batch is all or nothing
    s.close()


def test_read_only_store_refuses_writes(tmp_path):
    path = str(tmp_path / "cache")
    with Store(path) as s:
        s.write_records([row(0, 1)], 1)
    with Store(path, readonly=True, create=False) as ro:
        assert stored(ro, 0) == 1
        with pytest.raises(CacheReadOnlyError) as info:
            ro.write_records([row(1, 2)], 1)
        assert isinstance(info.value, PermissionError)
        with pytest.raises(CacheReadOnlyError):
            ro.info_put({b"x": 1})


def test_delete_and_info_rows(store):
    store.write_records([row(i, i) for i in range(5)], 1)
    assert store.delete_keys([1, 3, 9]) == 2
    assert [i for i in range(5) if stored(store, i) is not None] == [0, 2, 4]
    store.info_put({b"note": {"a": [1, 2]}})
    assert store.info_get(b"note") == {"a": [1, 2]}
    assert store.info_items()["format"]["format"] == "kvcache"


@pytest.mark.parametrize("exc, want", [
    (lmdb.MapFullError("full"), CacheFullError),
    (lmdb.ReadonlyError("ro"), CacheReadOnlyError),
    (lmdb.CorruptedError("bad"), CacheCorruptError),
    (lmdb.PageNotFoundError("gone"), CacheCorruptError),
])
def test_translate(exc, want, tmp_path):
    got = translate(exc, str(tmp_path))
    assert isinstance(got, want) and str(tmp_path) in str(got)


def test_translate_errno(tmp_path):
    exc = lmdb.Error("mdb_txn_commit: Input/output error")
    exc.errno = errno.EIO  # an lmdb.Error carrying an errno (a failed commit)
    got = translate(exc, str(tmp_path))
    assert isinstance(got, CacheWriteError) and got.errno == errno.EIO
