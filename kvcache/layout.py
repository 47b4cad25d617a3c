"""Layouts: the structure of a sample (containers, leaf types, dtypes, shapes), and the
plans that decode a record's payload from it.

A layout is bytes written by :mod:`kvcache.codec`. It is parsed into a small node tree
and turned into a *plan*, ``plan(record, pos) -> sample`` (it also checks that the
payload ends exactly at the record's end). A plan is first a tree of
closures (cheap to build); once a layout has been seen a few times, it is compiled
into one straight-line Python function, which is what makes a cached read cost a few
microseconds. Only integers and generated names enter the compiled source: dtypes,
shapes and dict keys are passed in as bound constants, so bytes from a file never
become code.

Every read is bounds-checked (``struct`` and ``np.frombuffer`` refuse to read past the
buffer, and the caller checks that the plan consumed exactly the record), so malformed
layouts and payloads raise, and never allocate more than the record holds.
"""

from __future__ import annotations

import ast
import struct
import types
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["LayoutError", "LeafInfo", "describe", "plan_for"]

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


# --------------------------------------------------------------------------- leaf helpers


def _sized(buf: Any, pos: int) -> tuple[bytes, int]:
    (n,) = U32.unpack_from(buf, pos)
    start = pos + 4
    end = start + n
    if end > len(buf):
        raise LayoutError("value runs past the record")
    return bytes(buf[start:end]), end


def _str(buf: Any, pos: int) -> tuple[str, int]:
    raw, pos = _sized(buf, pos)
    return raw.decode("utf-8", "surrogatepass"), pos


def _bigint(buf: Any, pos: int) -> tuple[int, int]:
    raw, pos = _sized(buf, pos)
    return int.from_bytes(raw, "little", signed=True), pos


_BOOL = (False, True)


def _torch_view(tname: str, dt: np.dtype) -> tuple[Callable, Any]:
    """``(torch.from_numpy, view dtype or None)`` for a tensor leaf, validated."""
    torch = import_torch()
    tdt = getattr(torch, tname, None)
    if not isinstance(tdt, torch.dtype):
        raise LayoutError(f"unknown torch dtype {tname!r}")
    if tname in TORCH_NATIVE:
        return torch.from_numpy, None
    if RAW_BY_SIZE.get(dt.itemsize) != dt or tdt.itemsize != dt.itemsize:
        raise LayoutError(f"bad storage dtype {dt} for torch.{tname}")
    return torch.from_numpy, tdt


# --------------------------------------------------------------------------- interpreter


def _interp(node: tuple) -> Callable:
    """A plan as a tree of closures: quick to build, slower to run than a compiled one."""
    kind = node[0]
    if kind == "int":
        return lambda buf, pos: (I64.unpack_from(buf, pos)[0], pos + 8)
    if kind == "float":
        return lambda buf, pos: (F64.unpack_from(buf, pos)[0], pos + 8)
    if kind == "bool":
        return lambda buf, pos: (_BOOL[buf[pos]], pos + 1)
    if kind == "none":
        return lambda buf, pos: (None, pos)
    if kind == "str":
        return _str
    if kind == "bytes":
        return _sized
    if kind == "bigint":
        return _bigint
    if kind == "npscalar":
        dt = node[1]
        return lambda buf, pos: (np.frombuffer(buf, dt, 1, pos)[0].copy(), pos + dt.itemsize)
    if kind == "array":
        _, dt, shape, count, hlen, nbytes, tname = node
        from_numpy, view = _torch_view(tname, dt) if tname else (None, None)

        def arr(buf: Any, pos: int) -> tuple[Any, int]:
            start = pos + hlen
            if nbytes:
                a = np.frombuffer(buf, dt, count, start).reshape(shape).copy()
            else:
                a = np.empty(shape, dt)
            if from_numpy is not None:
                a = from_numpy(a)
                if view is not None:
                    a = a.view(view)
            return a, start + nbytes

        return arr
    if kind in ("tuple", "list"):
        kids = tuple(_interp(k) for k in node[1])
        make = tuple if kind == "tuple" else list

        def seq(buf: Any, pos: int) -> tuple[Any, int]:
            out = []
            for k in kids:
                v, pos = k(buf, pos)
                out.append(v)
            return make(out), pos

        return seq
    keys, kids = node[1], tuple(_interp(k) for k in node[2])

    def mapping(buf: Any, pos: int) -> tuple[dict, int]:
        out = {}
        for key, k in zip(keys, kids):
            out[key], pos = k(buf, pos)
        return out, pos

    return mapping


# --------------------------------------------------------------------------- compiler


