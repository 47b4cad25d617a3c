"""Per-record compression of array payloads (zstd or lz4, optional extras).

A compressed record (header flag ``PACKED``, see :mod:`kvcache.codec`) keeps its header
and layout as they are and replaces the payload by a segment table and the segments::

    u16 count, then per segment: u8 method, u8 shuffle, u32 stored bytes, u32 raw bytes
    the segments' stored bytes, in payload order

Concatenated after decompression, the segments are exactly the payload an uncompressed
record of the same sample holds (npy headers and scalars included), so the same plan
decodes it. Each array leaf's data is its own segment, compressed on its own; a segment
that does not shrink by 10 % is stored raw (method 0), as are npy headers and scalar
values, and a record none of whose segments shrank is written uncompressed (every array
leaf then stays a complete ``.npy`` blob). ``shuffle`` is the item size of a byte-shuffled
segment (0: not shuffled): the bytes of each element are regrouped by position before
compression (the high bytes of small integers and the exponents of floats compress much
better together), and un-shuffled after decompression. Un-shuffling is a strided copy
(measured about 10x a memcpy per byte), so a multi-byte leaf is compressed both ways and
keeps the shuffle only where it saves a fifth of the bytes (token ids in int64 do; float
features mostly do not).

The codec bindings are imported on first use: a cache that holds records of a codec this
machine lacks raises :class:`MissingCodecError`, naming the extra to install.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Callable

import numpy as np

from .errors import MissingCodecError

__all__ = ["CODECS", "Compression", "MissingCodecError", "compression_of", "pack", "unpack",
           "plain_size", "segment_codecs"]

METHODS = {"zstd": 1, "lz4": 2}
CODECS = tuple(METHODS)
_NAMES = {v: k for k, v in METHODS.items()}
_EXTRAS = {"zstd": ("zstandard", "kvcache[zstd]"), "lz4": ("lz4", "kvcache[lz4]")}
DEFAULT_LEVEL = {"zstd": 3, "lz4": 0}
SEG = struct.Struct("<BBII")
_COUNT = struct.Struct("<H")
MIN_SEGMENT = 64  # array data below this is stored raw (a frame's overhead eats the gain)
MAX_SEGMENTS = 0xFFFF
SHRINK = 0.9  # a segment is stored compressed only when it shrinks to 90 % or less
SHUFFLE_GAIN = 0.8  # a byte-shuffled segment is kept only when it is 20 % smaller than unshuffled


def _missing(name: str) -> MissingCodecError:
    module, extra = _EXTRAS[name]
    return MissingCodecError(
        f"kvcache: {name} compression needs the {module!r} package, which is not installed here; "
        f"install it with `pip install '{extra}'` (or `pip install {module}`)")


_local = threading.local()  # zstd (de)compressor objects are not safe to share across threads


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise _missing("zstd") from None
    return zstandard


def _lz4() -> Any:
    try:
        import lz4.block
    except ImportError:
        raise _missing("lz4") from None
    return lz4.block


def _zstd_decompress(data: Any, raw: int) -> bytes:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = _zstd().ZstdDecompressor()
    return d.decompress(data, max_output_size=raw)


def _lz4_decompress(data: Any, raw: int) -> bytes:
    block = _lz4()
    _DECOMPRESS[2] = lambda data, raw: block.decompress(data, uncompressed_size=raw)  # imported now
    return block.decompress(data, uncompressed_size=raw)


_DECOMPRESS: dict[int, Callable[[Any, int], bytes]] = {1: _zstd_decompress, 2: _lz4_decompress}


class Compression:
    """What a writer compresses with: ``Compression("zstd", 3)``; picklable, immutable.

    Raises:
        ValueError: an unknown codec or a level out of its range.
        MissingCodecError: the codec's binding is not installed.
    """

    __slots__ = ("name", "level", "shuffle", "_method")

    def __init__(self, name: str, level: int | None = None, shuffle: bool = True) -> None:
        if name not in METHODS:
            raise ValueError(f"compression must be None, 'zstd' or 'lz4', not {name!r}")
        lo, hi = (-7, 22) if name == "zstd" else (0, 16)
        if level is None:
            level = DEFAULT_LEVEL[name]
        if type(level) is not int or not lo <= level <= hi:
            raise ValueError(f"compression_level for {name} must be an int in [{lo}, {hi}], not {level!r}")
        (_zstd if name == "zstd" else _lz4)()  # fail now, in the constructing process
        self.name, self.level, self.shuffle, self._method = name, level, shuffle, METHODS[name]

    def __repr__(self) -> str:
        return f"Compression({self.name!r}, {self.level})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compression) and (self.name, self.level, self.shuffle) == (
            other.name, other.level, other.shuffle)

    def __hash__(self) -> int:
        return hash((self.name, self.level, self.shuffle))

    def __reduce__(self) -> tuple:
        return (Compression, (self.name, self.level, self.shuffle))

    def stronger(self) -> "Compression":
        """The same codec at a higher level (for a record just over a page boundary)."""
        if self.name == "zstd":
            return Compression("zstd", max(self.level, min(self.level + 9, 19)), self.shuffle)
        return Compression("lz4", max(self.level, 12), self.shuffle)

    def compress(self, data: Any) -> bytes:
        """One segment's bytes, compressed."""
        if self._method == 1:
            c = getattr(_local, "zc", None)
            if c is None or _local.zc_level != self.level:
                c = _local.zc = _zstd().ZstdCompressor(level=self.level)
                _local.zc_level = self.level
            return c.compress(data)
        block = _lz4()
        if self.level:
            return block.compress(data, mode="high_compression", compression=self.level, store_size=False)
        return block.compress(data, store_size=False)


