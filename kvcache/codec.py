"""Sample <-> record bytes, without pickle.

A sample is a tree of ``tuple`` / ``list`` / ``dict`` (``str`` keys, order kept) whose
leaves are ``torch.Tensor``, ``np.ndarray`` (any non-object dtype), numpy scalars, and
Python ``int`` / ``float`` / ``bool`` / ``None`` / ``str`` / ``bytes``.

Record layout (all integers little-endian)::

    offset 0   magic   b"KVC" + codec version byte
           4   flags   u32: KEYED (1): the checksum is seeded with the record's index;
                       PACKED (2, format 2): the payload is compressed (see below)
           8   checksum xxh3_64 of record[16:] (seeded with the index when KEYED)
          16   fp_id   u32, the fingerprint id of the source that wrote the record
          20   layout_len u32
          24   layout  (the sample's structure, leaf types, dtypes and shapes)
               payload (the leaves' values in depth-first order; every array leaf is a
                        complete .npy blob, so ``np.load`` can read it on its own)

A PACKED record holds, after its layout, a segment table and the segments of its
payload (:mod:`kvcache.compression`): each array leaf's data compressed on its own
(zstd or lz4), npy headers and scalars stored as they are. Its checksum covers the
stored (compressed) bytes and is always checked before anything is decompressed; the
decompressed payload is what an uncompressed record holds, decoded by the same plan.
An array leaf of a PACKED record needs its codec to be read; records written without
compression (and every record of a format-1 cache) keep every array leaf a complete
``.npy`` blob.

Beside each record, in the ``meta`` database under the same key, is its metadata row:
``META_ROW`` (fp_id u32, checksum u64, record bytes u64) followed by the layout. When
bit 63 of the record-bytes field is set (``KEY_FOLLOWS``: a record of a keyed cache,
``key=``), the user's key comes between the two: ``u16 length | key bytes`` (the key as
:mod:`kvcache.keys` normalises it, type tag first). This module is the only one that
knows either format: other modules build rows with :func:`meta_row` /
:func:`encode_with_meta` and read them with :func:`meta_fields`, :func:`meta_layout`
and :func:`meta_key`.

A KEYED record cannot be served under another key: its checksum is seeded with the last
8 bytes of the LMDB key it is stored at (:func:`seed_of`: the index itself for an index
key, 64 bits of the key's digest in a keyed cache), so a page of one record copied over
another's (a misdirected write) fails the checksum instead of returning the wrong
sample. Records written without an index (flags 0, kvcache before 0.2) stay readable.

The layout holds no values, so every sample with the same structure and shapes shares
one layout; a decoded layout is compiled once into a plan (a tree of closures) and
cached by its bytes. Decoding is bounds-checked: arbitrary bytes raise
:class:`~kvcache.errors.CorruptRecordError` and never allocate more than the record's
own size. The plan checks the record's length against its header and layout before
any byte of the payload is read or hashed: a damaged LMDB node size (a value that
claims to run past its page, or past the end of the file) is refused without touching
the bytes past the record's real end, which could kill the process with SIGBUS.
"""

from __future__ import annotations

import struct
from typing import Any

import xxhash

from .compression import Compression, MissingCodecError, SegmentError, compression_of
from .compression import plain_size as _plain_size
from .compression import segment_codecs as _segment_codecs
from .compression import unpack as _unpack_segments
from .encoder import CODEC_VERSION, KEYED, MAGIC, PACKED, encode
from .errors import CorruptRecordError
from .layout import LayoutError, LeafInfo, describe, parse
from .plans import PLANS, plan_for

