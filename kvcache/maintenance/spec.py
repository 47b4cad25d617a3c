"""Loading a source dataset from a ``module:callable`` spec."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

__all__ = ["load_key", "load_spec"]


def load_spec(spec: str) -> Any:
    """Call the ``module:callable`` or ``path/to/file.py:callable`` in ``spec``; return its result.

    Raises:
        ValueError: the spec is malformed, or names nothing callable.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"source spec {spec!r} must be module:callable or path/to/file.py:callable")
    if target.endswith(".py") or os.sep in target:
        if not os.path.exists(target):
            raise ValueError(f"source spec {spec!r}: no file {target}")
        modname = "_kvcache_spec_" + os.path.splitext(os.path.basename(target))[0]
        mod = sys.modules.get(modname)
        if mod is None or getattr(mod, "__file__", None) != os.path.abspath(target):
            s = importlib.util.spec_from_file_location(modname, os.path.abspath(target))
            assert s is not None and s.loader is not None
            mod = importlib.util.module_from_spec(s)
            sys.modules[modname] = mod  # so workers and pickling can find it by name
            s.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"source spec {spec!r}: cannot import {target} ({exc})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"source spec {spec!r}: {target} has no callable {name!r}")
    return fn()


def load_key(key: str, source: Any) -> Any:
    """The key function (``key=``) named by ``key`` for ``source``: the source's attribute
    of that name (a method, e.g. ``"key"`` for ``source.key``), or a ``module:callable``
    spec whose callable returns the key function (called with no arguments).

    Raises:
        ValueError: nothing callable by that name.
    """
    if ":" in key:
        fn = load_spec(key)
    else:
        fn = getattr(source, key, None)
    if not callable(fn):
        raise ValueError(f"key {key!r}: neither a callable attribute of the source "
                         f"({type(source).__qualname__}) nor a module:callable returning a key function")
    return fn