def compression_of(name: str | None, level: int | None = None) -> Compression | None:
    """``Compression(name, level)``, or None for ``name=None`` (a level without a codec is
    refused: it would be silently ignored)."""
    if name is None:
        if level is not None:
            raise ValueError("compression_level= needs compression='zstd' or 'lz4'")
        return None
    if isinstance(name, Compression):
        return name
    return Compression(name, level)


def pack(parts: list[Any], comp: Compression, shrink: float = SHRINK) -> bytes | None:
    """The segment table and segments of a payload given as ``parts`` (bytes for npy
    headers and scalars, ndarrays for array data), or None when no segment shrank to
    ``shrink`` of its size (the record is then written uncompressed)."""
    table: list[bytes] = []
    out: list[Any] = []
    glue: list[Any] = []
    shrank = False

    def flush() -> None:
        if glue:
            g = b"".join(glue)
            table.append(SEG.pack(0, 0, len(g), len(g)))
            out.append(g)
            glue.clear()

    if sum(p.nbytes if type(p) is np.ndarray else len(p) for p in parts) >= 1 << 32:
        return None  # segment sizes are u32: a 4 GiB payload is stored uncompressed
    for p in parts:
        if type(p) is not np.ndarray:
            glue.append(p)
            continue
        raw = p.nbytes
        k = p.shape[1] if p.ndim == 2 and p.dtype == np.uint8 else p.dtype.itemsize  # (n, itemsize) bytes
        data = p.reshape(-1).view(np.uint8)  # (datetime64 has no buffer interface of its own)
        if raw < MIN_SEGMENT:
            glue.append(data)
            continue
        flush()
        z = comp.compress(data)
        if comp.shuffle and 1 < k <= 16 and raw % k == 0:
            # Un-shuffling costs a strided copy on every read (about 10x a memcpy per byte):
            # kept only where it saves a fifth of the bytes (small ints in wide dtypes).
            zs = comp.compress(data.reshape(-1, k).T.tobytes())
            if len(zs) <= SHUFFLE_GAIN * len(z):
                z = zs
            else:
                k = 0
        else:
            k = 0
        if len(z) <= shrink * raw:
            table.append(SEG.pack(comp._method, k, len(z), raw))
            out.append(z)
            shrank = True
        else:
            table.append(SEG.pack(0, 0, raw, raw))
            out.append(data)
    flush()
    if not shrank or len(table) > MAX_SEGMENTS:
        return None
    return b"".join([_COUNT.pack(len(table)), *table, *out])


class SegmentError(Exception):
    """A malformed segment table (the codec turns it into CorruptRecordError)."""


def unpack(buf: Any, pos: int, bound: int) -> bytes:
    """The payload of a compressed record whose segment table starts at ``buf[pos]``;
    ``bound`` caps the bytes it may produce (the layout's payload size at most).

    Raises:
        SegmentError: malformed table or segment (anything a damaged record can do).
        MissingCodecError: a segment's codec is not installed.
    """
    (n,) = _count_from(buf, pos)
    t = pos + 2
    p = t + 10 * n
    end = len(buf)
    if p > end:
        raise SegmentError("segment table runs past the record")
    pieces: list[Any] = []
    total = 0
    for method, k, stored, raw in _seg_iter(buf[t:p]):
        q = p + stored
        total += raw
        if q > end or total > bound:
            raise SegmentError("segment runs past the record or its layout")
        if method == 0:
            if raw != stored:
                raise SegmentError("raw segment of the wrong size")
            pieces.append(buf[p:q])
        else:
            dec = _DECOMPRESS.get(method)
            if dec is None:
                raise SegmentError(f"unknown compression method {method}")
            try:
                data = dec(buf[p:q], raw)
            except MissingCodecError:
                raise
            except Exception as exc:  # noqa: BLE001 - zstd/lz4 raise their own errors
                raise SegmentError(f"{_NAMES[method]} segment: {exc}") from None
            if len(data) != raw:
                raise SegmentError("segment decompressed to the wrong size")
            if k:
                if raw % k:
                    raise SegmentError("shuffled segment not a multiple of its item size")
                data = _frombuffer(data, _U8).reshape(k, raw // k).T.tobytes()
            pieces.append(data)
        p = q
    if p != end:
        raise SegmentError("bytes after the last segment")
    return b"".join(pieces)


_count_from = _COUNT.unpack_from
_seg_iter = SEG.iter_unpack
_frombuffer, _U8 = np.frombuffer, np.dtype(np.uint8)


def plain_size(buf: Any, pos: int) -> int:
    """The uncompressed payload bytes of a compressed record (from its table alone)."""
    (n,) = _COUNT.unpack_from(buf, pos)
    return sum(SEG.unpack_from(buf, pos + 2 + 10 * j)[3] for j in range(n))


def segment_codecs(buf: Any, pos: int) -> set[str]:
    """The codec names a compressed record's segments use."""
    (n,) = _COUNT.unpack_from(buf, pos)
    return {_NAMES[m] for m in (SEG.unpack_from(buf, pos + 2 + 10 * j)[0] for j in range(n)) if m in _NAMES}


# --------------------------------------------------------------------------- LMDB pages

PAGE = 4096
# A value whose node would pass LMDB's node maximum for 4 KiB pages (mdb.c: me_nodemax,
# 2038 bytes with an 8-byte key) goes to overflow pages: a 16-byte header, then the
# value, rounded up to whole pages. Below it, records share leaf pages.
OVERFLOW_FROM = 2038 - 8 - 8


def pages(nbytes: int) -> int:
    """Whole 4 KiB pages a record of ``nbytes`` takes in LMDB (0: it shares a leaf page)."""
    return 0 if nbytes <= OVERFLOW_FROM else -(-(16 + nbytes) // PAGE)


NEAR = 1024  # a record this close past a page boundary tries harder to fit under it
