"""Sample -> record bytes (the writer's half of :mod:`kvcache.codec`, which documents the
record format and is the public entry point: ``codec.encode``).

Two encoders write the same bytes: a fast one for the common types (arrays, tensors of
numpy dtypes, int/float/bool/None/str/bytes, tuple/list/dict) that caches each
(dtype, shape)'s layout fragment and npy header and keeps no per-leaf path, and the full
one, which reruns on anything unusual (or any error) to encode it or name its place.
"""

from __future__ import annotations

import io
import struct
import sys
from typing import Any

import numpy as np
import xxhash

from .compression import NEAR, PAGE, Compression, pack, pages
from .errors import UnsupportedSampleError
from .layout import F64, I64, MAX_DEPTH, MAX_NDIM, TORCH_NATIVE, U8, U16, U32, U64

__all__ = ["CODEC_VERSION", "KEYED", "MAGIC", "PACKED", "encode"]

# The record magic names codec 1 (the record layout itself); what later versions added
# is told by header flags, so records written by any version stay readable.
CODEC_VERSION = 1
MAGIC = b"KVC" + bytes([CODEC_VERSION])
KEYED = 1  # header flags: the checksum is seeded with the record's index (key)
PACKED = 2  # header flags (format 2): the payload is a segment table (kvcache.compression)

