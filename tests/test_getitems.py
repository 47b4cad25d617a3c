"""``__getitems__`` serves a batch from one transaction through ``codec.decode`` (the one
place that knows the record format): on hostile records (corrupted, stale, truncated,
forged and re-sealed, another key's record) it must do exactly what ``ds[i]`` does: the
same value, the same error, the same counts."""

from __future__ import annotations

import random
import struct

import xxhash
import warnings

import lmdb
import pytest
from helpers import ImageSource, RaggedSource, same

from kvcache import CorruptRecordError, LmdbCachedDataset, codec
from kvcache.store import KEY

N = 24


def _reseal(rec: bytes, index: int = 3) -> bytes:
    """The record with its checksum recomputed (seeded with ``index`` when the record is
    KEYED), so a damage reaches the parsers."""
    if len(rec) < 16:
        return rec
    seed = index if struct.unpack_from("<I", rec, 4)[0] == codec.KEYED else 0
    return rec[:8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(rec[16:], seed)) + rec[16:]


def _hostile(good: bytes, other: bytes, rng: random.Random) -> list[bytes]:
    flipped = bytearray(good)
    flipped[-1] ^= 0x55
    head = bytearray(good)
    head[30] ^= 0x21  # inside the layout
    fp = struct.unpack_from("<I", good, 16)[0]
    stale = _reseal(good[:16] + struct.pack("<I", fp + 1) + good[20:])
    long_layout = _reseal(good[:20] + struct.pack("<I", 1 << 30) + good[24:])
    other_layout = _reseal(good[:24] + codec.record_layout(other) + good[24 + len(codec.record_layout(good)):])
    out = [
        other, _reseal(other, 5),  # another key's record (a misdirected page copy)
        bytes(flipped), _reseal(bytes(flipped)), bytes(head), _reseal(bytes(head)), stale,
        good[:-5], _reseal(good[:-5]), good[:10], b"", b"XXXX" + good[4:], long_layout,
        other_layout, good + b"\0", _reseal(good + b"\0"),
    ]
    for _ in range(20):
        bad = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(len(bad))] ^= rng.randrange(1, 256)
        out.append(_reseal(bytes(bad)))
    return out


def _put(path: str, index: int, rec: bytes) -> None:
    env = lmdb.open(path, max_dbs=4, lock=True)
    try:
        db = env.open_db(b"samples", create=False)
        with env.begin(write=True, db=db) as txn:
            txn.put(KEY.pack(index), rec)
    finally:
        env.close()


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return type(exc), None


def _agree(a, b) -> bool:
    if a[0] != b[0]:
        return False
    return a[0] != "ok" or same(a[1], b[1])


@pytest.mark.parametrize("make", [ImageSource, RaggedSource])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("with_source", [True, False])
def test_getitems_and_getitem_agree_on_hostile_records(tmp_path, make, verify, with_source):
    path = str(tmp_path / "cache")
    src = make(N)
    with LmdbCachedDataset(src, path) as ds:
        ds.build()
        for i in range(N):  # compile every layout's plan, so the fast path is taken
            for _ in range(4):
                ds[i]
    with LmdbCachedDataset(None, path) as ro, ro._store.begin() as txn:
        good = {i: bytes(txn.get(KEY.pack(i))) for i in (3, 5)}
    rng = random.Random(7)
    for rec in _hostile(good[3], good[5], rng):
        _put(path, 3, rec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            one = LmdbCachedDataset(src if with_source else None, path, readonly=True, verify=verify)
            two = LmdbCachedDataset(src if with_source else None, path, readonly=True, verify=verify)
            with one, two:
                for _ in range(4):
                    a = _outcome(lambda one=one: one[3])
                    b = _outcome(lambda two=two: two.__getitems__([3])[0])
                    assert _agree(a, b), (rec, a, b)
                    if a[0] == "ok" and with_source and verify and not codec.checksum_ok(rec, 3):
                        # Damaged bytes are never served as a sample when verified.
                        assert same(a[1], src[3])
                assert one.stats() == two.stats(), rec
                # In a batch (the hostile record between two good ones): the same result.
                # (Counts may differ: a batch reads every index before computing misses.)
                c = _outcome(lambda one=one: [one[i] for i in (2, 3, 4)])
                d = _outcome(lambda two=two: two.__getitems__([2, 3, 4]))
                assert c[0] == d[0] and (c[0] != "ok" or all(same(x, y) for x, y in zip(c[1], d[1])))


def test_getitems_corrupt_without_source_raises_like_getitem(tmp_path):
    path = str(tmp_path / "cache")
    with LmdbCachedDataset(ImageSource(N), path) as ds:
        ds.build()
    with LmdbCachedDataset(None, path) as ro, ro._store.begin() as txn:
        rec = bytes(txn.get(KEY.pack(3)))
    _put(path, 3, rec[:-1])
    with LmdbCachedDataset(None, path) as ro:
        with pytest.raises(CorruptRecordError, match="verify --repair"):
            ro.__getitems__([1, 3])
        assert ro.stats().corrupt == 1 and ro.stats().hits == 1
