"""A dependency-free progress line for long library work (``build``), on stderr.

The CLI uses click's progress bar; the library cannot import click, so ``build`` uses
this: one line rewritten in place, only when asked for or when stderr is a terminal.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, label) as p: p.update(n)``: items, items/s and ETA."""

    def __init__(self, total: int, label: str = "", enabled: bool | None = None, stream=None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = self._last = time.perf_counter()

    def __enter__(self) -> "Progress":
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        fill = int(width * self.done / self.total) if self.total else width
        self.stream.write(
            f"\r{self.label} [{'#' * fill}{'-' * (width - fill)}] {self.done}/{self.total} "
            f"{rate:,.0f} items/s ETA {eta:,.0f}s "
        )
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