__all__ = [
    "CODEC_VERSION",
    "Compression",
    "HEADER",
    "HEADER_SIZE",
    "HEAD_KEYED",
    "HEAD_KEYED_PACKED",
    "HEAD_PLAIN",
    "HEAD_PLAIN_PACKED",
    "KEYED",
    "KEY_FOLLOWS",
    "LeafInfo",
    "META_ROW",
    "MissingCodecError",
    "PACKED",
    "PLANS",
    "StaleRecord",
    "checksum",
    "checksum_ok",
    "compression_of",
    "decode",
    "describe_layout",
    "encode",
    "encode_with_meta",
    "meta_fields",
    "meta_fp",
    "meta_key",
    "meta_layout",
    "meta_row",
    "meta_row_of",
    "plain_record",
    "read_header",
    "record_codecs",
    "record_layout",
    "record_sizes",
    "seed_of",
    "unpack_head",
    "with_fp",
]

HEADER = struct.Struct("<4sIQII")
HEADER_SIZE = HEADER.size  # 24
# The metadata row stored beside each record: fp_id, checksum, record bytes; the layout follows.
META_ROW = struct.Struct("<IQQ")
_meta_unpack = META_ROW.unpack_from
_META_SIZE = META_ROW.size
KEY_FOLLOWS = 1 << 63  # in the record-bytes field of a metadata row: the user's key follows
_SIZE_MASK = KEY_FOLLOWS - 1
_KEY_LEN = struct.Struct("<H")

# The fast path's names, public for the one batch loop that inlines decode's steps
# (LmdbCachedDataset.__getitems__; tests/test_getitems.py holds the two in lockstep):
checksum = xxhash.xxh3_64_intdigest  # checksum(record[16:], seed): seed = index when KEYED, else 0
unpack_head = struct.Struct("<QQII").unpack_from  # (magic+flags as one int, checksum, fp_id, layout_len)
HEAD_PLAIN = int.from_bytes(MAGIC + bytes(4), "little")  # magic, flags 0
HEAD_KEYED = int.from_bytes(MAGIC + KEYED.to_bytes(4, "little"), "little")  # magic, flags KEYED
HEAD_PLAIN_PACKED = int.from_bytes(MAGIC + PACKED.to_bytes(4, "little"), "little")
HEAD_KEYED_PACKED = int.from_bytes(MAGIC + (KEYED | PACKED).to_bytes(4, "little"), "little")
_checksum, _unpack_head, _HEAD, _HEAD_KEYED, _plans = checksum, unpack_head, HEAD_PLAIN, HEAD_KEYED, PLANS
_FLAGS = (0, KEYED, PACKED, KEYED | PACKED)
HASH_FIRST = 256 << 10  # records above this are hashed before they are copied (see decode)


# --------------------------------------------------------------------------- metadata rows


def seed_of(lmdb_key: bytes) -> int:
    """The checksum seed of a KEYED record stored at ``lmdb_key``: its last 8 bytes,
    big-endian (an 8-byte index key gives the index itself)."""
    return int.from_bytes(lmdb_key[-8:], "big")


def meta_row(fp_id: int, checksum: int, nbytes: int, layout: bytes, key: bytes | None = None) -> bytes:
    """The metadata row of a record (written in the same transaction as the record);
    ``key``: the normalised user key of a keyed cache's record (at most 65,535 bytes)."""
    if key is None:
        return META_ROW.pack(fp_id, checksum, nbytes) + layout
    return META_ROW.pack(fp_id, checksum, nbytes | KEY_FOLLOWS) + _KEY_LEN.pack(len(key)) + key + layout


def meta_row_of(record: Any, key: bytes | None = None) -> bytes:
    """The metadata row that belongs with ``record`` (from its own header and layout;
    ``key`` as for :func:`meta_row`).

    Raises:
        CorruptRecordError: the record's header or layout is malformed.
    """
    fp_id, checksum, _ = read_header(record)
    return meta_row(fp_id, checksum, len(record), record_layout(record), key)


def meta_fields(row: Any) -> tuple[int, int, int] | None:
    """``(fp_id, checksum, record bytes)`` of a metadata row; None when it is too short."""
    if len(row) < _META_SIZE:
        return None
    fp, cs, n = _meta_unpack(row, 0)
    return fp, cs, n & _SIZE_MASK


