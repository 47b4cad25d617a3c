"""The fingerprints a cache knows, and which one is current.

Info rows (JSON):

* ``fp:<digest>`` -> ``{"id": n, "digest": ..., "parts": {...}, "created": t}``
* ``fp_next``     -> the next free fingerprint id (ids start at 1; 0 means "none")
* ``current``     -> ``{"id": n, "digest": ..., "length": len(source)}``, the source that
  last opened the cache for writing

Every record carries the id of the fingerprint that wrote it, and a reader only serves
records whose id is its own, so a changed source never gets an old sample.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .errors import StaleCacheError
from .fingerprint import diff_parts, digest
from .store import Rows, Store

__all__ = ["Resolved", "current", "fingerprints", "resolve"]


@dataclass(frozen=True)
class Resolved:
    """The outcome of matching a source against a cache."""

    fp_id: int | None  # None: this source has never written here (every read is a miss)
    length: int | None  # the source length recorded with the current fingerprint
    stale: list[str]  # the parts that differ from the previous current fingerprint
    reset: bool  # the cache was emptied (on_stale="reset")


def current(store: Store) -> dict[str, Any] | None:
    return store.info_get(b"current")


def fingerprints(store: Store) -> dict[int, dict[str, Any]]:
    """Every fingerprint the cache knows, by id."""
    out = {}
    for k, v in store.info_items().items():
        if k.startswith("fp:") and isinstance(v, dict):
            out[int(v["id"])] = v
    return out


def resolve(store: Store, parts: dict[str, Any] | None, length: int | None, on_stale: str) -> Resolved:
    """Match a source's fingerprint ``parts`` against the cache (``None``: no source, serve
    the current fingerprint). Registers the fingerprint and makes it current when the
    cache is writable.

    Raises:
        StaleCacheError: the cache was filled by another source and ``on_stale="error"``.
    """
    cur = current(store)
    if parts is None:
        return Resolved(cur["id"] if cur else None, cur.get("length") if cur else None, [], False)
    dg = digest(parts)
    row = store.info_get(b"fp:" + dg.encode())
    stale: list[str] = []
    if cur is not None and cur["digest"] != dg:
        old = store.info_get(b"fp:" + cur["digest"].encode()) or {}
        stale = diff_parts(old.get("parts", {}), parts) or ["fingerprint digest"]
        if on_stale == "error":
            raise StaleCacheError(
                f"{store.path} was filled by a different source; changed: {'; '.join(stale)}. "
                "Use on_stale='recompute' (recompute samples as they are read), "
                "on_stale='reset' (start empty), or another cache path"
            )
    if not store.writable:
        return Resolved(row["id"] if row else None, length, stale, False)
    reset = bool(stale) and on_stale == "reset"
    e = store.handle()

    def register(rows: Rows) -> int:
        # through store.Rows: an on_stale reset empties the tally with the rows, and a
        # cache written before the tally existed gets one counted here, once
        txn = rows.txn
        raw = txn.get(b"fp:" + dg.encode(), db=e.info)
        if raw is None:
            nxt = txn.get(b"fp_next", db=e.info)
            fp_id = int(nxt) if nxt else 1
            txn.put(b"fp_next", str(fp_id + 1).encode(), db=e.info)
            txn.put(b"fp:" + dg.encode(), json.dumps(
                {"id": fp_id, "digest": dg, "parts": parts, "created": time.time()}).encode(), db=e.info)
        else:
            fp_id = json.loads(bytes(raw))["id"]
        if reset:
            rows.clear()
        txn.put(b"current", json.dumps({"id": fp_id, "digest": dg, "length": length}).encode(), db=e.info)
        return fp_id

    fp_id = store.transact_rows(register)
    return Resolved(fp_id, length, stale, reset)
