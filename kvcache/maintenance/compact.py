"""``compact``: rewrite the cache without free pages, verify the copy, swap it in."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import lmdb

from .. import structure
from ..errors import CacheCorruptError
from ..store import translate
from ._common import check_cache, exclusive, file_bytes, open_raw, sibling_dir, swap_in
from .verify import scan

__all__ = ["CompactReport", "compact"]


@dataclass(frozen=True)
class CompactReport:
    """Sizes before and after, as the environment counts them (``(last_pgno+1) * psize``)."""

    path: str
    bytes_before: int
    bytes_after: int
    entries: int
    disk_bytes_before: int  # data.mdb's length on disk (may hold a reusable tail)
    disk_bytes_after: int

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


def compact(path: str | os.PathLike) -> CompactReport:
    """Compact the cache at ``path`` in place.

    ``copy(compact=True)`` into a sibling directory, check every record of the copy in a
    child process, then rename its ``data.mdb`` over the cache's. Needs the cache to
    itself: every kvcache opener holds ``kvcache.lock`` shared, and compact takes it
    exclusively without waiting.

    Raises:
        NotACacheError: not a cache.
        CacheBusyError: another process has the cache open ("in use by N processes").
        CacheCorruptError: the copy does not verify (the cache is left untouched; run
            ``kvcache verify --repair``).
    """
    path = check_cache(path)
    data = os.path.join(path, "data.mdb")
    with exclusive(path, "compact"):
        disk_before = os.path.getsize(data)
        tmp = sibling_dir(path, "compact")
        try:
            env = open_raw(path)
            try:
                before = file_bytes(env)
                with env.begin() as txn:
                    samples = env.open_db(b"samples", txn=txn, create=False)
                    entries = txn.stat(samples)["entries"]
                env.copy(tmp, compact=True)
            except lmdb.Error as exc:
                raise translate(exc, path) from None
            finally:
                env.close()
            check = scan(tmp)
            if check.signal or check.errors or check.entries != entries:
                raise CacheCorruptError(
                    f"{path}: the compacted copy does not verify ({'; '.join(check.errors) or check.signal}); "
                    f"the cache is unchanged; run `kvcache verify {path}`")
            swap_in(path, tmp)
            structure.restamp(path, True)  # the copy the scan walked (the rename moved only ctime)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        env = open_raw(path)
        try:
            after = file_bytes(env)
        finally:
            env.close()
        return CompactReport(path, before, after, entries, disk_before, os.path.getsize(data))
