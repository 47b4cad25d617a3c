"""``build``: fill every missing index of a cache with worker processes and one writer."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..errors import CacheReadOnlyError, KvCacheError
from ..store import META_ROW
from .spec import load_spec, progress_callback

__all__ = ["BuildReport", "build"]

CHUNK = 32  # indices per task sent to a worker
BATCH_ITEMS = 256  # records per write transaction
BATCH_SECONDS = 1.0


@dataclass(frozen=True)
class BuildReport:
    path: str
    total: int  # the source's length
    computed: int  # records computed and written by this run
    already_cached: int  # indices skipped because they were cached before this run
    seconds: float
    workers: int
    interrupted: bool = False  # stopped by Ctrl-C; run again to resume

    @property
    def items_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


# -- worker side: the source is built from the spec in each worker (nothing live is pickled)

_source: Any = None
_fp_id = 0


def _init(spec: str, fp_id: int) -> None:
    global _source, _fp_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _source, _fp_id = load_spec(spec), fp_id


def _compute(indices: list[int]) -> list[tuple[int, bytes, bytes]]:
    out = []
    for i in indices:
        try:
            record, layout, checksum = codec.encode(_source[i], _fp_id)
        except KvCacheError as exc:
            raise type(exc)(f"index {i}: {exc}") from None
        out.append((i, record, META_ROW.pack(_fp_id, checksum, len(record)) + layout))
    return out


def build(spec: str, path: str | os.PathLike, *, workers: int = 1, version: str | int | None = None,
          progress: Any = False) -> BuildReport:
    """Compute and store every index of the source that the cache does not hold yet.

    ``spec`` (``module:callable`` or ``path/to/file.py:callable``) returns the source
    dataset; it is called once here (to fingerprint the source) and once in each worker.
    Workers compute and encode samples in parallel; this process alone writes them, in
    batches of one transaction each, so a Ctrl-C or kill leaves every written batch in
    place and nothing half-written. Running it again resumes.

    Args:
        workers: worker processes (1 computes in this process).
        version: the ``version=`` salt of the fingerprint (as for LmdbCachedDataset).
        progress: True for a progress line on stderr, or a callable ``(done, total)``.

    Returns:
        a report with ``items_per_s``; ``interrupted`` is True after Ctrl-C.

    Raises:
        ValueError: a bad spec. NotACacheError, StaleCacheError, ...: as for opening
        an LmdbCachedDataset on ``path``.
    """
    global _source, _fp_id
    from ..dataset import (
        LmdbCachedDataset,  # torch lives there; keep `import kvcache.maintenance` light
    )

    source = load_spec(spec)
    ds = LmdbCachedDataset(source, path, version=version, lru_bytes=0)
    t0 = time.perf_counter()
    computed = 0
    interrupted = False
    bar = progress_callback(progress, "build")
    try:
        total = len(ds)
        have = ds.cached_indices()
        todo = [i for i in range(total) if i not in have]
        fp_id, store = ds._fp_id, ds._store
        if not store.writable:  # read-only, published, or on a network filesystem
            raise CacheReadOnlyError(store.handle().readonly_reason or f"{path}: the cache is read-only")
        assert fp_id is not None
        if bar is not None:
            bar.start(len(todo))
        rows: list[tuple[int, bytes, bytes]] = []
        last = time.monotonic()

        def flush() -> None:
            nonlocal computed, last
            if rows:
                store.write_records(rows, fp_id)
                computed += len(rows)
                if bar is not None:
                    bar.update(len(rows))
                rows.clear()
            last = time.monotonic()

        chunks = [todo[k:k + CHUNK] for k in range(0, len(todo), CHUNK)]
        pool = None
        try:
            if workers > 1 and chunks:
                store.close()  # never hold an environment across fork
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                pool = ctx.Pool(workers, initializer=_init, initargs=(spec, fp_id))
                results = pool.imap_unordered(_compute, chunks)
            else:
                _source, _fp_id = source, fp_id
                results = map(_compute, chunks)
            for part in results:
                rows.extend(part)
                if len(rows) >= BATCH_ITEMS or time.monotonic() - last > BATCH_SECONDS:
                    flush()
            flush()
            if pool is not None:
                pool.close()
                pool.join()
        except KeyboardInterrupt:
            interrupted = True
            flush()  # every row here is a complete record: keep them
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            _source = None
    finally:
        if bar is not None:
            bar.finish()
        ds.close()
    return BuildReport(os.path.abspath(os.fspath(path)), total, computed, len(have),
                       time.perf_counter() - t0, workers, interrupted)
