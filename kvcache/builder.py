"""Building a cache: compute every missing index, in worker processes, with one writer.

The one implementation behind ``LmdbCachedDataset.build(num_workers=N)`` and
``kvcache build --workers N`` (and, per rank, the distributed build in
:mod:`kvcache.distributed`). Workers compute and encode samples; the building process
alone writes them, one transaction per batch, so a Ctrl-C or a kill leaves every
committed batch in place and nothing half-written, and a rerun skips what is cached.

A build is given a :class:`BuildJob` (the source, its fingerprint's parts, and how to
open the cache it fills), never the dataset: ``kvcache.dataset`` imports this module,
and this module imports nothing that imports it back.

The writer never starves the workers: each worker has a few tasks queued ahead of it
(``INFLIGHT`` per worker, bounded, so memory stays flat however fast the workers are),
a task is sized to about ``TASK_SECONDS`` of the source's time (measured as results
come back), and a commit's fsync happens while the workers compute the next tasks.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import random
import signal
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import codec
from .compression import Compression
from .errors import (
    BuildError,
    CacheReadOnlyError,
    KvCacheError,
    KvCacheWarning,
    MissingSampleError,
    SampleTooLargeError,
    SourceError,
)
from .progress import Progress, progress_for
from .stats import BuildReport
from .store import KEY, Store

__all__ = ["BATCH_ITEMS", "ERRORS", "BuildJob", "Filled", "Sink", "Target", "build", "cached_set", "check_job",
           "encode_rows", "fill", "missing", "plan", "sample_cached", "start_method", "warn_too_large"]

BATCH_ITEMS = 4096  # records per write transaction (a commit costs an fsync)
BATCH_BYTES = 64 << 20
BATCH_SECONDS = 1.0  # ... or whatever arrived in this long: a kill loses at most ~1 s of work
TASK_SECONDS = 0.05  # a worker's task takes about this long (the first ones take 4 items)
MAX_TASK = 4096
INFLIGHT = 4  # tasks queued per worker
SERIAL_CHUNK = 64  # items computed between progress updates without workers

Row = tuple[Any, bytes, bytes]  # (index, or a keyed record's LMDB key; record; metadata row)


def start_method(method: str | None = None) -> str:
    """``method``, or fork where the platform has it (nothing is pickled) and spawn elsewhere."""
    if method is not None:
        return method
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def encode_rows(source: Any, indices: Sequence[Any], fp_id: int, max_bytes: int,
                skip: bool = False,
                compression: Compression | None = None) -> tuple[list[Row], list[int], list[tuple[int, str]]]:
    """Compute and encode ``source[i]`` for each index: the rows to write, the indices
    whose record is over ``max_bytes`` (served uncached, so not written), and with
    ``skip`` the ``(index, error)`` of each index whose source raised. An item of a
    keyed build is ``(index, LMDB key, seed, key bytes)`` (:func:`kvcache.keys.missing_keys`):
    its row is written under the LMDB key, with the key in its metadata row.

    Raises:
        SourceError: the source raised (without ``skip``), naming the index.
    """
    rows: list[Row] = []
    big: list[int] = []
    failed: list[tuple[int, str]] = []
    for item in indices:
        if type(item) is tuple:
            i, key, seed, kb = item
        else:
            i = key = seed = int(item)
            kb = None
        try:
            sample = source[i]
        except Exception as exc:  # noqa: BLE001 - the source's own error, whatever it is
            why = f"{type(exc).__name__}: {exc}"
            if skip:
                failed.append((i, why))
                continue
            raise SourceError(f"index {i}: the source raised {why} (kvcache build --skip-errors, "
                              "or build(errors='skip'), stores every other sample)") from exc
        try:
            record, meta = codec.encode_with_meta(sample, fp_id, seed, compression, key=kb)
        except KvCacheError as exc:
            raise type(exc)(f"index {i}: {exc}") from None
        if len(record) > max_bytes:
            big.append(i)
            continue
        rows.append((key, record, meta))
    return rows, big, failed


def missing(store: Store, fp_id: int | None, n: int) -> np.ndarray:
    """The indices in ``range(n)`` with no record of ``fp_id``, ascending (int64).

    O(1) for an empty or complete cache (the tally of rows per fingerprint says so);
    otherwise one cursor pass over the metadata rows' first bytes, with one byte of
    memory per index (a list or set of 10^7 Python ints would take ~0.5 GB).
    """
    have = np.zeros(n, dtype=bool)
    count = store.count(fp_id)  # O(1): the tally of rows per fingerprint
    if count == 0:
        return np.arange(n, dtype=np.int64)
    if count >= n:  # n distinct keys below n (when the last key is): complete, no walk
        e = store.handle()
        with store.begin(e.meta) as txn:
            cur = txn.cursor()
            if cur.last() and int.from_bytes(cur.key(), "big") < n:
                return np.empty(0, dtype=np.int64)
    if fp_id is not None and n:
        want = codec.META_ROW.pack(fp_id, 0, 0)[:4]
        e = store.handle()
        with store.begin(e.meta) as txn:
            cur = txn.cursor()
            from_bytes = int.from_bytes
            for k, v in cur.iternext(keys=True, values=True):
                if v[:4] == want and len(v) >= codec.META_ROW.size:
                    i = from_bytes(k, "big")
                    if i < n:
                        have[i] = True
    return np.flatnonzero(~have)


def cached_set(store: Store, fp_id: int | None) -> set[int]:
    """The indices holding a metadata row of ``fp_id``: one cursor pass, reading only the
    keys where every row is ``fp_id``'s (the tally says so)."""
    if fp_id is None:
        return set()
    e = store.handle()
    from_bytes = int.from_bytes
    with store.begin(e.meta) as txn:
        cur = txn.cursor()
        if store.count(fp_id) == txn.stat(e.meta)["entries"]:
            return {from_bytes(k, "big") for k in cur.iternext(keys=True, values=False)}
        want = codec.META_ROW.pack(fp_id, 0, 0)[:4]
        return {from_bytes(k, "big") for k, v in cur.iternext(keys=True, values=True)
                if v[:4] == want and len(v) >= codec.META_ROW.size}


