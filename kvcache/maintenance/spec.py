"""Loading a source dataset from a ``module:callable`` spec, and progress reporting hooks."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

from ..progress import Progress as _Line

__all__ = ["Progress", "load_spec", "progress_callback"]


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


class Progress:
    """Receives ``start(total)``, ``update(n)`` and ``finish()`` from a long operation."""

    def __init__(self, fn: Callable[[int, int], None] | None = None, label: str = "",
                 enabled: bool = True) -> None:
        self.fn, self.label, self.enabled = fn, label, enabled
        self.total = self.done = 0
        self._line: _Line | None = None

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        if self.fn is None and self.enabled:
            self._line = _Line(total, self.label, enabled=True)
        self._report()

    def update(self, n: int) -> None:
        self.done += n
        if self._line is not None:
            self._line.update(n)
        self._report()

    def _report(self) -> None:
        if self.fn is not None:
            self.fn(self.done, self.total)

    def finish(self) -> None:
        if self._line is not None:
            self._line.__exit__(None, None, None)
            self._line = None


def progress_callback(progress: Any, label: str) -> Progress | None:
    """``progress`` as given to a maintenance function (False, True, or a callable)."""
    if progress is None or progress is False:
        return None
    if callable(progress):
        return Progress(progress, label)
    return Progress(None, label)