def _key_end(row: Any) -> int:
    """Where a metadata row's layout starts (past its key, if any)."""
    if len(row) < _META_SIZE or not _meta_unpack(row, 0)[2] & KEY_FOLLOWS:
        return _META_SIZE
    if len(row) < _META_SIZE + 2:
        return len(row)
    return min(_META_SIZE + 2 + _KEY_LEN.unpack_from(row, _META_SIZE)[0], len(row))


def meta_key(row: Any) -> bytes | None:
    """The normalised user key a metadata row holds (None: an index-keyed record's row,
    or a row too short to hold the key it announces)."""
    if len(row) < _META_SIZE + 2 or not _meta_unpack(row, 0)[2] & KEY_FOLLOWS:
        return None
    n = _KEY_LEN.unpack_from(row, _META_SIZE)[0]
    if _META_SIZE + 2 + n > len(row):
        return None
    return bytes(row[_META_SIZE + 2 : _META_SIZE + 2 + n])


def meta_fp(row: Any) -> int | None:
    """The fingerprint id of a metadata row (None when the row is too short): the one
    test of "written by the current fingerprint" every scan of the meta database uses."""
    return _meta_unpack(row, 0)[0] if len(row) >= _META_SIZE else None


def meta_layout(row: Any) -> bytes:
    """The layout bytes kept in a metadata row."""
    return bytes(row[_key_end(row):])


def encode_with_meta(sample: Any, fp_id: int, index: int, compression: Compression | None = None, *,
                     key: bytes | None = None) -> tuple[bytes, bytes]:
    """``(record, metadata row)`` of ``sample`` stored at ``index`` (a KEYED record):
    ``index`` is the checksum seed (:func:`seed_of` its LMDB key), ``key`` the normalised
    user key of a keyed cache's record, kept in the metadata row; array leaves are
    compressed with ``compression`` where they shrink.

    Raises:
        UnsupportedSampleError: as :func:`encode`.
    """
    record, layout, checksum = encode(sample, fp_id, index, compression)
    return record, meta_row(fp_id, checksum, len(record), layout, key)


# --------------------------------------------------------------------------- decode


def read_header(buf: Any) -> tuple[int, int, int]:
    """Return ``(fp_id, checksum, layout_len)`` of a record.

    Raises:
        CorruptRecordError: too short for a header, or not a kvcache record.
    """
    if len(buf) < HEADER_SIZE:
        raise CorruptRecordError(f"record of {len(buf)} bytes is shorter than its header")
    magic, flags, checksum, fp_id, layout_len = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or flags not in _FLAGS:
        raise CorruptRecordError(f"bad record magic {bytes(magic)!r} or flags {flags:#x}")
    return fp_id, checksum, layout_len


def record_layout(buf: Any) -> bytes:
    """The layout bytes of a record (unchecked beyond its bounds)."""
    _fp, _cs, layout_len = read_header(buf)
    if HEADER_SIZE + layout_len > len(buf):
        raise CorruptRecordError("layout runs past the record")
    return bytes(buf[HEADER_SIZE : HEADER_SIZE + layout_len])


def checksum_ok(buf: Any, index: int | None = None) -> bool:
    """Whether the record is intact: its length matches its header and layout (checked
    first, see the module docstring) and its bytes hash to its checksum. A KEYED record
    needs the ``index`` it is stored at."""
    try:
        decode(buf, True, None, index)
    except CorruptRecordError:
        return False
    return True


def with_fp(record: Any, fp_id: int, index: int) -> bytes:
    """``record`` with another fingerprint id in its header and its checksum redone (a
    record of flags 0 becomes KEYED at ``index``; PACKED stays). The caller checked the
    record first."""
    buf = bytearray(record)
    _magic, flags, _cs, _fp, layout_len = HEADER.unpack_from(buf, 0)
    HEADER.pack_into(buf, 0, MAGIC, KEYED | (flags & PACKED), 0, fp_id, layout_len)
    struct.pack_into("<Q", buf, 8, _checksum(memoryview(buf)[16:], index))
    return bytes(buf)


