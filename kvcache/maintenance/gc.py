"""``gc``: drop rows written by sources other than the current one, and (with the source
of a keyed cache) rows whose keys the source no longer has."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .. import catalog, codec
from ..catalog import current
from ..errors import CorruptRecordError, StaleCacheError
from ..fingerprint import compute_parts, diff_parts, digest
from ..keys import all_keys, key_function
from ..store import Rows, Store
from ._common import check_cache, file_bytes, live_bytes

__all__ = ["GcReport", "gc"]


@dataclass(frozen=True)
class GcReport:
    path: str
    removed: int  # records (and their metadata rows) deleted, of both kinds below
    kept: int
    file_bytes: int  # what the environment uses now; gc frees pages but never shrinks the file
    compact_would_reclaim: int  # about how much ``kvcache compact`` would give back
    unkeyed: int = 0  # of ``removed``: current records whose key the source no longer has


def gc(path: str | os.PathLike, source: Any = None, key: Callable[[int], str | bytes] | None = None,
       *, version: str | int | None = None, fingerprint: str | None = None) -> GcReport:
    """Delete every record and metadata row whose fingerprint is not the current one;
    with the ``source`` and ``key`` function of a keyed cache, also every record whose key
    ``key(i)`` no longer returns for any index ``i`` of the source (items removed from it,
    or whose key changed).

    Freed pages are reused by later writes; ``kvcache compact`` gives them back to the
    filesystem. Safe while others use the cache (it is an ordinary write transaction; a
    process still reading the source's old items recomputes a dropped one as a miss).

    Args:
        source, key: the current source and its key function (``version=`` /
            ``fingerprint=`` as it is opened with): every key is computed (``key`` is
            called ``len(source)`` times), the source itself is not called.

    Raises:
        NotACacheError, CacheReadOnlyError, CacheCorruptError.
        StaleCacheError: ``source`` is not the cache's current source (its fingerprint
            differs: nothing is deleted). ValueError: ``source`` without ``key``, or the
            cache is not keyed. KeyFunctionError, DuplicateKeyError: the key function
            failed for an index (nothing is deleted).
    """
    path = check_cache(path)
    if (source is None) != (key is None):
        raise ValueError("gc by keys needs both source= and key= (the key function)")
    with Store(path, create=False) as store:
        e = store.handle()
        cur = current(store)
        cur_id = cur["id"] if cur else None
        keep: set[bytes] | None = None
        if source is not None:
            keep = _current_keys(store, path, cur, source, key, version, fingerprint)

        def drop(rows: Rows) -> tuple[int, int, int]:
            txn = rows.txn
            doomed, kept, unkeyed = [], 0, 0
            for k, v in txn.cursor(db=e.samples):
                try:
                    fp = codec.read_header(v)[0]
                except CorruptRecordError:
                    fp = None  # verify --repair deals with damaged records
                if fp is not None and fp != cur_id:
                    doomed.append(bytes(k))
                elif keep is not None and fp is not None and len(k) == 16 and bytes(k) not in keep:
                    doomed.append(bytes(k))
                    unkeyed += 1
                else:
                    kept += 1
            for k, v in txn.cursor(db=e.meta):
                fp = codec.meta_fp(v)
                if fp is not None and (fp != cur_id or (keep is not None and len(k) == 16
                                                        and bytes(k) not in keep)):
                    doomed.append(bytes(k))
            removed = set()
            for k in doomed:
                if rows.delete(k)[0]:
                    removed.add(k)
            return len(removed), kept, unkeyed

        removed, kept, unkeyed = store.transact_rows(drop)
        fb = file_bytes(e.env)
        return GcReport(path, removed, kept, fb, max(fb - live_bytes(e.env), 0), unkeyed)


def _current_keys(store: Store, path: str, cur: Any, source: Any, key: Any, version: Any,
                  fingerprint: Any) -> set[bytes]:
    """The LMDB keys of every index of ``source``, after checking it is the current source."""
    parts = compute_parts(source, version, fingerprint, keyed=True)
    old = (catalog.fingerprints(store).get(cur["id"]) or {}).get("parts") if cur else None
    if not (isinstance(old, dict) and old.get("keyed") is True):
        raise ValueError(f"{path} is not a keyed cache (filled without key=): gc by keys applies "
                         "to keyed caches only")
    if digest(parts) != cur["digest"]:
        raise StaleCacheError(
            f"cannot gc {path} by the keys of this source: it is not the cache's current source "
            f"({'; '.join(diff_parts(old, parts)) or 'fingerprint digest'}); nothing was deleted")
    lks, _seeds, _kbs = all_keys(key_function(key, path), len(source), path)
    return set(lks)
