"""Layouts: the structure of a sample (containers, leaf types, dtypes and shapes), as
written by :mod:`kvcache.codec`, and their parsing into a small node tree.

:mod:`kvcache.plans` turns a parsed layout into the plan that decodes a record's payload.
Parsing is bounds-checked: malformed layout bytes raise :class:`LayoutError`.
"""

from __future__ import annotations

import ast
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LayoutError", "LeafInfo", "describe", "parse"]

MAX_DEPTH = 64
MAX_NDIM = 32
U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
I64 = struct.Struct("<q")
F64 = struct.Struct("<d")

# Torch dtypes numpy holds natively; every other torch dtype (bfloat16, float8s,
# complex32, ...) is stored as the unsigned integer of the same width and viewed back.
TORCH_NATIVE = frozenset((
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
))
RAW_BY_SIZE = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

_torch: Any = None


def import_torch() -> Any:
    """torch, imported on first use (so ``import kvcache.codec`` stays light)."""
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    return _torch


def torch_in_use() -> Any:
    """What decoding uses as torch: the module, a stand-in (:func:`use_torch`), or None
    before the first tensor leaf."""
    return _torch


def use_torch(module: Any) -> None:
    """Make decoding use ``module`` as torch (None: import the real one when next needed).

    The verify child decodes tensor leaves as numpy arrays through a stand-in: it checks
    bytes, not tensors, and importing torch costs about a second per child.
    """
    global _torch
    _torch = module


class LayoutError(Exception):
    """Malformed layout or payload (internal; the codec turns it into CorruptRecordError)."""


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a sample's layout: where it is, its kind, dtype and shape."""

    path: str
    kind: str  # tensor, ndarray, int, float, bool, None, str, bytes, npscalar
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def summary(self) -> str:
        """``uint8[3,32,32]`` for arrays, the kind for scalars."""
        if self.shape is None:
            return self.dtype or self.kind
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


# --------------------------------------------------------------------------- parsing


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def take(self, n: int) -> bytes:
        p = self.pos
        if p + n > self.end:
            raise LayoutError("layout truncated")
        self.pos = p + n
        return self.buf[p : p + n]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return U64.unpack(self.take(8))[0]


_DTYPES: dict[bytes, np.dtype] = {}


def parse_dtype(raw: bytes) -> np.dtype:
    dt = _DTYPES.get(raw)
    if dt is None:
        s = raw.decode("ascii")
        if s.startswith("["):
            # A structured dtype's descr list: parsed as a literal, never evaluated.
            dt = np.lib.format.descr_to_dtype(ast.literal_eval(s))
        else:
            dt = np.dtype(s)
        if dt.hasobject:
            raise LayoutError("object dtype in a record")
        if dt.itemsize == 0 and dt.kind in "SU":
            # np.empty gives S0/U0 a real itemsize: a forged shape would allocate
            # without bound. The codec never writes them (numpy holds no S0 arrays).
            raise LayoutError("zero-size string dtype in a record")
        if len(_DTYPES) < 1024:
            _DTYPES[raw] = dt
    return dt


# Node kinds. Leaves: ("int",) ("float",) ("bool",) ("none",) ("str",) ("bytes",)
# ("bigint",) ("npscalar", dtype) ("array", dtype, shape, count, hlen, nbytes, tname).
# Containers: ("tuple", kids) ("list", kids) ("dict", keys, kids).
_SIMPLE = {b"i": "int", b"f": "float", b"b": "bool", b"n": "none", b"s": "str", b"y": "bytes", b"I": "bigint"}
_KIND_NAMES = {"int": "int", "float": "float", "bool": "bool", "none": "None", "str": "str",
               "bytes": "bytes", "bigint": "int"}


def _parse(r: _Reader, depth: int, path: str, leaves: list[LeafInfo] | None) -> tuple:
    if depth > MAX_DEPTH:
        raise LayoutError("layout nested too deep")
    tag = r.take(1)
    kind = _SIMPLE.get(tag)
    if kind is not None:
        if leaves is not None:
            leaves.append(LeafInfo(path, _KIND_NAMES[kind]))
        return (kind,)
    if tag in (b"t", b"l"):
        n = r.u32()
        if n > r.end - r.pos:  # every child takes at least one layout byte
            raise LayoutError("container length exceeds the layout")
        kids = tuple(_parse(r, depth + 1, f"{path}[{i}]", leaves) for i in range(n))
        return ("tuple" if tag == b"t" else "list", kids)
    if tag == b"d":
        n = r.u32()
        if n > r.end - r.pos:
            raise LayoutError("dict length exceeds the layout")
        keys, kids = [], []
        for _ in range(n):
            k = r.take(r.u16()).decode("utf-8", "surrogatepass")
            keys.append(k)
            kids.append(_parse(r, depth + 1, f"{path}[{k!r}]", leaves))
        if len(set(keys)) != len(keys):
            raise LayoutError("duplicate dict key")
        return ("dict", tuple(keys), tuple(kids))
    if tag == b"g":
        dt = parse_dtype(r.take(r.u8()))
        if leaves is not None:
            leaves.append(LeafInfo(path, "npscalar", str(dt)))
        return ("npscalar", dt)
    if tag in (b"A", b"P"):
        tname = r.take(r.u8()).decode("ascii") if tag == b"P" else None
        dt = parse_dtype(r.take(r.u8()))
        ndim = r.u8()
        if ndim > MAX_NDIM:
            raise LayoutError("too many dimensions")
        shape = tuple(r.u64() for _ in range(ndim))
        hlen = r.u32()
        count = 1
        for d in shape:
            count *= d
        if leaves is not None:
            leaves.append(LeafInfo(path, "tensor" if tname else "ndarray", tname or str(dt), shape))
        return ("array", dt, shape, count, hlen, count * dt.itemsize, tname)
    raise LayoutError(f"unknown layout tag {tag!r}")


def parse(layout: bytes, leaves: list[LeafInfo] | None = None) -> tuple:
    r = _Reader(layout)
    node = _parse(r, 0, "sample", leaves)
    if r.pos != r.end:
        raise LayoutError("trailing bytes after the layout")
    return node


def describe(layout: bytes) -> list[LeafInfo]:
    """The leaves of a layout, depth first (raises LayoutError on malformed bytes)."""
    leaves: list[LeafInfo] = []
    parse(layout, leaves)
    return leaves