_DECODE_ERRORS = (
    LayoutError, struct.error, ValueError, TypeError, IndexError, OverflowError,
    UnicodeError, KeyError, MemoryError, SyntaxError, RecursionError, AttributeError,
)


class StaleRecord(Exception):
    """The record was written by another fingerprint than the one asked for."""


def decode(buf: Any, verify: bool = True, fp_id: int | None = None, index: int | None = None) -> Any:
    """Decode a record (bytes or a memoryview) into a fresh sample that owns its memory.

    With ``verify`` the checksum is checked (after the plan has checked the record's
    length, so a damaged size never makes it hash past the record); a KEYED record is
    checked against ``index``, the key it was read from, and fails under any other.
    With ``fp_id`` a record written by another fingerprint raises :class:`StaleRecord`
    instead of being decoded.

    Raises:
        CorruptRecordError: checksum mismatch, malformed bytes, or a KEYED record
            verified without its index.
        StaleRecord: the record's fingerprint id is not ``fp_id``.
    """
    # The hot path of every cached read: keep it to a handful of C calls. The plan is
    # found by the layout's bytes (a dict lookup) and checks the record's length itself.
    try:
        head, checksum, fp, layout_len = _unpack_head(buf, 0)
        if head == _HEAD_KEYED:
            seed = index
        elif head == _HEAD:  # magic, and the flags (not checksummed)
            seed = 0
        else:  # the one branch uncompressed records pay for compression
            return _decode_packed(buf, head, checksum, fp, layout_len, verify, fp_id, index)
        if fp_id is not None and fp != fp_id:
            raise StaleRecord(fp)
        body = 24 + layout_len  # past the record: the slice is short, and no plan matches it
        lay = buf[24:body]
        try:
            # A read-only memoryview (what LMDB hands out) hashes and compares as its
            # bytes, so the plan is found without copying the layout out.
            plan = _plans[lay]
        except (KeyError, TypeError, ValueError):  # a new layout, or an unhashable buffer
            plan = plan_for(bytes(lay))
        if verify and len(buf) > HASH_FIRST and plan.fixed == len(buf) - body:
            # A large record whose length its layout has just confirmed: hash it first, so
            # the copy reads bytes the hash brought into the CPU cache (the other order
            # reads the record from memory twice).
            if seed is None:
                raise CorruptRecordError("a keyed record cannot be verified without its index")
            if _checksum(buf[16:], seed) != checksum:
                raise CorruptRecordError("checksum mismatch")
            return plan(buf, body)
        value = plan(buf, body)  # checks len(buf) against the layout before reading
        if verify:
            if seed is None:
                raise CorruptRecordError("a keyed record cannot be verified without its index")
            if _checksum(buf[16:], seed) != checksum:
                raise CorruptRecordError("checksum mismatch")
        return value
    except (CorruptRecordError, StaleRecord, MissingCodecError):
        raise
    except _DECODE_ERRORS as exc:
        raise CorruptRecordError(f"malformed record: {exc}") from None


_BOUNDS: dict[bytes, int] = {}  # layout -> the most payload bytes its arrays can take


def _array_bound(layout: bytes) -> int:
    b = _BOUNDS.get(layout)
    if b is None:
        b = 0
        stack = [parse(layout)]
        while stack:
            node = stack.pop()
            kind = node[0]
            if kind == "array":
                b += node[4] + node[5]  # npy header + data
            elif kind in ("tuple", "list"):
                stack.extend(node[1])
            elif kind == "dict":
                stack.extend(node[2])
        if len(_BOUNDS) >= 4096:
            _BOUNDS.clear()
        _BOUNDS[layout] = b
    return b


