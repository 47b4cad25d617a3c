"""Fingerprints: what identifies the source that filled a cache.

By default a fingerprint is made of:

* ``class``: the source's class (module and qualified name);
* ``length``: ``len(source)``;
* ``source_hash``: a hash of its class's source code where Python can read it (read
  once per class and process: ``inspect.getsource`` costs milliseconds);
* ``state``: a hash of the source's own attributes (``vars(source)``) whose values are
  plain data: ``int``, ``float``, ``bool``, ``None``, ``str``, ``bytes``, paths
  (``os.PathLike``), and tuples, lists and dicts (string or number keys) of these, to
  any depth. These are the constructor's arguments as datasets keep them (a root
  folder, a shape, a list of file paths), so a changed argument changes the fingerprint.
  Left out, by name in ``state_left_out``: attributes holding anything else (tensors,
  arrays, other objects, functions, open files: not hashable cheaply and
  deterministically), containers of more than ``MAX_ITEMS`` values that are not flat
  columns of one plain type, and attributes named in the source class's
  ``kvcache_fingerprint_exclude`` (a tuple of names: for an attribute that does not
  change the samples, such as a data root that moves between machines);
* ``version``: the user's ``version=`` salt.

A keyed source (``key=``) leaves the length out (appending or removing items keeps the
cache: each record is found by its key), its ``state`` leaves out attributes holding a list
or a dict (the items and what is known about them: they change when items are added) and
an int equal to its length (a count of items); a shape or mean as a tuple, a root, a size
stay covered, and it adds ``"keyed": True``, so a cache filled by
index and one filled by key never share a fingerprint.

``fingerprint=`` replaces all of that with the user's own string. The parts are stored
in the cache, so a mismatch can say which part changed.

Cost: a flat list of 10^6 file paths costs about 2x a ``sum(range(10**7))`` on the same
core, and 10^6 ``(path, label)`` tuples besides (hashed column by column) 4.4x
(``tools/bench_fingerprint.py``); a dataset computes it once when constructed and hands
it to its DataLoader workers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import linecache
import os
import re
import weakref
from array import array
from operator import itemgetter
from typing import Any

import xxhash

__all__ = ["MAX_ITEMS", "class_source", "compute_parts", "diff_parts", "digest", "state_hash"]

MAX_ITEMS = 100_000  # values walked one by one per attribute (flat columns have no limit)
_SCALARS = (int, float, bool, type(None), str, bytes)
_CLASS_HASH: "weakref.WeakKeyDictionary[type, str | None]" = weakref.WeakKeyDictionary()


def _class_source_hash(cls: type) -> str | None:
    try:
        return _CLASS_HASH[cls]
    except (KeyError, TypeError):
        pass
    try:
        src = class_source(cls)
    except (OSError, TypeError):
        h = None
    else:
        h = hashlib.sha256(src.encode()).hexdigest()[:16]
    try:
        _CLASS_HASH[cls] = h
    except TypeError:
        pass
    return h


def class_source(cls: type) -> str:
    """``inspect.getsource(cls)``, the same text, without parsing the whole module.

    Before Python 3.13, ``inspect`` finds a class by parsing its entire module with
    ``ast`` (90 ms for a 450-line file, in every process that opens a cache). Here the
    class statement is the nearest ``class Name`` line above the first method defined in
    its body (``co_firstlineno``), and ``inspect.getblock`` reads that block alone. A
    decorated class, one without methods, or anything unexpected falls back to
    ``inspect.getsource``.
    """
    firsts = []
    for v in vars(cls).values():
        f = getattr(v, "__func__", v)  # classmethod / staticmethod
        code = getattr(f, "__code__", None)
        if code is not None and getattr(f, "__qualname__", "").startswith(cls.__qualname__ + "."):
            firsts.append(code.co_firstlineno)
    file = inspect.getsourcefile(cls) if firsts else None
    lines = linecache.getlines(file, vars(inspect.getmodule(cls) or object)) if file else []
    first = min(firsts) - 1 if firsts else -1
    if 0 <= first < len(lines):
        indent = len(lines[first]) - len(lines[first].lstrip())
        head = re.compile(r"(\s*)class\s+" + re.escape(cls.__name__) + r"\b")
        for k in range(first - 1, -1, -1):
            m = head.match(lines[k])
            if m and len(m.group(1)) < indent:
                if k and lines[k - 1].lstrip().startswith("@"):
                    break  # decorators belong to the class's source: inspect knows where they start
                block = inspect.getblock(lines[k:])
                if k + len(block) > first:
                    return "".join(block)
                break
    return inspect.getsource(cls)


class _Unhashable(Exception):
    """A value that is not plain data (or too many values to walk)."""


def _column(h: Any, xs: list, budget: list[int]) -> None:
    """Hash a list of values; flat lists of one plain type go at C speed. ``budget``:
    ``[values left to walk one by one]``."""
    kinds = set(map(type, xs))
    h.update(b"L%d:" % len(xs))
    if len(kinds) == 1:
        kind = next(iter(kinds))
        if kind is str:
            h.update(array("q", map(len, xs)).tobytes())
            h.update("".join(xs).encode("utf-8", "surrogatepass"))
            return
        if kind is bytes:
            h.update(array("q", map(len, xs)).tobytes())
            h.update(b"".join(xs))
            return
        if kind is float:
            h.update(b"f" + array("d", xs).tobytes())
            return
        if kind is int:
            try:
                h.update(b"i" + array("q", xs).tobytes())
                return
            except OverflowError:
                pass
        if kind is tuple:
            widths = set(map(len, xs))
            if len(widths) == 1:  # rows of one width (e.g. (path, label)): hash by column
                h.update(b"T")
                for k in range(widths.pop()):  # (zip(*xs) builds a tuple per column: 20x slower)
                    _column(h, list(map(itemgetter(k), xs)), budget)
                return
        if issubclass(kind, os.PathLike):
            h.update(b"P")
            _column(h, [os.fspath(x) for x in xs], budget)
            return
    budget[0] -= len(xs)
    if budget[0] < 0:
        raise _Unhashable
    for x in xs:
        _value(h, x, budget)


def _value(h: Any, x: Any, budget: list[int]) -> None:
    t = type(x)
    if t in _SCALARS:
        r = repr(x).encode("utf-8", "surrogatepass")
        h.update(b"%s%d:" % (t.__name__.encode(), len(r)) + r)
    elif t is list or t is tuple:
        h.update(b"[" if t is list else b"(")
        _column(h, list(x), budget)
    elif t is dict:
        keys = list(x)
        if not all(type(k) in _SCALARS for k in keys):
            raise _Unhashable
        h.update(b"{")
        _column(h, keys, budget)
        _column(h, list(x.values()), budget)
    elif isinstance(x, os.PathLike):
        h.update(b"P")
        _value(h, os.fspath(x), budget)
    else:
        raise _Unhashable


def state_hash(source: Any, keyed: bool = False) -> tuple[str | None, list[str]]:
    """``(hash, left_out)``: a hash of ``source``'s plain-data attributes (None when it
    has none) and the names of the attributes left out (sorted); ``keyed`` leaves out
    attributes holding a list or a dict, or an int equal to ``len(source)``."""
    try:
        attrs = vars(source)
    except TypeError:
        return None, []
    exclude = set(getattr(type(source), "kvcache_fingerprint_exclude", ()) or ())
    if keyed:  # the items (lists, dicts) and their count are not a keyed source's identity
        try:
            n = len(source)
        except TypeError:
            n = None
        exclude |= {k for k, v in attrs.items() if type(v) in (list, dict) or (type(v) is int and v == n)}
    h = xxhash.xxh3_128()
    left_out, covered = [], 0
    for name in sorted(attrs):
        if name in exclude:
            left_out.append(name)
            continue
        one = xxhash.xxh3_128()
        try:
            _value(one, attrs[name], [MAX_ITEMS])
        except (_Unhashable, RecursionError):
            left_out.append(name)
            continue
        covered += 1
        h.update(name.encode("utf-8", "surrogatepass") + b"=" + one.digest())
    return (h.hexdigest()[:16] if covered else None), left_out


def compute_parts(source: Any, version: str | int | None, fingerprint: str | None,
                  keyed: bool = False) -> dict[str, Any]:
    """The parts of ``source``'s fingerprint, as a JSON-able dict (``keyed``: the
    source's records are stored by ``key=``; its length is then no part of it)."""
    if fingerprint is not None:
        return {"fingerprint": str(fingerprint), "keyed": True} if keyed else {"fingerprint": str(fingerprint)}
    cls = type(source)
    parts: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if keyed:
        parts["keyed"] = True
    else:
        try:
            parts["length"] = len(source)
        except TypeError:
            parts["length"] = None
    state, left_out = state_hash(source, keyed)
    parts["source_hash"] = _class_source_hash(cls)
    parts["state"] = state
    parts["version"] = None if version is None else str(version)
    if left_out:
        parts["state_left_out"] = left_out
    return parts


def digest(parts: dict[str, Any]) -> str:
    """A stable hex digest of fingerprint parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def diff_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable lines naming each part that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            what = "the source's attributes" if key == "state" else key
            out.append(f"{what}: {old.get(key)!r} -> {new.get(key)!r}")
    return out
