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

from .errors import CacheCorruptError, StaleCacheError
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
    recompute: int = 0  # when stale: cached records of other sources (recomputed if read)
    deliberate: bool = False  # only version= / fingerprint= changed: the user asked for it


def _valid_id(v: Any) -> bool:
    return type(v) is int and 0 < v < 1 << 32


def _fp_row(v: Any) -> bool:
    """Whether ``v`` is a fingerprint row as kvcache writes it."""
    return isinstance(v, dict) and _valid_id(v.get("id")) and isinstance(v.get("digest"), str)


def current(store: Store) -> dict[str, Any] | None:
    """The ``current`` row, or None.

    Raises:
        CacheCorruptError: the row is damaged (not what kvcache writes there).
    """
    cur = store.info_get(b"current")
    if cur is None:
        return None
    length = cur.get("length") if isinstance(cur, dict) else None
    if not _fp_row(cur) or not (length is None or (type(length) is int and length >= 0)):
        raise store.damaged_row(b"current")
    return cur


def _fp_get(store: Store, dg: str) -> dict[str, Any] | None:
    row = store.info_get(b"fp:" + dg.encode())
    if row is not None and (not _fp_row(row) or row["digest"] != dg):
        raise store.damaged_row(b"fp:" + dg.encode())
    return row


def fingerprints(store: Store) -> dict[int, dict[str, Any]]:
    """Every fingerprint the cache knows, by id (damaged rows are left out)."""
    out = {}
    for k, v in store.info_items().items():
        if k.startswith("fp:") and _fp_row(v):
            out[v["id"]] = v
    return out


def resolve(store: Store, parts: dict[str, Any] | None, length: int | None, on_stale: str) -> Resolved:
    """Match a source's fingerprint ``parts`` against the cache (``None``: no source, serve
    the current fingerprint). Registers the fingerprint and makes it current when the
    cache is writable.

    Raises:
        StaleCacheError: the cache was filled by another source and ``on_stale="error"``.
    """
    rebuild = parts is not None and store.writable  # a source can rebuild damaged rows
    try:
        cur = current(store)
    except CacheCorruptError:
        if not rebuild:
            raise
        cur = None  # the source's own row replaces it below
    if parts is None:
        return Resolved(cur["id"] if cur else None, cur.get("length") if cur else None, [], False)
    dg = digest(parts)
    try:
        row = _fp_get(store, dg)
    except CacheCorruptError:
        if not rebuild:
            raise
        row = None  # registered again under a new id: its old records become stale
    stale: list[str] = []
    deliberate = False
    if cur is not None and cur["digest"] != dg:
        try:
            old = _fp_get(store, cur["digest"]) or {}
        except CacheCorruptError:
            old = {}
        old_parts = old.get("parts")
        old_parts = old_parts if isinstance(old_parts, dict) else {}
        stale = diff_parts(old_parts, parts) or ["fingerprint digest"]
        deliberate = bool(old_parts) and {k for k in set(old_parts) | set(parts)
                                          if old_parts.get(k) != parts.get(k)} <= {"version", "fingerprint"}
        if on_stale == "error":
            raise StaleCacheError(
                f"{store.path} was filled by a different source; changed: {'; '.join(stale)}. "
                "Use on_stale='recompute' (recompute samples as they are read), "
                "on_stale='reset' (start empty), or another cache path"
            )
    if not store.writable:
        fp_id = row["id"] if row else None
        return Resolved(fp_id, length, stale, False, _others(store, fp_id) if stale else 0, deliberate)
    if not stale and cur is not None and row is not None and cur["id"] == row["id"] \
            and cur.get("length") == length:
        # nothing changed: no write transaction (its commit is an fsync, ~5 ms per open)
        return Resolved(row["id"], length, [], False)
    reset = bool(stale) and on_stale == "reset"
    e = store.handle()

    def register(rows: Rows) -> int:
        # through store.Rows: an on_stale reset empties the tally with the rows, and a
        # cache written before the tally existed gets one counted here, once
        txn = rows.txn
        raw = txn.get(b"fp:" + dg.encode(), db=e.info)
        known = _loads(raw)
        if _fp_row(known) and known["digest"] == dg:
            fp_id = known["id"]
        else:  # new, or a damaged row rebuilt under a fresh id
            fp_id = _next_id(txn, e.info)
            txn.put(b"fp_next", str(fp_id + 1).encode(), db=e.info)
            txn.put(b"fp:" + dg.encode(), json.dumps(
                {"id": fp_id, "digest": dg, "parts": parts, "created": time.time()}).encode(), db=e.info)
        if reset:
            rows.clear()
        txn.put(b"current", json.dumps({"id": fp_id, "digest": dg, "length": length}).encode(), db=e.info)
        return fp_id

    fp_id = store.transact_rows(register)
    return Resolved(fp_id, length, stale, reset, 0 if reset or not stale else _others(store, fp_id), deliberate)


def _others(store: Store, fp_id: int | None) -> int:
    """Records written by fingerprints other than ``fp_id`` (O(1) with a stored tally)."""
    t = store.tally()
    return t.rows - (t.get(fp_id).rows if fp_id is not None else 0)


def _loads(raw: Any) -> Any:
    try:
        return None if raw is None else json.loads(bytes(raw))
    except ValueError:
        return None


def _next_id(txn: Any, db: Any) -> int:
    """The next free fingerprint id: ``fp_next``, or past every id in use when that row
    is damaged (reusing an id would serve another source's records)."""
    nxt = _loads(txn.get(b"fp_next", db=db))
    used = [v["id"] for k, v in ((bytes(k), _loads(v)) for k, v in txn.cursor(db=db))
            if k.startswith(b"fp:") and _fp_row(v)]
    if type(nxt) is int and _valid_id(nxt) and all(i < nxt for i in used):
        return nxt
    return max(used, default=0) + 1
