"""Write-back: computed samples are buffered and written in batches, outside any read.

A batch is flushed when it holds ``batch_items`` records or ``batch_bytes`` bytes, when
its oldest record is ``batch_seconds`` old, on ``close()``, and when the process exits,
including a DataLoader worker's exit (a worker ends through multiprocessing, which runs
``multiprocessing.util.Finalize`` callbacks but not ``atexit``).

A batch that does not fit (the map at ``max_map_size``, a full disk, the file size
limit) is split in halves and each half tried again, down to single records, so a full
cache keeps as much of the batch as a writer committing one record at a time would, at
the cost of about two failed attempts per halving level. The first record that does not
fit on its own ends the batch.

Write failures degrade instead of crashing training: the first failure of each kind is
warned once, the rows that were not committed are dropped (the samples were already
returned from the source), ``write_errors`` counts exactly those, and writing is retried
after a back-off (disk full, I/O) or stopped for good (read-only location, map at
``max_map_size``).
"""

from __future__ import annotations

import errno
import os
import time
import warnings
import weakref
from multiprocessing.util import Finalize
from typing import Any

from .errors import CacheFullError, CacheReadOnlyError, CacheWriteError, KvCacheError, KvCacheWarning
from .store import Store

__all__ = ["Writer", "write_what_fits"]

RETRY_AFTER = 5.0  # seconds before retrying write-back after a disk-full / I/O failure
# errno values of a write that failed for lack of room (LMDB reports a full disk as EIO)
_NO_ROOM = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_room(exc: KvCacheError) -> bool:
    """Whether ``exc`` says the batch did not fit (so a smaller part might)."""
    if isinstance(exc, CacheReadOnlyError):
        return False
    return isinstance(exc, CacheFullError) or (isinstance(exc, CacheWriteError) and exc.errno in _NO_ROOM)


def write_what_fits(store: Store, rows: list[tuple[int, bytes, bytes]],
                    fp_id: int) -> tuple[int, int, KvCacheError | None]:
    """Commit ``rows``; a batch that does not fit is halved and each part tried again.

    Returns ``(written, dropped, error)``: the records committed (a key that already holds
    a valid record of ``fp_id`` is kept and counts as neither), the rows not committed,
    and the error that stopped the rest (None when every row was written). Rows are
    committed in order; the first part of one row that does not fit ends the batch.
    """
    written = 0
    todo = [rows]  # a stack of parts, the next part to write on top
    while todo:
        part = todo.pop()
        try:
            written += store.write_records(part, fp_id)
        except KvCacheError as exc:
            if len(part) > 1 and _no_room(exc):
                mid = len(part) // 2
                todo += (part[mid:], part[:mid])
                continue
            return written, len(part) + sum(map(len, todo)), exc
    return written, 0, None


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
        self.rows: dict[Any, tuple[bytes, bytes]] = {}  # index (or a keyed record's LMDB key) -> row
        self.owners: dict[bytes, int] = {}  # a keyed row's LMDB key -> the index that computed it
        self.nbytes = 0
        self.oldest = 0.0
        self.disabled: str | None = None
        self.failed = False  # disabled by a permanent write failure (later misses are write_errors)
        self.retry_at = 0.0
        self.warned: set[type] = set()
        self._pid = 0
        self._finalizer: Any = None

    def pending(self, index: Any) -> bytes | None:
        row = self.rows.get(index)
        return row[0] if row is not None else None

    def owner(self, key: Any) -> int | None:
        """The index whose sample is buffered under a keyed record's LMDB key ``key``."""
        return self.owners.get(key)

    def add(self, index: Any, record: bytes, meta: bytes, owner: int | None = None) -> None:
        if self.disabled or self.fp_id is None:
            if self.failed:
                self.stats.write_errors += 1
            return
        pid = os.getpid()  # a miss computed a sample; one syscall is noise here
        if pid != self._pid:  # first row in this process, or a forked child
            if self._pid:
                self.rows, self.owners, self.nbytes = {}, {}, 0  # the parent's rows are the parent's to write
            self._pid = pid
            self._finalizer = Finalize(self, Writer._flush_at_exit, args=(self.__dict__,), exitpriority=20)
            _LIVE.add(self)
        if not self.rows:
            self.oldest = time.monotonic()
        self.rows[index] = (record, meta)
        if owner is not None:
            self.owners[index] = owner
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
        rows, self.rows, self.owners, self.nbytes = self.rows, {}, {}, 0
        if self.fp_id is None:
            return 0
        if self.disabled or time.monotonic() < self.retry_at:
            # dropped: write-back is off, or backing off after a disk-full / I/O failure
            self.stats.write_errors += len(rows)
            return 0
        n, dropped, exc = write_what_fits(self.store, [(i, r, m) for i, (r, m) in rows.items()], self.fp_id)
        self.stats.writes += n
        if exc is not None:
            # read-only or the map at its cap: off for good; disk full, I/O, or e.g. a
            # CacheCorruptError met while writing: back off, then try again
            self._fail(exc, dropped, permanent=isinstance(exc, (CacheReadOnlyError, CacheFullError)))
        return n

    def _fail(self, exc: KvCacheError, n: int, permanent: bool) -> None:
        self.stats.write_errors += n
        if permanent:
            self.disabled = str(exc)
            self.failed = True
        else:
            self.retry_at = time.monotonic() + RETRY_AFTER
        kind = type(exc)
        if kind not in self.warned:
            self.warned.add(kind)
            how = "write-back is off for this process" if permanent else f"retrying in {RETRY_AFTER:.0f}s"
            warnings.warn(f"kvcache: {exc}; samples keep coming from the source, {how}",
                          KvCacheWarning, stacklevel=4)

    def discard(self) -> None:
        self.rows, self.owners, self.nbytes = {}, {}, 0

    @staticmethod
    def _flush_at_exit(state: dict) -> None:
        # Runs at process exit (or when the writer is collected) with the writer's
        # __dict__, so the finalizer holds no reference cycle through the writer.
        rows = state.get("rows")
        if not rows or state.get("_pid") != os.getpid():
            return
        store, fp_id = state["store"], state["fp_id"]
        state["rows"], state["owners"] = {}, {}
        if state.get("disabled") or fp_id is None or time.monotonic() < state.get("retry_at", 0.0):
            state["stats"].write_errors += len(rows)
            return
        n, dropped, _exc = write_what_fits(store, [(i, r, m) for i, (r, m) in rows.items()], fp_id)
        state["stats"].writes += n
        state["stats"].write_errors += dropped


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
