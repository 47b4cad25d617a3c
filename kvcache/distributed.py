"""One cache built by every rank of a ``torch.distributed`` job (gloo on CPU works).

``LmdbCachedDataset.build(distributed=True)`` and ``kvcache build --distributed`` (under
``torchrun``). Every rank passes the same source and path:

1. rank 0 opens the cache at ``path`` on its machine and finds the missing indices;
   every rank checks that all ranks have the same source (fingerprint and length);
2. the missing indices are dealt round-robin: rank ``r`` computes ``todo[r::world]``
   (with ``num_workers`` worker processes of its own if asked);
3. about every ``ROUND_SECONDS`` each rank sends what it computed to rank 0
   (``gather_object``), and one ``all_reduce`` tells every rank how much is left and
   whether any rank failed; rank 0 alone writes, one transaction per batch, so the cache
   is consistent whenever a rank dies (committed batches stay, a rerun finishes the job).

Why collectives rather than per-rank shard caches merged at the end: across machines the
samples have to travel to rank 0's machine anyway (shards on other nodes' local disks
cannot be merged there), and the collective path writes each sample once where a shard
writes it twice (shard, then merge) and keeps no temporary directories to clean up after
a crash. ``tools/bench_build.py`` measures it against a serial build.

Only rank 0 writes: the complete cache is at ``path`` on rank 0's machine. The other
ranks never write their ``path`` (``kvcache build --distributed`` does not even create
it; a ``LmdbCachedDataset`` constructed there creates an empty cache, as ever): publish
rank 0's cache (``docs/scale.md``) or copy it to each node.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .builder import BuildJob, Sink, Target, check_job, fill, missing, warn_too_large
from .keys import key_function, missing_keys
from .errors import BuildError, CacheReadOnlyError, KvCacheError
from .fingerprint import digest
from .progress import progress_for
from .stats import BuildReport

__all__ = ["ROUND_SECONDS", "build", "build_source"]

ROUND_SECONDS = 0.25  # how often ranks send their samples to rank 0 (and learn what is left)


def _group() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise BuildError("build(distributed=True) needs an initialised torch.distributed process group: "
                         "call torch.distributed.init_process_group('gloo') first, or run "
                         "`torchrun ... -m kvcache build SPEC PATH --distributed`")
    return dist.get_rank(), dist.get_world_size()


def build(job: BuildJob, *, num_workers: int = 0, progress: Any = False, start_method: str | None = None,
          source_factory: Callable[[], Any] | None = None) -> BuildReport:
    """Every rank calls this with its own :class:`~kvcache.builder.BuildJob` for the same
    source and path (``LmdbCachedDataset.build(distributed=True)`` makes one); rank 0
    alone opens the cache (``job.open``).

    Raises:
        MissingSampleError: no source. BuildError: no process group, ranks with different
        sources, a rank died. CacheReadOnlyError: rank 0 cannot write the cache.
    """
    check_job(job, num_workers)
    rank, _world = _group()
    return _run(job.source, digest(job.parts), job.path, job.open if rank == 0 else None,
                num_workers=num_workers, progress=progress, start_method=start_method,
                source_factory=source_factory, key=job.key)


def build_source(job: BuildJob, *, num_workers: int = 0, progress: Any = False,
                 start_method: str | None = None,
                 source_factory: Callable[[], Any] | None = None) -> BuildReport:
    """``kvcache build --distributed``: :func:`build`, first initialising the process group
    from torchrun's environment if needed (gloo), and destroying it after."""
    own = not (dist.is_available() and dist.is_initialized())
    if own:
        if "RANK" not in os.environ:
            raise BuildError("--distributed runs under torchrun (RANK, WORLD_SIZE, MASTER_ADDR are unset); "
                             "e.g. `torchrun --nproc-per-node 4 -m kvcache build SPEC PATH --distributed`")
        dist.init_process_group("gloo")
    try:
        return build(job, num_workers=num_workers, progress=progress, start_method=start_method,
                     source_factory=source_factory)
    finally:
        if own:
            dist.destroy_process_group()