def sample_cached(store: Store, fp_id: int | None, n: int, k: int, rng: random.Random) -> list[int]:
    """``k`` distinct random indices below ``n`` holding a row of ``fp_id``. Where at least
    a twentieth of them are cached, random indices are probed (one row read each, a few
    per hit); a sparser cache is listed (:func:`cached_set`) and sampled."""
    count = 0 if fp_id is None else store.count(fp_id)
    want = min(k, count)
    if want <= 0:
        return []
    if count * 20 >= n:
        chosen: dict[int, None] = {}
        tag = codec.META_ROW.pack(fp_id, 0, 0)[:4]
        e = store.handle()
        with store.begin(e.meta) as txn:
            for _ in range(100 * want + 100):
                i = rng.randrange(n)
                if i not in chosen:
                    row = txn.get(KEY.pack(i))
                    if row is not None and row[:4] == tag and len(row) >= codec.META_ROW.size:
                        chosen[i] = None
                        if len(chosen) == want:
                            return list(chosen)
    have = sorted(cached_set(store, fp_id))
    return rng.sample(have, min(k, len(have)))


class Sink:
    """The one writer: buffers rows and commits them in batches (by count, bytes and age).

    ``flush`` keeps the rows until their commit returns, so a Ctrl-C in the middle of
    one (the transaction is aborted) leaves them to be written by the next flush.
    """

    def __init__(self, store: Store, fp_id: int, progress: Progress | None = None,
                 batch_items: int = BATCH_ITEMS) -> None:
        self.store, self.fp_id, self.progress = store, fp_id, progress
        self.batch_items = batch_items
        self.rows: list[Row] = []
        self.nbytes = 0
        self.written = 0  # records committed (a key already holding this record is not counted)
        self.computed = 0  # rows handed in (computed and encoded by this build)
        self.received = 0
        self.last = time.monotonic()
        self.path = store.path
        self.tick = BATCH_SECONDS  # fill() calls maybe_flush() at least this often

    def release(self) -> None:
        """Close the store before worker processes fork (it reopens at the next commit)."""
        self.store.close()

    def add(self, rows: list[Row], count: int | None = None) -> None:
        """Buffer ``rows`` (``count``: items they stand for in the progress, e.g. with
        too-large samples left out); commit when a batch is full or old."""
        self.rows.extend(rows)
        self.computed += len(rows)
        self.nbytes += sum(len(r[1]) for r in rows)
        n = len(rows) if count is None else count
        self.received += n
        if self.progress is not None and n:
            self.progress.update(n)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if self.rows and (len(self.rows) >= self.batch_items or self.nbytes >= BATCH_BYTES
                          or time.monotonic() - self.last >= BATCH_SECONDS):
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.written += self.store.write_records(self.rows, self.fp_id)
            self.rows, self.nbytes = [], 0
        self.last = time.monotonic()


