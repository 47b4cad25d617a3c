"""Sample <-> record bytes, without pickle.

A sample is a tree of ``tuple`` / ``list`` / ``dict`` (``str`` keys, order kept) whose
leaves are ``torch.Tensor``, ``np.ndarray`` (any non-object dtype), numpy scalars, and
Python ``int`` / ``float`` / ``bool`` / ``None`` / ``str`` / ``bytes``.

Record layout (all integers little-endian)::

    offset 0   magic   b"KVC" + codec version byte
           4   flags   u32, reserved (0)
           8   checksum xxh3_64 of record[16:]
          16   fp_id   u32, the fingerprint id of the source that wrote the record
          20   layout_len u32
          24   layout  (the sample's structure, leaf types, dtypes and shapes)
               payload (the leaves' values in depth-first order; every array leaf is a
                        complete .npy blob, so ``np.load`` can read it on its own)

The layout holds no values, so every sample with the same structure and shapes shares
one layout; a decoded layout is compiled once into a plan (a tree of closures) and
cached by its bytes. Decoding is bounds-checked: arbitrary bytes raise
:class:`~kvcache.errors.CorruptRecordError` and never allocate more than the record's
own size.
"""

from __future__ import annotations

import struct
from typing import Any

import xxhash

from .encoder import CODEC_VERSION, MAGIC, encode
from .errors import CorruptRecordError
from .layout import LayoutError, LeafInfo, describe
from .plans import _PLANS, plan_for

__all__ = [
    "CODEC_VERSION",
    "HEADER_SIZE",
    "LeafInfo",
    "META_ROW",
    "StaleRecord",
    "checksum_ok",
    "decode",
    "describe_layout",
    "encode",
    "meta_row",
    "read_header",
    "record_layout",
]

HEADER = struct.Struct("<4sIQII")
HEADER_SIZE = HEADER.size  # 24
# The metadata row stored beside each record: fp_id, checksum, record bytes; the layout follows.
META_ROW = struct.Struct("<IQQ")


def meta_row(fp_id: int, checksum: int, nbytes: int, layout: bytes) -> bytes:
    """The metadata row of a record (written in the same transaction as the record)."""
    return META_ROW.pack(fp_id, checksum, nbytes) + layout

_checksum = xxhash.xxh3_64_intdigest


# --------------------------------------------------------------------------- decode


def read_header(buf: Any) -> tuple[int, int, int]:
    """Return ``(fp_id, checksum, layout_len)`` of a record.

    Raises:
        CorruptRecordError: too short for a header, or not a kvcache record.
    """
    if len(buf) < HEADER_SIZE:
        raise CorruptRecordError(f"record of {len(buf)} bytes is shorter than its header")
    magic, _flags, checksum, fp_id, layout_len = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or _flags:
        raise CorruptRecordError(f"bad record magic {bytes(magic)!r} or flags {_flags:#x}")
    return fp_id, checksum, layout_len


def record_layout(buf: Any) -> bytes:
    """The layout bytes of a record (unchecked beyond its bounds)."""
    _fp, _cs, layout_len = read_header(buf)
    if HEADER_SIZE + layout_len > len(buf):
        raise CorruptRecordError("layout runs past the record")
    return bytes(buf[HEADER_SIZE : HEADER_SIZE + layout_len])


def checksum_ok(buf: Any) -> bool:
    """Whether the record's bytes still hash to the checksum in its header."""
    return len(buf) >= HEADER_SIZE and _checksum(buf[16:]) == HEADER.unpack_from(buf, 0)[2]


_DECODE_ERRORS = (
    LayoutError, struct.error, ValueError, TypeError, IndexError, OverflowError,
    UnicodeError, KeyError, MemoryError, SyntaxError, RecursionError, AttributeError,
)


_unpack_header = HEADER.unpack_from
_unpack_head = struct.Struct("<QQII").unpack_from  # magic and flags read as one integer
_HEAD = int.from_bytes(MAGIC + bytes(4), "little")
_plans = _PLANS


class StaleRecord(Exception):
    """The record was written by another fingerprint than the one asked for."""


def decode(buf: Any, verify: bool = True, fp_id: int | None = None) -> Any:
    """Decode a record (bytes or a memoryview) into a fresh sample that owns its memory.

    With ``verify`` the checksum is checked first; with ``fp_id`` a record written by
    another fingerprint raises :class:`StaleRecord` instead of being decoded.

    Raises:
        CorruptRecordError: checksum mismatch or malformed bytes.
        StaleRecord: the record's fingerprint id is not ``fp_id``.
    """
    # The hot path of every cached read: keep it to a handful of C calls. The plan is
    # found by the layout's bytes (a dict lookup) and checks the record's length itself.
    try:
        head, checksum, fp, layout_len = _unpack_head(buf, 0)
        if head != _HEAD:  # magic, and the flags: reserved (0) and not checksummed
            raise LayoutError("bad record magic or flags")
        if fp_id is not None and fp != fp_id:
            raise StaleRecord(fp)
        if verify and _checksum(buf[16:]) != checksum:
            raise CorruptRecordError("checksum mismatch")
        body = 24 + layout_len
        lay = buf[24:body]
        try:
            # A read-only memoryview (what LMDB hands out) hashes and compares as its
            # bytes, so the plan is found without copying the layout out.
            plan = _plans[lay]
        except (KeyError, TypeError, ValueError):  # a new layout, or an unhashable buffer
            plan = plan_for(bytes(lay))
        return plan(buf, body)
    except (CorruptRecordError, StaleRecord):
        raise
    except _DECODE_ERRORS as exc:
        raise CorruptRecordError(f"malformed record: {exc}") from None


def describe_layout(layout: bytes) -> list[LeafInfo]:
    """The leaves of a layout (path, kind, dtype, shape), for inspect and ``get``.

    Raises:
        CorruptRecordError: the layout bytes are malformed.
    """
    try:
        return describe(layout)
    except _DECODE_ERRORS as exc:
        raise CorruptRecordError(f"malformed layout: {exc}") from None

