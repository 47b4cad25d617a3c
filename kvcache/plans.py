"""Plans: what decodes a record's payload, made from its parsed layout
(:mod:`kvcache.layout`).

A parsed layout is turned into a *plan*, ``plan(record, pos) -> sample`` (it also
checks that the payload ends exactly at the record's end). A plan is first a tree of
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

import types
from typing import Any, Callable

import numpy as np

from .layout import (
    F64,
    I64,
    RAW_BY_SIZE,
    TORCH_NATIVE,
    U32,
    LayoutError,
    import_torch,
    parse,
)

__all__ = ["COMPILE_AFTER", "PLANS", "PLAN_CACHE_MAX", "plan_for"]


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

PLANS: dict[bytes, Callable] = {}  # layout bytes -> plan; codec.decode looks plans up here directly
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


def _fixed_size(node: tuple) -> int | None:
    """The payload bytes of a layout without variable-size leaves (str, bytes, big int);
    None for one with them."""
    kind = node[0]
    if kind in ("int", "float"):
        return 8
    if kind == "bool":
        return 1
    if kind == "none":
        return 0
    if kind == "npscalar":
        return node[1].itemsize
    if kind == "array":
        return node[4] + node[5]
    if kind in ("tuple", "list", "dict"):
        total = 0
        for k in node[2] if kind == "dict" else node[1]:
            n = _fixed_size(k)
            if n is None:
                return None
            total += n
        return total
    return None


def plan_for(layout: bytes) -> Callable:
    """The plan for ``layout``: cached, interpreted at first, compiled once it is hot.

    A plan is ``plan(record, body_offset) -> sample``; it raises (LayoutError, or the
    struct/numpy error of an out-of-bounds read) unless the payload fills the record
    exactly. Its ``fixed`` attribute is the payload's size where the layout fixes it
    (no str, bytes or big int leaf), else None: a reader may check a record's length
    against it and hash the record before the plan copies it out.
    """
    plan = PLANS.get(layout)
    if plan is not None:
        return plan
    node = parse(layout)
    fixed = _fixed_size(node)
    interp = _whole(_interp(node))
    interp.fixed = fixed  # type: ignore[attr-defined]
    if len(PLANS) >= PLAN_CACHE_MAX:
        PLANS.clear()
    if _leaf_count(node) > COMPILE_MAX_LEAVES:
        PLANS[layout] = interp
        return interp
    uses = 0

    def warming(buf: Any, pos: int) -> tuple[Any, int]:
        nonlocal uses
        uses += 1
        if uses == COMPILE_AFTER:
            compiled = _compile(node, whole=True)
            compiled.fixed = fixed  # type: ignore[attr-defined]
            PLANS[layout] = compiled
        return interp(buf, pos)

    warming.fixed = fixed  # type: ignore[attr-defined]
    PLANS[layout] = warming
    return warming