@dataclass
class Filled:
    """What :func:`fill` did."""

    written: int = 0
    computed: int = 0  # rows computed (a concurrent build may have written some first)
    too_large: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, error) with skip
    interrupted: bool = False


# -- worker side: the source arrives once per worker (inherited under fork, pickled
# under spawn, or made by ``source_factory`` there), never with each task.

_W: dict[str, Any] = {}


def _init(source: Any, factory: Callable[[], Any] | None, fp_id: int, max_bytes: int,
          skip: bool = False, compression: Compression | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the writer's to handle
    if hasattr(signal, "pthread_sigmask"):  # blocked by _starting(); a pending one is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _W.update(source=factory() if factory is not None else source, fp_id=fp_id, max_bytes=max_bytes,
              skip=skip, compression=compression)


def _task(indices: list[int]) -> tuple[list[Row], list[int], list[tuple[int, str]], float]:
    t0 = time.perf_counter()
    rows, big, failed = encode_rows(_W["source"], indices, _W["fp_id"], _W["max_bytes"], _W["skip"], _W["compression"])
    return rows, big, failed, time.perf_counter() - t0


def fill(source: Any, sink: Sink, todo: np.ndarray | Sequence[int], *, workers: int = 0,
         max_bytes: int = 1 << 62, method: str | None = None,
         source_factory: Callable[[], Any] | None = None, skip: bool = False,
         compression: Compression | None = None) -> Filled:
    """Compute every index in ``todo`` and write it through ``sink``.

    ``workers=0`` computes here; ``workers=N`` in N processes (``method``: fork, spawn or
    forkserver). A Ctrl-C writes every row already computed (workers finish their
    current task) and returns with ``interrupted``; any other error writes what arrived
    and propagates. With ``skip``, an index whose source raised is listed in ``failed``
    and the rest go on.

    Raises:
        BuildError: a worker process died. SourceError: the source raised (no ``skip``).
    """
    out = Filled()
    if not isinstance(todo, list):  # a keyed build's items are tuples (see encode_rows)
        todo = np.asarray(todo, dtype=np.int64)
    try:
        if workers <= 0:
            k, step = 0, 1
            while k < len(todo):
                t0 = time.perf_counter()
                rows, big, failed = encode_rows(source, _items(todo[k:k + step]), sink.fp_id,
                                                max_bytes, True, compression)
                k, n = k + step, len(rows) + len(big) + len(failed)
                out.too_large += big
                sink.add(rows, n)
                _failed(out, failed, skip)
                # chunks of about a fifth of the sink's tick, so it hears from us in time
                per_item = (time.perf_counter() - t0) / max(n, 1)
                step = int(min(max(sink.tick / 5 / max(per_item, 1e-9), 1), SERIAL_CHUNK))
        elif len(todo):
            _pool(source, sink, todo, workers, max_bytes, start_method(method), source_factory, out, skip,
                  compression)
    except KeyboardInterrupt:
        out.interrupted = True
    finally:
        sink.flush()  # on an error too: every row here is a complete record
    out.written = sink.written
    out.computed = getattr(sink, "computed", sink.written)  # a distributed Exchange counts written only
    return out