_U8, _U16, _U32, _U64, _I64, _F64 = U8, U16, U32, U64, I64, F64
_checksum = xxhash.xxh3_64_intdigest

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class _Encoder:
    __slots__ = ("layout", "parts", "torch")

    def __init__(self) -> None:
        self.layout: list[bytes] = []
        self.parts: list[Any] = []
        self.torch = sys.modules.get("torch")

    def add(self, x: Any, where: str, depth: int) -> None:
        t = type(x)
        lay, parts = self.layout, self.parts
        if t is int:
            if _INT64_MIN <= x <= _INT64_MAX:
                lay.append(b"i")
                parts.append(_I64.pack(x))
            else:
                raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
                lay.append(b"I")
                parts.append(_U32.pack(len(raw)))
                parts.append(raw)
        elif t is float:
            lay.append(b"f")
            parts.append(_F64.pack(x))
        elif t is bool:
            lay.append(b"b")
            parts.append(b"\x01" if x else b"\x00")
        elif x is None:
            lay.append(b"n")
        elif t is str:
            raw = x.encode("utf-8", "surrogatepass")
            lay.append(b"s")
            parts.append(_U32.pack(len(raw)))
            parts.append(raw)
        elif t is bytes:
            lay.append(b"y")
            parts.append(_U32.pack(len(x)))
            parts.append(x)
        elif t is tuple or t is list:
            if depth >= MAX_DEPTH:
                raise UnsupportedSampleError(f"{where}: nested deeper than {MAX_DEPTH} levels")
            lay.append((b"t" if t is tuple else b"l") + _U32.pack(len(x)))
            for i, v in enumerate(x):
                self.add(v, f"{where}[{i}]", depth + 1)
        elif t is dict:
            if depth >= MAX_DEPTH:
                raise UnsupportedSampleError(f"{where}: nested deeper than {MAX_DEPTH} levels")
            lay.append(b"d" + _U32.pack(len(x)))
            for k, v in x.items():
                if type(k) is not str:
                    raise UnsupportedSampleError(
                        f"{where}: dict key {k!r} is {type(k).__name__}; only str keys are supported"
                    )
                kb = k.encode("utf-8", "surrogatepass")
                if len(kb) > 0xFFFF:
                    raise UnsupportedSampleError(f"{where}: dict key longer than 65535 bytes")
                lay.append(_U16.pack(len(kb)) + kb)
                self.add(v, f"{where}[{k!r}]", depth + 1)
        elif isinstance(x, np.ndarray) and t not in _REJECTED_ARRAYS:
            self.add_array(b"A", x, None, where)
        elif isinstance(x, np.generic):
            arr = np.asarray(x).reshape(1)
            dt = arr.dtype
            if dt.hasobject:
                raise UnsupportedSampleError(f"{where}: numpy scalar of object dtype")
            if dt.itemsize == 0:
                # np.bytes_(b"") / np.str_("") have itemsize 0, which np.frombuffer
                # cannot read back: store them with the smallest real width.
                if dt.kind not in "SU":
                    raise UnsupportedSampleError(f"{where}: numpy scalar of zero-size dtype {dt}")
                arr = arr.astype(dt.kind + "1")
                dt = arr.dtype
            desc = _dtype_to_str(dt, where)
            lay.append(b"g" + _U8.pack(len(desc)) + desc)
            parts.append(arr.view(np.uint8).tobytes())
        elif self.torch is not None and isinstance(x, self.torch.Tensor):
            self.add_tensor(x, where)
        else:
            raise UnsupportedSampleError(
                f"{where}: {t.__module__}.{t.__qualname__} is not a supported sample type "
                "(supported: tuple, list, dict with str keys, torch.Tensor, np.ndarray, "
                "numpy scalars, int, float, bool, None, str, bytes)"
            )

    def add_tensor(self, x: Any, where: str) -> None:
        torch = self.torch
        if x.layout != torch.strided or x.is_quantized or x.is_nested:
            raise UnsupportedSampleError(f"{where}: {x.layout} / quantized / nested tensors are not supported")
        if x.device.type == "meta":
            raise UnsupportedSampleError(f"{where}: a meta tensor has no data")
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        x = x.resolve_conj().resolve_neg()
        name = str(x.dtype).removeprefix("torch.")
        if name in TORCH_NATIVE:
            arr = x.contiguous().numpy()
        else:
            raw = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}.get(x.element_size())
            if raw is None:
                raise UnsupportedSampleError(f"{where}: tensor dtype {x.dtype} is not supported")
            # View as raw integers before copying: torch has no copy kernel for the
            # sub-byte dtypes (int1..uint7), and complex32's warns it is experimental.
            arr = x.view(raw).contiguous().numpy()
        self.add_array(b"P" + _U8.pack(len(name)) + name.encode(), arr, name, where)

    def add_array(self, tag: bytes, x: np.ndarray, torch_name: str | None, where: str) -> None:
        dt = x.dtype
        if dt.hasobject:
            raise UnsupportedSampleError(f"{where}: numpy array of object dtype (would need pickle)")
        if not x.flags.c_contiguous:
            x = x.copy(order="C")  # np.ascontiguousarray would turn 0-d into 1-d
        if x.ndim > MAX_NDIM:
            raise UnsupportedSampleError(f"{where}: arrays of more than 32 dimensions are not supported")
        desc = _dtype_to_str(dt, where)
        shape = x.shape
        header = _npy_header(dt, shape)
        self.layout.append(
            tag + _U8.pack(len(desc)) + desc + _U8.pack(len(shape))
            + b"".join(_U64.pack(d) for d in shape) + _U32.pack(len(header))
        )
        self.parts.append(header)
        if x.nbytes:
            raw = x.reshape(-1).view(np.uint8)
            # (n, itemsize) bytes: joins as the array's bytes, and tells compression the item size
            self.parts.append(raw.reshape(-1, dt.itemsize) if dt.itemsize > 1 else raw)


_REJECTED_ARRAYS = (np.ma.MaskedArray, np.matrix)


def _dtype_to_str(dt: np.dtype, where: str = "sample") -> bytes:
    if dt.fields is None and dt.subdtype is None:
        s = dt.str
    else:
        s = repr(np.lib.format.dtype_to_descr(dt))
    try:
        raw = s.encode("ascii")
    except UnicodeEncodeError:
        raise UnsupportedSampleError(f"{where}: dtype {dt} has non-ASCII field names") from None
    if len(raw) > 255:
        raise UnsupportedSampleError(f"{where}: dtype {dt} has a description longer than 255 bytes")
    return raw


_NPY_HEADERS: dict[tuple, bytes] = {}