class _Gen:
    """Emits one straight-line function for a layout. Offsets are static (``p+K``) until
    a variable-size leaf (str, bytes, big int) moves ``p``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.off = 0
        self.n = 0

    def const(self, value: Any) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        return name

    def at(self) -> str:
        return f"p+{self.const(self.off)}" if self.off else "p"

    def leaf(self, expr: str, size: int) -> str:
        name = f"v{self.n}"
        self.n += 1
        self.lines.append(f"{name} = {expr}")
        self.off += size
        return name

    def moving(self, fn: str) -> str:
        name = f"v{self.n}"
        self.n += 1
        self.lines.append(f"{name}, p = {fn}(buf, {self.at()})")
        self.off = 0
        return name

    def emit(self, node: tuple) -> str:
        kind = node[0]
        if kind == "int":
            return self.leaf(f"_i64(buf, {self.at()})[0]", 8)
        if kind == "float":
            return self.leaf(f"_f64(buf, {self.at()})[0]", 8)
        if kind == "bool":
            return self.leaf(f"_bool[buf[{self.at()}]]", 1)
        if kind == "none":
            return "None"
        if kind in ("str", "bytes", "bigint"):
            return self.moving({"str": "_str", "bytes": "_sized", "bigint": "_bigint"}[kind])
        if kind == "npscalar":
            dt = self.const(node[1])
            return self.leaf(f"_fb(buf, {dt}, 1, {self.at()})[0].copy()", node[1].itemsize)
        if kind == "array":
            _, dt, shape, count, hlen, nbytes, tname = node
            self.off += hlen
            if nbytes and len(shape) == 1:
                expr = f"_fb(buf, {self.const(dt)}, {self.const(count)}, {self.at()}).copy()"
            elif nbytes:
                # ndarray(shape, dtype, buffer, offset): one call instead of
                # frombuffer + reshape, and it refuses to read past the buffer too.
                expr = f"_nd({self.const(shape)}, {self.const(dt)}, buf, {self.at()}).copy()"
            else:
                expr = f"_empty({self.const(shape)}, {self.const(dt)})"
            if tname:
                from_numpy, view = _torch_view(tname, dt)
                expr = f"{self.const(from_numpy)}({expr})"
                if view is not None:
                    expr += f".view({self.const(view)})"
            return self.leaf(expr, nbytes)
        if kind in ("tuple", "list"):
            items = [self.emit(k) for k in node[1]]
            if kind == "tuple":
                return "(" + "".join(f"{v}, " for v in items) + ")"
            return "[" + ", ".join(items) + "]"
        pairs = [(self.const(k), self.emit(kid)) for k, kid in zip(node[1], node[2])]
        return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


_GLOBALS = {
    "_i64": I64.unpack_from, "_f64": F64.unpack_from, "_bool": _BOOL, "_fb": np.frombuffer,
    "__builtins__": __builtins__, "_empty": np.empty, "_nd": np.ndarray, "_str": _str, "_sized": _sized, "_bigint": _bigint, "_LE": LayoutError,
}


def _compile(node: tuple, whole: bool = False) -> Callable:
    """One straight-line function for ``node``: ``plan(buf, p) -> (sample, end)``, or
    with ``whole`` ``plan(buf, p) -> sample`` that checks the payload ends at the
    record's end (a fixed-size layout checks the length before reading anything)."""
    g = _Gen()
    result = g.emit(node)
    lines = g.lines
    if not whole:
        tail = f"    return {result}, {g.at()}\n"
    elif not any(", p = " in line for line in lines):
        # Fixed size: one length check up front, before any leaf is allocated.
        lines = [f"if len(buf) != p+{g.const(g.off)}: raise _LE('record length does not match its layout')",
                 *lines]
        tail = f"    return {result}\n"
    else:
        tail = (f"    if {g.at()} != len(buf): raise _LE('record length does not match its layout')\n"
                f"    return {result}\n")
    body = "\n".join(f"    {line}" for line in lines)
    # Every value (offsets, counts, dtypes, shapes, keys) is a default argument, so all
    # layouts of one structure (e.g. ragged arrays of any length) share one code object:
    # it is compiled once and stays warm in the interpreter's caches.
    params = "".join(f", {name}=None" for name in g.consts)
    src = f"def plan(buf, p{params}):\n{body}\n{tail}"
    code = _CODE.get(src)
    if code is None:
        namespace = dict(_GLOBALS)
        exec(compile(src, "<kvcache plan>", "exec"), namespace)
        code = namespace["plan"].__code__
        if len(_CODE) >= PLAN_CACHE_MAX:
            _CODE.clear()
        _CODE[src] = code
    return types.FunctionType(code, _GLOBALS, "plan", tuple(g.consts.values()))


_CODE: dict[str, Any] = {}  # generated source -> code object


def _leaf_count(node: tuple) -> int:
    kind = node[0]
    if kind in ("tuple", "list"):
        return sum(_leaf_count(k) for k in node[1])
    if kind == "dict":
        return sum(_leaf_count(k) for k in node[2])
    return 1


# --------------------------------------------------------------------------- plan cache

_PLANS: dict[bytes, Callable] = {}
PLAN_CACHE_MAX = 4096
COMPILE_AFTER = 3  # uses of one layout before it is compiled
COMPILE_MAX_LEAVES = 256  # bigger layouts stay interpreted (compiling them costs more)


def _whole(step: Callable) -> Callable:
    """An interpreted plan as ``plan(buf, pos) -> sample`` that checks the record's end."""

    def plan(buf: Any, pos: int) -> Any:
        value, end = step(buf, pos)
        if end != len(buf):
            raise LayoutError("record length does not match its layout")
        return value

    return plan


def plan_for(layout: bytes) -> Callable:
    """The plan for ``layout``: cached, interpreted at first, compiled once it is hot.

    A plan is ``plan(record, body_offset) -> sample``; it raises (LayoutError, or the
    struct/numpy error of an out-of-bounds read) unless the payload fills the record
    exactly.
    """
    plan = _PLANS.get(layout)
    if plan is not None:
        return plan
    node = parse(layout)
    interp = _whole(_interp(node))
    if len(_PLANS) >= PLAN_CACHE_MAX:
        _PLANS.clear()
    if _leaf_count(node) > COMPILE_MAX_LEAVES:
        _PLANS[layout] = interp
        return interp
    uses = 0

    def warming(buf: Any, pos: int) -> tuple[Any, int]:
        nonlocal uses
        uses += 1
        if uses == COMPILE_AFTER:
            _PLANS[layout] = _compile(node, whole=True)
        return interp(buf, pos)

    _PLANS[layout] = warming
    return warming
