"""Loading a source dataset from a ``module:callable`` or ``path/to/file.py:callable`` spec.

The source must come out of the spec under the module name the training script sees,
because that name is part of the source's fingerprint (its class's ``module.qualname``):
a cache built under another name is never used by training. So:

* ``module:callable`` is imported as ``python -m`` would, with the current directory at
  the front of ``sys.path`` (the ``kvcache`` console script does not put it there);
* ``path/to/file.py:callable`` is imported under the name it has when its package root
  is importable: ``myds.py`` in a plain folder is module ``myds`` (that folder goes on
  ``sys.path``, as ``python train.py`` puts a script's folder there), and a file inside
  packages (folders with ``__init__.py``) gets its dotted name from the first folder
  above them (``proj/data/myds.py`` with ``proj/data/__init__.py`` is ``data.myds``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__all__ = ["load_key", "load_spec", "module_for_file"]


def module_for_file(path: str) -> tuple[str, str]:
    """``(root, dotted_name)``: the folder to put on ``sys.path`` and the module name
    under which the file ``path`` is imported (its package root's view of it)."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    parts = [os.path.splitext(name)[0]]
    while os.path.exists(os.path.join(folder, "__init__.py")):
        folder, pkg = os.path.split(folder)
        parts.append(pkg)
    return folder, ".".join(reversed(parts))


def _front(folder: str) -> None:
    if not sys.path or os.path.abspath(sys.path[0] or os.curdir) != folder:
        sys.path.insert(0, folder)
        importlib.invalidate_caches()


def load_spec(spec: str) -> Any:
    """Call the ``module:callable`` or ``path/to/file.py:callable`` in ``spec``; return its result.

    Raises:
        ValueError: the spec is malformed, names nothing callable, cannot be imported,
        or its file is shadowed by another module of the same name.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"source spec {spec!r} must be module:callable or path/to/file.py:callable")
    if target.endswith(".py") or os.sep in target or (os.altsep and os.altsep in target):
        if not os.path.isfile(target):
            raise ValueError(f"source spec {spec!r}: no file {target}")
        root, modname = module_for_file(target)
        _front(root)
        old = sys.modules.get(modname)
        if old is not None and not _same(getattr(old, "__file__", None), target):
            del sys.modules[modname]  # another file of that name, loaded earlier in this process
        mod = _import(spec, modname)
        got = getattr(mod, "__file__", None)
        if not _same(got, target):
            raise ValueError(
                f"source spec {spec!r}: module {modname!r} is {got}, not {os.path.abspath(target)} "
                f"(another module of that name comes first); rename one of them")
    else:
        _front(os.getcwd())  # as `python -m` does
        mod = _import(spec, target)
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


def _same(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _import(spec: str, modname: str) -> Any:
    try:
        return importlib.import_module(modname)
    except ImportError as exc:
        raise ValueError(f"source spec {spec!r}: cannot import {modname} ({exc}); a module:callable "
                         "spec is looked up from the current directory, as `python -m` does") from None