def _npy_header(dt: np.dtype, shape: tuple) -> bytes:
    key = (dt, shape)
    h = _NPY_HEADERS.get(key)
    if h is None:
        buf = io.BytesIO()
        d = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": shape}
        try:
            np.lib.format.write_array_header_1_0(buf, d)
        except ValueError:  # header too long for format 1.0
            buf = io.BytesIO()
            np.lib.format.write_array_header_2_0(buf, d)
        h = buf.getvalue()
        if len(_NPY_HEADERS) > 4096:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = h
    return h


class _Slow(Exception):
    """The fast encoder met something it does not handle: rerun the full encoder."""


# (dtype, shape) -> (layout fragment after the tag, npy header), for arrays the fast
# encoder has seen (dtype and shape already checked by the full encoder's rules).
_ARRAY_FRAGS: dict[tuple, tuple[bytes, bytes]] = {}
_TORCH_TAGS: dict[Any, bytes] = {}  # torch dtype -> b"P" + name (native dtypes only)
_I64_pack, _U32_pack = _I64.pack, _U32.pack
_LARGE = 64 << 10  # records above this are joined into a bytearray (see encode)


def _array_frag(x: np.ndarray) -> tuple[bytes, bytes]:
    key = (x.dtype, x.shape)
    frag = _ARRAY_FRAGS.get(key)
    if frag is None:
        dt = x.dtype
        if dt.hasobject or x.ndim > MAX_NDIM:
            raise _Slow
        try:
            desc = _dtype_to_str(dt)
        except UnsupportedSampleError:
            raise _Slow from None
        shape = x.shape
        header = _npy_header(dt, shape)
        frag = (_U8.pack(len(desc)) + desc + _U8.pack(len(shape))
                + b"".join(_U64.pack(d) for d in shape) + _U32.pack(len(header)), header)
        if len(_ARRAY_FRAGS) >= 4096:
            _ARRAY_FRAGS.clear()
        _ARRAY_FRAGS[key] = frag
    return frag


def _fast(x: Any, lay: list, parts: list, depth: int) -> int:
    """The common sample types, with no path bookkeeping: anything unusual (or any
    error) raises ``_Slow`` and the full encoder reruns to encode it or name the place.
    Returns the bytes of array data appended (to pick how to join the record)."""
    t = type(x)
    if t is np.ndarray:
        frag, header = _array_frag(x)
        if not x.flags.c_contiguous:
            x = x.copy(order="C")
        lay.append(b"A" + frag)
        parts.append(header)
        n = x.nbytes
        if n:
            parts.append(x)
        return n
    n = 0
    if t is int:
        if not _INT64_MIN <= x <= _INT64_MAX:
            raise _Slow
        lay.append(b"i")
        parts.append(_I64_pack(x))
    elif t is tuple or t is list:
        if depth >= MAX_DEPTH:
            raise _Slow
        lay.append((b"t" if t is tuple else b"l") + _U32_pack(len(x)))
        for v in x:
            n += _fast(v, lay, parts, depth + 1)
    elif t is dict:
        if depth >= MAX_DEPTH:
            raise _Slow
        lay.append(b"d" + _U32_pack(len(x)))
        for k, v in x.items():
            if type(k) is not str:
                raise _Slow
            kb = k.encode("utf-8", "surrogatepass")
            if len(kb) > 0xFFFF:
                raise _Slow
            lay.append(_U16.pack(len(kb)) + kb)
            n += _fast(v, lay, parts, depth + 1)
    elif t is float:
        lay.append(b"f")
        parts.append(_F64.pack(x))
    elif t is bool:
        lay.append(b"b")
        parts.append(b"\x01" if x else b"\x00")
    elif x is None:
        lay.append(b"n")
    elif t is str:
        raw = x.encode("utf-8", "surrogatepass")
        lay.append(b"s")
        parts.append(_U32_pack(len(raw)))
        parts.append(raw)
    elif t is bytes:
        lay.append(b"y")
        parts.append(_U32_pack(len(x)))
        parts.append(x)
    else:
        torch = sys.modules.get("torch")
        if torch is None or t is not torch.Tensor:
            raise _Slow
        tag = _TORCH_TAGS.get(x.dtype)
        if tag is None:
            name = str(x.dtype).removeprefix("torch.")
            if name not in TORCH_NATIVE:
                raise _Slow
            tag = _TORCH_TAGS[x.dtype] = b"P" + _U8.pack(len(name)) + name.encode()
        if x.layout is not torch.strided or x.device.type != "cpu":
            raise _Slow
        try:
            # Refuses (RuntimeError / TypeError) tensors needing grad, conj or neg bits.
            a = x.numpy()
        except (RuntimeError, TypeError, ValueError):
            raise _Slow from None
        frag, header = _array_frag(a)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        lay.append(tag + frag)
        parts.append(header)
        n = a.nbytes
        if n:
            parts.append(a)
    return n