def _decode_packed(buf: Any, head: int, checksum: int, fp: int, layout_len: int, verify: bool,
                   fp_id: int | None, index: int | None) -> Any:
    """decode() of a PACKED record: checksum first (whatever ``verify`` says, whenever the
    seed is known: it keeps a damaged table from steering a decompressor; only bytes the
    caller holds already checked, an LRU entry or a pending row, skip it), then the
    segments (never more bytes than the layout's arrays plus the record), then the plan."""
    if head != HEAD_PLAIN_PACKED and head != HEAD_KEYED_PACKED:
        raise LayoutError("bad record magic or flags")
    if fp_id is not None and fp != fp_id:
        raise StaleRecord(fp)
    seed = index if head == HEAD_KEYED_PACKED else 0
    if seed is None:
        if verify:
            raise CorruptRecordError("a keyed record cannot be verified without its index")
    elif _checksum(buf[16:], seed) != checksum:
        raise CorruptRecordError("checksum mismatch")
    body = 24 + layout_len
    lay = bytes(buf[24:body])
    if len(lay) != layout_len:
        raise LayoutError("layout runs past the record")
    try:
        payload = _unpack_segments(buf, body, _array_bound(lay) + len(buf))
    except SegmentError as exc:
        raise LayoutError(str(exc)) from None
    plan = _plans.get(lay) or plan_for(lay)
    return plan(payload, 0)


def plain_record(record: Any, index: int) -> bytes:
    """``record`` (stored at ``index``) as an uncompressed record: the same sample, the
    flags without PACKED, the checksum redone. An uncompressed record comes back as its
    bytes. The caller checked the record first.

    Raises:
        CorruptRecordError: malformed record.
        MissingCodecError: the record's codec is not installed.
    """
    _magic, flags, _cs, fp_id, layout_len = HEADER.unpack_from(read_header(record) and record, 0)
    if not flags & PACKED:
        return bytes(record)
    body = HEADER_SIZE + layout_len
    lay = bytes(record[HEADER_SIZE:body])
    try:
        payload = _unpack_segments(record, body, _array_bound(lay) + len(record))
    except (SegmentError, LayoutError, struct.error, ValueError) as exc:
        raise CorruptRecordError(f"malformed record: {exc}") from None
    buf = bytearray(HEADER.pack(MAGIC, flags & ~PACKED, 0, fp_id, layout_len)) + lay + payload
    struct.pack_into("<Q", buf, 8, _checksum(memoryview(buf)[16:], index if flags & KEYED else 0))
    return bytes(buf)


def record_sizes(record: Any) -> tuple[int, int]:
    """``(stored bytes, uncompressed bytes)`` of a record, from its header and segment
    table alone (both the record's length for an uncompressed one).

    Raises:
        CorruptRecordError: too short or malformed header.
    """
    _fp, _cs, layout_len = read_header(record)
    if not HEADER.unpack_from(record, 0)[1] & PACKED:
        return len(record), len(record)
    body = HEADER_SIZE + layout_len
    try:
        return len(record), body + _plain_size(record, body)
    except struct.error as exc:
        raise CorruptRecordError(f"malformed segment table: {exc}") from None


def record_codecs(record: Any) -> set[str]:
    """The compression codecs a record's segments use (empty when uncompressed)."""
    _fp, _cs, layout_len = read_header(record)
    if not HEADER.unpack_from(record, 0)[1] & PACKED:
        return set()
    try:
        return _segment_codecs(record, HEADER_SIZE + layout_len)
    except struct.error as exc:
        raise CorruptRecordError(f"malformed segment table: {exc}") from None


def describe_layout(layout: bytes) -> list[LeafInfo]:
    """The leaves of a layout (path, kind, dtype, shape), for inspect and ``get``.

    Raises:
        CorruptRecordError: the layout bytes are malformed.
    """
    try:
        return describe(layout)
    except _DECODE_ERRORS as exc:
        raise CorruptRecordError(f"malformed layout: {exc}") from None

