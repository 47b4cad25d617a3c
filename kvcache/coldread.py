"""Cold reads of a batch, fetched concurrently.

When a cache's pages are mostly not in memory (a lock-free cache read over a network, a
file larger than the machine's memory), every page a read touches costs a page fault, and
over a network each fault is a round trip: a batch read one record after another pays
them one after another (256 records, 256 round trips and more). :func:`fetch` brings the
pages of all the batch's records in at once: a small pool of threads, each with its own
read transaction, looks the keys up. py-lmdb releases the GIL around ``mdb_get`` and
touches the value's pages before returning it, so the faults of different records (the
tree's leaf pages on the way, then the records themselves) are in flight together, and
the batch then reads from memory as usual (:mod:`kvcache.reader`).

Only caches opened with ``Env.cold`` set use it (:func:`kvcache.lockfree.cold_reads`):
on a warm local cache a read stays one ``get`` with no system call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import lmdb

__all__ = ["THREADS", "fetch", "map_of", "willneed"]

THREADS = 16  # faults in flight per process (netsim at 200 µs: 8 -> 16 -> 32 threads; docs/network.md)
_MIN_BATCH = 4  # below this, fetching concurrently costs more than it saves

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    pid = os.getpid()
    if _pool is None or _pool_pid != pid:  # threads do not survive fork: a new pool per process
        with _pool_lock:
            if _pool is None or _pool_pid != pid:
                _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="kvcache-fetch")
                _pool_pid = pid
    return _pool


def _touch(env: Any, db: Any, keys: Sequence[bytes]) -> None:
    try:
        txn = env.begin(db=db, buffers=True)
    except lmdb.Error:
        return  # the batch's own read reports what is wrong
    try:
        get = txn.get
        for k in keys:
            try:
                get(k)
            except lmdb.Error:
                return
    finally:
        txn.abort()


def fetch(env: Any, db: Any, keys: Sequence[bytes], threads: int = THREADS) -> None:
    """Fault in the pages of the records at ``keys`` concurrently (returns when they are
    in memory, or when a lookup failed: the caller's own read then reports it)."""
    n = min(threads, len(keys) // 2)
    if len(keys) < _MIN_BATCH or n < 2:
        return
    pool = _get_pool()
    futures = [pool.submit(_touch, env, db, keys[j::n]) for j in range(n)]
    for f in futures:
        f.result()


def map_of(path: str) -> tuple[int, int] | None:
    """``(address, length)`` of this process's mapping of the file ``path`` (from
    ``/proc/self/maps``; LMDB maps ``data.mdb`` once, from offset 0), or None."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real and parts[2] == "00000000":
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    return lo, hi - lo
    except (OSError, ValueError):
        pass
    return None


_MADV_WILLNEED = 3


def willneed(path: str, offset: int, length: int) -> bool:
    """Ask the kernel to read ``length`` bytes of ``path`` at ``offset`` into this process's
    map of it, in the background (``madvise(MADV_WILLNEED)``: one or two large requests
    instead of a page fault, a round trip, per page). False where it could not."""
    m = map_of(path)
    if m is None or offset < 0 or length <= 0:
        return False
    addr, size = m
    start = offset & ~4095
    end = min(offset + length, size)
    if start >= end:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(addr + start), ctypes.c_size_t(end - start), _MADV_WILLNEED) == 0
    except (OSError, AttributeError):
        return False