class Exchange:
    """What :func:`kvcache.builder.fill` writes through on each rank: rows are buffered and
    sent to rank 0 every ``ROUND_SECONDS``; rank 0 hands everyone's to its writer."""

    def __init__(self, writer: Sink | None, path: str, fp_id: int, share: int) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writer, self.path, self.fp_id, self.share = writer, path, fp_id, share
        self.rows: list = []
        self.count = 0  # items covered by self.rows (too-large samples have no row)
        self.done = 0  # items of our share computed so far
        self.tick = ROUND_SECONDS
        self.last = time.monotonic()
        self.broken = False  # a round raised: no more collectives
        self.left: int | None = None  # items left on all ranks after the last round

    @property
    def written(self) -> int:
        return self.writer.written if self.writer is not None else 0

    def add(self, rows: list, count: int | None = None) -> None:
        n = len(rows) if count is None else count
        self.rows.extend(rows)
        self.count += n
        self.done += n
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last >= self.tick:
            self.exchange()

    def flush(self) -> None:
        """Nothing: rounds are collective, so only add/maybe_flush/finish start one."""

    def release(self) -> None:
        if self.writer is not None:
            self.writer.release()

    def exchange(self, failed: str | None = None) -> int:
        """One round: send our rows to rank 0 (which writes them); return how many items
        are left on all ranks. Raises BuildError on every rank when one failed."""
        got: list | None = [None] * self.world if self.rank == 0 else None
        write_error: BaseException | None = None
        try:
            dist.gather_object((self.rows, self.count, failed), got, dst=0)
            self.rows, self.count = [], 0
            if got is not None and self.writer is not None:
                try:  # a failed commit (disk full...) still finishes the round with the others
                    for rows, count, _f in got:
                        self.writer.add(rows, count)
                except Exception as exc:  # noqa: BLE001 - raised below, after the round
                    write_error = exc
            bad = failed is not None or write_error is not None
            state = torch.tensor([self.share - self.done, int(bad)], dtype=torch.int64)
            dist.all_reduce(state)
        except RuntimeError as exc:  # a rank died: gloo's connection closed
            self.broken = True
            raise BuildError(f"{self.path}: a rank of the build left the process group ({exc}); "
                             "every committed batch is kept: run the build again to finish") from None
        self.last = time.monotonic()
        self.left = int(state[0])
        if write_error is not None:
            self.broken = True
            raise write_error
        if int(state[1]):
            self.broken = True
            why = "; ".join(f"rank {r}: {g[2]}" for r, g in enumerate(got or []) if g[2])
            raise BuildError(f"{self.path}: the distributed build failed on "
                             f"{why or f'{int(state[1])} rank(s)'}; every committed batch is kept")
        return int(state[0])

    def finish(self) -> None:
        """Exchange until nothing is left anywhere. The last round may already have
        happened inside ``add`` (our last rows arrived as a round was due): then every
        rank saw 0 in it and another round would wait forever for ranks that are done."""
        while self.left is None or self.left > 0:
            self.exchange()

    def keep_local(self) -> None:
        """On rank 0, after an interruption or error: write what reached us (no collective)."""
        if self.writer is not None:
            self.writer.add(self.rows, self.count)
            self.rows, self.count = [], 0
            self.writer.flush()


def _run(source: Any, dg: str, path: str, open_target: Callable[[], Target] | None, *, num_workers: int, progress: Any,
         start_method: str | None, source_factory: Callable[[], Any] | None,
         key: Callable[[int], Any] | None = None) -> BuildReport:
    rank, world = _group()
    t0 = time.perf_counter()
    head: list[Any] = [None]
    todo = np.empty(0, dtype=np.int64)
    failure: BaseException | None = None
    target: Target | None = None
    if open_target is not None:  # rank 0
        try:
            target = open_target()
            fp_id = target.fp_id
            if fp_id is None or not target.store.writable:
                raise CacheReadOnlyError(target.store.handle().readonly_reason
                                         or f"{path}: the cache cannot be written on rank 0's machine")
            if key is None:
                todo = missing(target.store, fp_id, target.length)
            else:  # every key computed and checked for duplicates here; ranks key their share
                items = missing_keys(target.store, fp_id, key_function(key, path), target.length, path)
                todo = np.array([it[0] for it in items], dtype=np.int64)
            head[0] = {"fp_id": fp_id, "n": target.length, "todo": len(todo),
                       "max_bytes": target.max_sample_bytes, "compression": target.compression}
        except (KvCacheError, OSError, ValueError) as exc:
            failure, head[0] = exc, {"error": f"{type(exc).__name__}: {exc}"}
    dist.broadcast_object_list(head, src=0)
    h = head[0]
    if "error" in h:
        if failure is not None:
            raise failure
        raise BuildError(f"{path}: rank 0 could not open the cache: {h['error']}")
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (dg, len(source)))
    odd = [r for r, x in enumerate(everyone) if x != everyone[0]]
    if odd:
        raise BuildError(f"{path}: rank(s) {odd} build another source than rank 0 (fingerprint or "
                         "length differ): every rank must pass the same source, version and path")
    shared = torch.from_numpy(todo) if rank == 0 else torch.empty(h["todo"], dtype=torch.int64)
    if h["todo"]:
        dist.broadcast(shared, src=0)
    share: Any = shared.numpy()[rank::world]
    bar = progress_for(progress, "build") if rank == 0 else None
    if bar is not None:
        bar.start(h["todo"])
    writer = Sink(target.store, h["fp_id"], bar) if target is not None else None
    ex = Exchange(writer, path, h["fp_id"], len(share))
    interrupted = ok = False
    try:
        try:
            if key is not None:  # a keyed build: each rank keys its share with its own key function
                kf = key_function(key, path)
                share = [(i, *kf(i)) for i in share.tolist()]
            done = fill(source, ex, share, workers=num_workers, max_bytes=h["max_bytes"],
                        compression=h.get("compression"),
                        method=start_method, source_factory=source_factory)
        except Exception as exc:
            if not ex.broken:  # tell every rank (they raise BuildError), then raise ours
                try:
                    ex.exchange(failed=f"{type(exc).__name__}: {exc}")
                except BuildError:
                    pass
            raise
        if done.interrupted:
            interrupted = True
        else:
            ex.finish()
        ok = True
    finally:
        try:
            ex.keep_local()
        except KvCacheError:
            if ok:  # else the error on its way out says more
                raise
        if bar is not None:
            bar.finish()
    if interrupted:
        return BuildReport(h["n"], ex.written, h["n"] - h["todo"], time.perf_counter() - t0, path=path,
                           workers=max(num_workers, 1), ranks=world, rank=rank, interrupted=True)
    big = torch.tensor([len(done.too_large)], dtype=torch.int64)
    dist.all_reduce(big)
    written: list[Any] = [ex.written]
    dist.broadcast_object_list(written, src=0)
    if rank == 0:
        warn_too_large(path, done.too_large, h["max_bytes"], total=int(big[0]))
    return BuildReport(h["n"], written[0], h["n"] - h["todo"], time.perf_counter() - t0, path=path,
                       workers=max(num_workers, 1), ranks=world, rank=rank, too_large=int(big[0]))