def encode(sample: Any, fp_id: int, index: int | None = None,
           compression: Compression | None = None) -> tuple[bytes, bytes, int]:
    """Encode ``sample`` into a record; with ``index`` (the key it will be stored at) a
    KEYED record, whose checksum is seeded with the index (see :mod:`kvcache.codec`).
    With ``compression`` each array leaf's data is compressed on its own (a PACKED
    record, :mod:`kvcache.compression`), unless no leaf shrinks by 10 %.

    Returns ``(record, layout, checksum)``: the record (``bytes``, or a ``bytearray``
    for records over 64 KiB, which avoids a second copy of the payload), the layout
    (the sample's structure, kept in the metadata row too) and the record's checksum.

    Raises:
        UnsupportedSampleError: the sample holds a value the codec cannot store; the
            message names where it is (``sample[1]['meta']: Foo``).
    """
    lay: list[bytes] = []
    parts: list[Any] = []
    try:
        size = _fast(sample, lay, parts, 0)
    except _Slow:
        enc = _Encoder()
        enc.add(sample, "sample", 0)
        lay, parts = enc.layout, enc.parts
        size = sum(memoryview(p).nbytes for p in parts)
    layout = b"".join(lay)
    tail = _TAIL.pack(fp_id, len(layout))
    flags, seed = (0, 0) if index is None else (KEYED, index)
    if compression is not None:
        packed = _page_aware(parts, compression, 24 + len(layout), size)
        if packed is not None:
            body = b"".join([tail, layout, packed])
            checksum = _checksum(body, seed)
            return b"".join([_PREFIX.pack(MAGIC, flags | PACKED, checksum), body]), layout, checksum
    if size < _LARGE:
        body = b"".join([tail, layout, *parts])
        checksum = _checksum(body, seed)
        return b"".join([_PREFIX.pack(MAGIC, flags, checksum), body]), layout, checksum
    # One copy of a large payload: join into a bytearray, hash it in place.
    record = bytearray().join([_PREFIX.pack(MAGIC, flags, 0), tail, layout, *parts])
    checksum = _checksum(memoryview(record)[16:], seed)
    _PREFIX.pack_into(record, 0, MAGIC, flags, checksum)
    return record, layout, checksum


def _page_aware(parts: list[Any], comp: Compression, head: int, size: int) -> bytes | None:
    """:func:`kvcache.compression.pack`, with LMDB's pages in mind: a record over 2 KiB
    takes whole 4 KiB pages, so one just past a page boundary (NEAR) tries a stronger
    level, and one that would stay uncompressed is compressed anyway where that saves a
    whole page (the 10 % rule saves decoding time on records whose bytes barely shrink;
    a page is more than that). Only records up to NEAR_MAX try (a page is at least 6 % of
    them; a stronger level costs more on a big record than one page saves). Whichever
    takes fewer pages wins; ties keep the first."""
    packed = pack(parts, comp)
    plain = head + size
    n = head + len(packed) if packed is not None else plain
    over = n + 16 - (pages(n) - 1) * PAGE if pages(n) else PAGE
    if pages(n) and over <= NEAR and n <= NEAR_MAX:
        better = pack(parts, comp.stronger(), 1.0)
        if better is not None and pages(head + len(better)) < pages(n):
            return better
        if packed is None:
            anyway = pack(parts, comp, 1.0)
            if anyway is not None and pages(head + len(anyway)) < pages(plain):
                return anyway
    return packed


NEAR_MAX = 64 << 10
_PREFIX = struct.Struct("<4sIQ")
_TAIL = struct.Struct("<II")