def _pool(source: Any, sink: Sink, todo: Any, workers: int, max_bytes: int, method: str,
          factory: Callable[[], Any] | None, out: Filled, skip: bool,
          compression: Compression | None = None) -> None:
    ctx = mp.get_context(method)
    # Never hold an environment across fork (kvcache.env); under fork every worker is
    # started by the first submit, and the sink reopens the store at its first commit.
    sink.release()
    pos, per_item = 0, 0.0
    pending: set[Future] = set()
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                             initargs=(None if factory else source, factory, sink.fp_id, max_bytes, True, compression))

    def take(done: set[Future]) -> None:
        nonlocal per_item
        for f in done:
            try:
                rows, big, failed, secs = f.result()
            except BrokenProcessPool:
                raise BuildError(
                    f"{sink.path}: a build worker died (killed, or out of memory); every "
                    "committed batch is kept: run the build again to resume") from None
            n = len(rows) + len(big) + len(failed)
            if n:
                per_item = secs / n if not per_item else 0.7 * per_item + 0.3 * secs / n
            out.too_large += big
            sink.add(rows, n)
            _failed(out, failed, skip)

    def submit() -> None:
        nonlocal pos
        size = 4 if not per_item else int(min(max(TASK_SECONDS / per_item, 1), MAX_TASK))
        size = max(1, min(size, -(-(len(todo) - pos) // workers)))  # even out the tail
        try:
            pending.add(ex.submit(_task, _items(todo[pos:pos + size])))
        except BrokenProcessPool:
            raise BuildError(f"{sink.path}: a build worker died at start; every committed "
                             "batch is kept: run the build again to resume") from None
        pos += size

    try:
        try:
            with _starting():
                while pos < len(todo) and len(pending) < workers * INFLIGHT:
                    submit()
        except Exception as exc:  # noqa: BLE001 - pickling the source under spawn
            if method != "fork" and factory is None and "pickl" in str(exc).lower():
                raise BuildError(
                    f"cannot send the source to {method} workers ({exc}); pass source_factory= "
                    "(a picklable callable that makes it) or use start_method='fork'") from exc
            raise
        while pending:
            done, _ = wait(pending, timeout=sink.tick, return_when=FIRST_COMPLETED)
            pending -= done
            take(done)
            while pos < len(todo) and len(pending) < workers * INFLIGHT:
                submit()
            sink.maybe_flush()
    except KeyboardInterrupt:
        out.interrupted = True
        for f in pending:
            f.cancel()
        ex.shutdown(wait=True, cancel_futures=True)  # running tasks finish (workers ignore SIGINT)
        take({f for f in pending if f.done() and not f.cancelled() and f.exception() is None})
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _items(part: Any) -> list:
    return part.tolist() if isinstance(part, np.ndarray) else part


def _failed(out: Filled, failed: list[tuple[int, str]], skip: bool) -> None:
    """Note the indices whose source raised; without ``skip`` the first one ends the
    build (after the rows computed with it were handed to the sink: they are kept)."""
    out.failed += failed
    if failed and not skip:
        i, why = min(failed)
        raise SourceError(f"index {i}: the source raised {why} (kvcache build --skip-errors, "
                          "or build(errors='skip'), stores every other sample)")


@contextlib.contextmanager
def _starting() -> Iterator[None]:
    """Block SIGINT while the workers start: they inherit the mask (through spawn's exec
    too) until their initializer ignores it, so a Ctrl-C at start never kills one half-way
    through its imports; here it is delivered, as KeyboardInterrupt, once they are up."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def warn_too_large(path: str, big: list[int], max_bytes: int, total: int | None = None) -> None:
    total = len(big) if total is None else total
    if total:
        warnings.warn(str(SampleTooLargeError(
            f"kvcache: {path}: {total} samples (e.g. {big[:5]}) encode to more than "
            f"max_sample_bytes={max_bytes}; they are served uncached")), KvCacheWarning, stacklevel=3)


@dataclass
class Target:
    """The cache a build fills, as the parts a build needs of it (a build never sees the
    dataset class: :class:`kvcache.dataset.LmdbCachedDataset` makes these)."""

    path: str
    store: Store
    fp_id: int | None  # the id the source's records carry; None: it cannot write here
    length: int  # indices to fill: range(length)
    max_sample_bytes: int  # records over this are served uncached, not written
    compression: Compression | None = None  # what the records' array leaves are compressed with


@dataclass(frozen=True)
class BuildJob:
    """What a build is given: the source, what identifies it, and how to open its cache.

    ``open`` writes whatever the opener has buffered and resolves the source's
    fingerprint id, then returns the :class:`Target`; a build calls it once (under a
    distributed build, on rank 0 alone: the other ranks never open the cache).
    """

    source: Any
    path: str
    parts: dict[str, Any] | None  # the fingerprint's parts: ranks compare their digest
    open: Callable[[], Target]
    key: Callable[[int], Any] | None = None  # a keyed cache's key function (key=)


def _open_writable(job: BuildJob) -> Target:
    """Open ``job``'s cache for a build.

    Raises:
        CacheReadOnlyError: read-only, published, or on a network filesystem.
    """
    t = job.open()
    if t.fp_id is None or not t.store.writable:
        raise CacheReadOnlyError(t.store.handle().readonly_reason or (
            f"{t.path}: the cache cannot be written here; build() needs a writable cache "
            "(readonly=False, a writable local directory)"))
    return t


def build(job: BuildJob, *, num_workers: int = 0, progress: Any = False, start_method: str | None = None,
          source_factory: Callable[[], Any] | None = None, errors: str = "raise") -> BuildReport:
    """Fill every index of ``job``'s cache that is not cached yet, in this process and
    ``num_workers`` workers; see ``LmdbCachedDataset.build`` (which raises
    KeyboardInterrupt where this returns ``interrupted``; ``distributed=True`` is
    :func:`kvcache.distributed.build`).

    Raises:
        MissingSampleError: no source. CacheReadOnlyError: the cache cannot be written.
        BuildError: a worker died. SourceError: the source raised (``errors="raise"``).
    """
    check_job(job, num_workers, errors)
    t0 = time.perf_counter()
    t = _open_writable(job)
    n = t.length
    todo = plan(job, t)
    bar = progress_for(progress, "build")
    if bar is not None:
        bar.start(len(todo))
    try:
        done = fill(job.source, Sink(t.store, t.fp_id, bar), todo, workers=num_workers,
                    max_bytes=t.max_sample_bytes, method=start_method, source_factory=source_factory,
                    skip=errors == "skip", compression=t.compression)
    finally:
        if bar is not None:
            bar.finish()
    warn_too_large(t.path, done.too_large, t.max_sample_bytes)
    failed = sorted(done.failed)
    return BuildReport(n, done.computed, n - len(todo), time.perf_counter() - t0, path=t.path,
                       written=done.written,
                       workers=max(num_workers, 1), interrupted=done.interrupted,
                       too_large=len(done.too_large), failed=[i for i, _ in failed],
                       first_error=failed[0][1] if failed else "")


def plan(job: BuildJob, t: Target) -> Any:
    """What a build computes: the missing indices (an int64 array), or for a keyed cache
    the ``(index, LMDB key, seed, key bytes)`` of every index whose key is not cached (a
    list; every key is computed here first, and a duplicate raises before anything is
    built)."""
    if job.key is None:
        return missing(t.store, t.fp_id, t.length)
    from .keys import key_function, missing_keys

    return missing_keys(t.store, t.fp_id, key_function(job.key, t.path), t.length, t.path)


ERRORS = ("raise", "skip")


def check_job(job: BuildJob, num_workers: int, errors: str = "raise") -> None:
    """Raises MissingSampleError (no source) or ValueError (a negative ``num_workers``,
    an unknown ``errors``)."""
    if job.source is None:
        raise MissingSampleError(f"{job.path}: build() needs a source dataset")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, not {num_workers}")
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, not {errors!r}")
