"""What a dataset reports about itself: per-process counters and build reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["BuildReport", "CacheStats"]


@dataclass
class CacheStats:
    """This process's counts for one dataset (DataLoader workers each keep their own)."""

    hits: int = 0  # served from the cache (LMDB, or a computed sample not yet committed)
    misses: int = 0  # computed from the source
    lru_hits: int = 0  # served from the in-process LRU
    writes: int = 0  # records committed by this process
    corrupt: int = 0  # records that failed their checksum (recomputed or raised)
    # records that could not be written (disk full, map at max_map_size, read-only, ...),
    # counted when their batch is written: at the latest on flush() / close()
    write_errors: int = 0
    stale: int = 0  # records of another fingerprint, recomputed
    too_large: int = 0  # samples over max_sample_bytes, served uncached

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class BuildReport:
    """What a build did (``LmdbCachedDataset.build``, ``kvcache build``)."""

    total: int  # the source's length
    computed: int  # samples computed (and encoded) by this run
    already_cached: int  # indices skipped because they were cached before this run
    seconds: float
    path: str = ""
    workers: int = 1  # processes computing samples on each rank (1: the building process)
    ranks: int = 1  # processes of the torch.distributed group sharing the work
    rank: int = 0  # this process's rank (the report is the whole job's on every rank)
    interrupted: bool = False  # stopped by Ctrl-C; every committed batch is kept, run again
    too_large: int = 0  # samples over max_sample_bytes, not cached
    written: int = -1  # records this run committed (fewer than computed when a concurrent
    # build wrote the same indices first: the first writer wins); -1: not counted apart
    failed: list[int] = field(default_factory=list)  # errors="skip": indices whose source raised
    first_error: str = ""  # the first of those errors ("TypeName: message")

    @property
    def items_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0
