"""``gc``: drop rows written by sources other than the current one."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import codec
from ..catalog import current
from ..errors import CorruptRecordError
from ..store import Rows, Store
from ._common import check_cache, file_bytes, live_bytes

__all__ = ["GcReport", "gc"]


@dataclass(frozen=True)
class GcReport:
    path: str
    removed: int  # records (and their metadata rows) of other fingerprints
    kept: int
    file_bytes: int  # what the environment uses now; gc frees pages but never shrinks the file
    compact_would_reclaim: int  # about how much ``kvcache compact`` would give back


def gc(path: str | os.PathLike) -> GcReport:
    """Delete every record and metadata row whose fingerprint is not the current one.

    Freed pages are reused by later writes; ``kvcache compact`` gives them back to the
    filesystem. Safe while others use the cache (it is an ordinary write transaction).

    Raises:
        NotACacheError, CacheReadOnlyError, CacheCorruptError.
    """
    path = check_cache(path)
    with Store(path, create=False) as store:
        e = store.handle()
        cur = current(store)
        cur_id = cur["id"] if cur else None

        def drop(rows: Rows) -> tuple[int, int]:
            txn = rows.txn
            doomed, kept = [], 0
            for k, v in txn.cursor(db=e.samples):
                try:
                    fp = codec.read_header(v)[0]
                except CorruptRecordError:
                    fp = None  # verify --repair deals with damaged records
                if fp is not None and fp != cur_id:
                    doomed.append(bytes(k))
                else:
                    kept += 1
            for k, v in txn.cursor(db=e.meta):
                fp = codec.meta_fp(v)
                if fp is not None and fp != cur_id:
                    doomed.append(bytes(k))
            removed = set()
            for k in doomed:
                if rows.delete(k)[0]:
                    removed.add(k)
            return len(removed), kept

        removed, kept = store.transact_rows(drop)
        fb = file_bytes(e.env)
        return GcReport(path, removed, kept, fb, max(fb - live_bytes(e.env), 0))
