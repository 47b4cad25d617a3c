"""Progress of long library work (``build``, ``verify``): a line on stderr, or a callback.

The CLI draws click's progress bar through a callback; the library cannot import click,
so it draws this: one line rewritten in place (items, items/s, ETA), only when asked.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

__all__ = ["Progress", "progress_for"]


class Progress:
    """Receives ``start(total)``, ``update(n)`` and ``finish()`` from a long operation.

    Args:
        label: the line's prefix (``build``).
        total: the number of items, if known now (else give it to ``start``).
        enabled: draw the line on ``stream``; None draws it only on a terminal.
        fn: also call ``fn(done, total)`` after every update (the CLI's click bar).
        stream: where the line goes (stderr).
        unit: what is counted (``items``; ``MiB`` for a copy).

    ``with Progress("build", total=n) as bar: bar.update(k)`` draws and ends the line.
    """

    def __init__(self, label: str = "", *, total: int = 0, enabled: bool | None = None,
                 fn: Callable[[int, int], None] | None = None, stream: Any = None,
                 unit: str = "items") -> None:
        self.label, self.fn, self.unit = label, fn, unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._drawn = False

    def start(self, total: int) -> None:
        """(Re)start counting towards ``total`` items."""
        self.total, self.done = total, 0
        self.t0 = self._last = time.perf_counter()
        self._report()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self._draw(now)
        self._report()

    def _report(self) -> None:
        if self.fn is not None:
            self.fn(self.done, self.total)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        fill = min(width, int(width * self.done / self.total)) if self.total else width
        self.stream.write(
            f"\r{self.label} [{'#' * fill}{'-' * (width - fill)}] {self.done}/{self.total} "
            f"{rate:,.0f} {self.unit}/s ETA {eta:,.0f}s "
        )
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the line (idempotent)."""
        if self.enabled and self._drawn:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def progress_for(progress: Any, label: str) -> Progress | None:
    """The ``progress=`` argument of a library function as a :class:`Progress` (or None).

    ``False``/``None``: quiet. ``True``: a line on stderr. A callable: called with
    ``(done, total)``. A :class:`Progress`: used as it is.
    """
    if progress is None or progress is False:
        return None
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Progress(label, enabled=False, fn=progress)
    return Progress(label, enabled=True)
