"""Write-back: computed samples are buffered and written in batches, outside any read.

A batch is flushed when it holds ``batch_items`` records or ``batch_bytes`` bytes, when
its oldest record is ``batch_seconds`` old, on ``close()``, and on every kind of process
end:

* a normal exit, and a DataLoader worker's shutdown (a worker ends through
  multiprocessing, which runs ``multiprocessing.util.Finalize`` callbacks, not ``atexit``);
* SIGTERM (a scheduler's, or multiprocessing's own at interpreter exit: torch skips
  ``_shutdown_workers`` once Python is finalizing, and multiprocessing then terminates
  the daemonic persistent workers): a handler installed at a process's first buffered
  row, when SIGTERM would otherwise kill it outright, writes every buffered row, then
  ends the process as it would have ended (a DataLoader worker with exit status 0, as
  torch's own handler does; any other process by SIGTERM);
* in a DataLoader worker, when it runs out of work: before a batch is returned, the
  worker's index queue is polled once (only while rows are buffered), and an empty
  queue means this was its last batch for now (the end of an epoch), so the rows are
  committed before the batch reaches the main process. A sample computed in epoch k is
  therefore in the cache before epoch k + 1 starts, whichever worker reads it then.
  A wrapper that reads item by item (ConcatDataset) hides a batch's end: such a worker
  commits when out of work at most every ``IDLE_GETITEM`` seconds, and in any case
  before it waits for its next batch (its index queue's ``get`` is wrapped).

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
import signal
import sys
import threading
import time
import warnings
import weakref
from multiprocessing.util import Finalize
from typing import Any

from .errors import CacheFullError, CacheReadOnlyError, CacheWriteError, KvCacheError, KvCacheWarning
from .store import Store

__all__ = ["Writer", "write_what_fits"]

IDLE_GETITEM = 0.05  # a worker reading item by item commits at most this often when out of work
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
        self._queue: Any = None  # this DataLoader worker's index queue (None elsewhere)

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
            self._queue = _worker_queue()
            _LIVE.add(self)
            _install_sigterm()
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
        """Flush if the oldest buffered row is ``batch_seconds`` old, or if this DataLoader
        worker's index queue is empty (it is about to wait: commit before the batch goes
        out). Called at the end of each ``__getitems__`` while rows are buffered."""
        if self.rows and (time.monotonic() - self.oldest >= self.batch_seconds
                          or (self._queue is not None and _empty(self._queue))):
            self.flush()

    def after_miss(self) -> None:
        """``__getitem__``'s miss path in a worker (a wrapper such as ConcatDataset reads
        item by item, so a batch's end is not seen): commit when out of work, at most
        every ``IDLE_GETITEM`` seconds."""
        if (self._queue is not None and time.monotonic() - self.oldest >= IDLE_GETITEM
                and _empty(self._queue)):
            self.flush()

    def flush(self) -> int:
        """Write the buffered rows in one transaction; return how many were written."""
        if not self.rows:
            return 0
        global _FLUSHING
        _FLUSHING += 1
        try:
            return self._flush()
        finally:
            _FLUSHING -= 1
            if _TERM_PENDING and not _FLUSHING:
                _on_sigterm(signal.SIGTERM, None)

    def _flush(self) -> int:
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
        global _FLUSHING
        _FLUSHING += 1
        try:
            n, dropped, _exc = write_what_fits(store, [(i, r, m) for i, (r, m) in rows.items()], fp_id)
        finally:
            _FLUSHING -= 1
        state["stats"].writes += n
        state["stats"].write_errors += dropped


# Writers holding rows in this process. Before a fork they are flushed, so a forked
# DataLoader worker never inherits (and serves, but never writes) the parent's rows:
# after one epoch every index the workers returned is in the cache.
_LIVE: "weakref.WeakSet[Writer]" = weakref.WeakSet()


def _flush_live() -> None:
    """Flush every writer holding rows of this process (before a fork, before a worker
    waits for work)."""
    pid = os.getpid()
    for w in list(_LIVE):
        if w.rows and w._pid == pid:
            try:
                w.flush()
            except Exception:  # never let a fork or a worker fail because of write-back
                pass


os.register_at_fork(before=_flush_live)


def _worker_queue() -> Any:
    """This DataLoader worker's index queue, or None outside a worker.

    torch gives a worker's dataset no way to see that the worker ran out of work, so the
    queue is taken from the frame of ``torch.utils.data._utils.worker._worker_loop``
    (its ``index_queue`` argument, torch 1.x-2.x), once per process at the first miss.
    Without it (another torch, another caller) rows are committed by count and age only,
    and at the process's end. tests/test_first_run.py fails if this stops finding it.
    """
    mod = sys.modules.get("torch.utils.data._utils.worker")
    if mod is None or mod.get_worker_info() is None:
        return None
    f: Any = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "_worker_loop":
            q = f.f_locals.get("index_queue")
            if not callable(getattr(q, "empty", None)) or not callable(getattr(q, "get", None)):
                return None
            _commit_before_waiting(q)
            return q
        f = f.f_back
    return None


def _commit_before_waiting(queue: Any) -> None:
    """Wrap this worker's ``index_queue.get`` (an attribute of this process's queue
    object, nothing else) so that a worker about to wait for work first commits what it
    buffered. ``__getitems__`` already commits before its last batch goes out; a wrapper
    reading item by item (ConcatDataset) cannot see a batch's end, and without this its
    last rows of an epoch stayed buffered for as long as the worker computed nothing
    more (a whole epoch of hits), so the other worker computed them again."""
    if getattr(queue, "_kvcache_commits", False):
        return
    get = queue.get

    def get_after_commit(*args: Any, **kwargs: Any) -> Any:
        if _LIVE and _empty(queue):  # about to wait: nothing else to do meanwhile
            _flush_live()
        return get(*args, **kwargs)

    try:
        queue.get = get_after_commit
        queue._kvcache_commits = True
    except AttributeError:  # a queue type without instance attributes: count and age only
        pass


def _empty(queue: Any) -> bool:
    try:
        return bool(queue.empty())  # one poll() on the queue's pipe
    except (OSError, ValueError):  # closed: the loader is going away
        return True


# SIGTERM: write what is buffered, then end as the process would have ended.
_FLUSHING = 0  # > 0 while a flush runs in this process (the handler then waits for it)
_TERM_PENDING = False
_SIGTERM_PID = 0  # the process the handler was installed in


def _install_sigterm() -> None:
    """Install the SIGTERM handler in this process, at its first buffered row, where
    SIGTERM would kill it outright: Python's default, or torch's C handler in a
    DataLoader worker (Python reports that one as None). Never over a Python handler the
    program installed, and only from the main thread (where Python runs handlers)."""
    global _SIGTERM_PID
    pid = os.getpid()
    if _SIGTERM_PID == pid or threading.current_thread() is not threading.main_thread():
        return
    _SIGTERM_PID = pid
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None, _on_sigterm):
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    global _TERM_PENDING
    if _FLUSHING:  # SIGTERM arrived inside a commit: let it finish, then come back here
        _TERM_PENDING = True
        return
    _TERM_PENDING = False
    pid = os.getpid()
    for w in list(_LIVE):
        if w.rows and w._pid == pid:
            try:
                w.flush()
            except BaseException:  # noqa: BLE001 - ending anyway; the rows are lost like before
                pass
    if sys.modules.get("torch.utils.data._utils.worker") is not None:
        info = sys.modules["torch.utils.data._utils.worker"].get_worker_info()
        if info is not None:
            os._exit(0)  # what torch's handler does for a DataLoader worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(pid, signal.SIGTERM)
