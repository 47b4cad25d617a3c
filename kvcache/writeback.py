"""Write-back: computed samples are buffered and written in batches, outside any read.

A batch is flushed when it holds ``batch_items`` records or ``batch_bytes`` bytes, when
its oldest record is ``batch_seconds`` old, on ``close()``, and when the process exits,
including a DataLoader worker's exit (a worker ends through multiprocessing, which runs
``multiprocessing.util.Finalize`` callbacks but not ``atexit``).

Write failures degrade instead of crashing training: the first failure of each kind is
warned once, the rows are dropped (the samples were already returned from the source),
``write_errors`` counts them, and writing is retried after a back-off (disk full, I/O)
or stopped for good (read-only location, map at ``max_map_size``).
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from multiprocessing.util import Finalize
from typing import Any

from .errors import CacheFullError, CacheReadOnlyError, CacheWriteError, KvCacheError, KvCacheWarning
from .store import Store

__all__ = ["Writer"]

RETRY_AFTER = 5.0  # seconds before retrying write-back after a disk-full / I/O failure


class Writer:
    """This process's write-back buffer for one dataset."""

    def __init__(self, store: Store, stats: Any, batch_items: int = 256,
                 batch_bytes: int = 64 << 20, batch_seconds: float = 2.0) -> None:
        self.store = store
        self.stats = stats
        self.batch_items = batch_items
        self.batch_bytes = batch_bytes
        self.batch_seconds = batch_seconds
        self.fp_id: int | None = None
        self.rows: dict[int, tuple[bytes, bytes]] = {}
        self.nbytes = 0
        self.oldest = 0.0
        self.disabled: str | None = None
        self.retry_at = 0.0
        self.warned: set[type] = set()
        self._pid = 0
        self._finalizer: Any = None

    def pending(self, index: int) -> bytes | None:
        row = self.rows.get(index)
        return row[0] if row is not None else None

    def add(self, index: int, record: bytes, meta: bytes) -> None:
        if self.disabled or self.fp_id is None:
            return
        pid = os.getpid()  # a miss computed a sample; one syscall is noise here
        if pid != self._pid:  # first row in this process, or a forked child
            if self._pid:
                self.rows, self.nbytes = {}, 0  # the parent's rows are the parent's to write
            self._pid = pid
            self._finalizer = Finalize(self, Writer._flush_at_exit, args=(self.__dict__,), exitpriority=20)
            _LIVE.add(self)
        if not self.rows:
            self.oldest = time.monotonic()
        self.rows[index] = (record, meta)
        self.nbytes += len(record)
        if (len(self.rows) >= self.batch_items or self.nbytes >= self.batch_bytes
                or time.monotonic() - self.oldest >= self.batch_seconds):
            self.flush()

    def maybe_flush(self) -> None:
        """Flush if the oldest buffered row is older than ``batch_seconds`` (called after
        each DataLoader batch, so persistent workers that only hit still write back)."""
        if self.rows and time.monotonic() - self.oldest >= self.batch_seconds:
            self.flush()

    def flush(self) -> int:
        """Write the buffered rows in one transaction; return how many were written."""
        if not self.rows:
            return 0
        rows, self.rows, self.nbytes = self.rows, {}, 0
        if self.fp_id is None:
            return 0
        if self.disabled or time.monotonic() < self.retry_at:
            # dropped: write-back is off, or backing off after a disk-full / I/O failure
            self.stats.write_errors += len(rows)
            return 0
        try:
            n = self.store.write_records(((i, r, m) for i, (r, m) in rows.items()), self.fp_id)
        except (CacheReadOnlyError, CacheFullError) as exc:
            self._fail(exc, len(rows), permanent=True)
            return 0
        except CacheWriteError as exc:
            self._fail(exc, len(rows), permanent=False)
            return 0
        except KvCacheError as exc:  # e.g. CacheCorruptError met while writing: degrade
            self._fail(exc, len(rows), permanent=False)
            return 0
        self.stats.writes += n
        return n

    def _fail(self, exc: KvCacheError, n: int, permanent: bool) -> None:
        self.stats.write_errors += n
        if permanent:
            self.disabled = str(exc)
        else:
            self.retry_at = time.monotonic() + RETRY_AFTER
        kind = type(exc)
        if kind not in self.warned:
            self.warned.add(kind)
            how = "write-back is off for this process" if permanent else f"retrying in {RETRY_AFTER:.0f}s"
            warnings.warn(f"kvcache: {exc}; samples keep coming from the source, {how}",
                          KvCacheWarning, stacklevel=4)

    def discard(self) -> None:
        self.rows, self.nbytes = {}, 0

    @staticmethod
    def _flush_at_exit(state: dict) -> None:
        # Runs at process exit (or when the writer is collected) with the writer's
        # __dict__, so the finalizer holds no reference cycle through the writer.
        rows = state.get("rows")
        if not rows or state.get("_pid") != os.getpid():
            return
        store, fp_id = state["store"], state["fp_id"]
        state["rows"] = {}
        if state.get("disabled") or fp_id is None or time.monotonic() < state.get("retry_at", 0.0):
            state["stats"].write_errors += len(rows)
            return
        try:
            n = store.write_records(((i, r, m) for i, (r, m) in rows.items()), fp_id)
            state["stats"].writes += n
        except KvCacheError:
            state["stats"].write_errors += len(rows)


# Writers holding rows in this process. Before a fork they are flushed, so a forked
# DataLoader worker never inherits (and serves, but never writes) the parent's rows:
# after one epoch every index the workers returned is in the cache.
_LIVE: "weakref.WeakSet[Writer]" = weakref.WeakSet()


def _flush_before_fork() -> None:
    pid = os.getpid()
    for w in list(_LIVE):
        if w.rows and w._pid == pid:
            try:
                w.flush()
            except Exception:  # never let a fork fail because of write-back
                pass


os.register_at_fork(before=_flush_before_fork)
