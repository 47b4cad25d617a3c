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

import io
import struct
import sys
from typing import Any

import numpy as np
import xxhash

from .errors import CorruptRecordError, UnsupportedSampleError
from .layout import (
    _PLANS,
    F64,
    I64,
    MAX_DEPTH,
    MAX_NDIM,
    TORCH_NATIVE,
    U8,
    U16,
    U32,
    U64,
    LayoutError,
    LeafInfo,
    describe,
    plan_for,
)

__all__ = [
    "CODEC_VERSION",
    "HEADER_SIZE",
    "LeafInfo",
    "StaleRecord",
    "checksum_ok",
    "decode",
    "describe_layout",
    "encode",
    "read_header",
    "record_layout",
]

CODEC_VERSION = 1
MAGIC = b"KVC" + bytes([CODEC_VERSION])
HEADER = struct.Struct("<4sIQII")
HEADER_SIZE = HEADER.size  # 24

_U8, _U16, _U32, _U64, _I64, _F64 = U8, U16, U32, U64, I64, F64
_checksum = xxhash.xxh3_64_intdigest

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# --------------------------------------------------------------------------- encode


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
            self.parts.append(x.reshape(-1).view(np.uint8).data)


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


def encode(sample: Any, fp_id: int) -> tuple[bytes, bytes, int]:
    """Encode ``sample`` into a record.

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
    if size < _LARGE:
        body = b"".join([tail, layout, *parts])
        checksum = _checksum(body)
        return b"".join([_PREFIX.pack(MAGIC, 0, checksum), body]), layout, checksum
    # One copy of a large payload: join into a bytearray, hash it in place.
    record = bytearray().join([_PREFIX.pack(MAGIC, 0, 0), tail, layout, *parts])
    checksum = _checksum(memoryview(record)[16:])
    _PREFIX.pack_into(record, 0, MAGIC, 0, checksum)
    return record, layout, checksum


_PREFIX = struct.Struct("<4sIQ")
_TAIL = struct.Struct("<II")


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
