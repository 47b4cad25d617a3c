"""Lock-free opening: what kvcache says and does for published caches and for caches
on network or FUSE filesystems (see :mod:`kvcache.env` for where it applies).

A cache kvcache refuses to create on a network filesystem is replaced, for a dataset
that has a source, by :class:`NoEnvironment`: every read misses, so every sample is
computed from the source and nothing is written anywhere.
"""

from __future__ import annotations

import os
from typing import Any

from .mounts import FsInfo

__all__ = ["ALLOW_NETWORK_WRITES_ENV", "EmptyTxn", "NoEnvironment", "PREFETCH_BYTES_ENV", "cold_reads",
           "memory_bytes", "network_refusal", "network_writes_allowed", "prefetch", "prefetch_limit",
           "published_note", "read_policy"]

ALLOW_NETWORK_WRITES_ENV = "KVCACHE_ALLOW_NETWORK_WRITES"
PREFETCH_BYTES_ENV = "KVCACHE_PREFETCH_BYTES"
DEFAULT_PREFETCH_BYTES = 64 << 20


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def read_policy(readahead: bool | None, lockfree: bool, size: int) -> tuple[bool, bool]:
    """``(readahead, prefetch)`` for a cache whose ``data.mdb`` has ``size`` bytes.

    ``readahead=None`` (the default) chooses: a lock-free cache (published, or on a network
    filesystem) no larger than :func:`prefetch_limit` is read once sequentially at open
    (:func:`prefetch`) with OS readahead on: the first pass then costs a few large round
    trips. A larger one is read with readahead off (py-lmdb then advises ``MADV_RANDOM``
    on the map): a 3 KiB record costs one page, not a 128 KiB window of records nobody
    asked for, and batches fetch their records' pages concurrently instead
    (:func:`cold_reads`). On local disk readahead stays off (random reads only fill the
    page cache with neighbours). An explicit ``readahead=True`` keeps it on, and
    prefetches a lock-free cache within the limit.
    """
    small = size <= prefetch_limit()
    if readahead is None:
        readahead = lockfree and small
    return readahead, lockfree and readahead and small


def prefetch_limit() -> int:
    """The largest ``data.mdb`` that :func:`prefetch` reads ahead (``KVCACHE_PREFETCH_BYTES``,
    default 64 MiB; 0 turns prefetching off)."""
    try:
        return int(os.environ.get(PREFETCH_BYTES_ENV, DEFAULT_PREFETCH_BYTES))
    except ValueError:
        return DEFAULT_PREFETCH_BYTES


def prefetch(path: str) -> bool:
    """Read a lock-free cache's ``data.mdb`` once, sequentially in 1 MiB reads, when it
    is no larger than :func:`prefetch_limit`, so that its pages are in the page cache
    before the first random read. Over a network the first pass then costs a few large
    round trips instead of one per page fault (docs/network.md measures it;
    ``posix_fadvise(WILLNEED)`` does not do it: Linux caps it at the readahead window).
    Returns whether it read the file; errors are ignored (the reads will fault pages in).
    """
    limit = prefetch_limit()
    if limit <= 0:
        return False
    try:
        fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            return False
        buf = bytearray(1 << 20)
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while f.readinto(buf):
                pass
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cold_reads(lockfree: bool, prefetched: bool, size: int) -> bool:
    """Whether reads of this cache mostly miss the page cache, so that a batch should ask
    for all its records' pages at once (:mod:`kvcache.reader`): a lock-free cache that was
    not prefetched (over a network each page fault is a round trip), or a file larger than
    this machine's memory. A warm local cache keeps the plain path (no system call)."""
    mem = memory_bytes()
    return (lockfree and not prefetched) or (mem > 0 and size > mem)


def network_refusal(path: str, fs: FsInfo) -> str:
    """The one message for a cache that kvcache will not write on a network filesystem."""
    return (f"{path} is on a {fs.network} filesystem ({fs.describe()}): kvcache does not write "
            "an LMDB cache there (LMDB's locks and memory map are not coherent across hosts; "
            "writers corrupt it or die with SIGBUS), so misses are computed and not stored. "
            f"Build the cache on local disk, then `kvcache publish LOCAL_CACHE {path}`; "
            f"or, if only this host ever uses it, allow_network_writes=True "
            f"({ALLOW_NETWORK_WRITES_ENV}=1)")


def published_note(path: str) -> str:
    """What a published cache says to a write, or to a miss it will not store."""
    return (f"{path} is a published cache (immutable, read lock-free): nothing is written there; "
            "misses (indices it lacks, or samples of a changed source) are computed and returned, "
            f"not stored (stats().misses counts them); to change it, publish again: "
            f"`kvcache publish --force SRC {path}`")


def network_writes_allowed(flag: bool) -> bool:
    return flag or os.environ.get(ALLOW_NETWORK_WRITES_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class EmptyCursor:
    def first(self) -> bool:
        return False

    last = first

    def __iter__(self) -> Any:
        return iter(())


class EmptyTxn:
    """A read transaction on no data: what a cache that cannot exist here holds."""

    def get(self, key: bytes, default: Any = None, db: Any = None) -> Any:
        return default

    def cursor(self, db: Any = None) -> EmptyCursor:
        return EmptyCursor()

    def stat(self, db: Any = None) -> dict[str, int]:
        return {"entries": 0, "psize": 4096, "depth": 0, "branch_pages": 0, "leaf_pages": 0,
                "overflow_pages": 0}

    def abort(self) -> None:
        pass

    def __enter__(self) -> "EmptyTxn":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class NoEnvironment:
    """Stands in for an LMDB environment that kvcache refused to create (a new cache on a
    network filesystem): every read misses, so the dataset computes every sample."""

    def begin(self, db: Any = None, parent: Any = None, write: bool = False, buffers: bool = False) -> EmptyTxn:
        return EmptyTxn()

    def close(self) -> None:
        pass
