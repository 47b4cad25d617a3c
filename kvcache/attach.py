"""Attaching a dataset to its cache in a process, and what the attached cache holds.

:class:`Attaching` opens this process's environment and matches the source's fingerprint
against the cache's catalog (``_prepare``: the fingerprint id records carry, the length,
whether misses are stored, the stale/reset/read-only warnings), keeps it open and looks
at the file again every ``CHECK_EVERY_S`` (``_handle``), and answers the questions asked
of the open cache by kvcache's build and maintenance code (``fingerprint_id``,
``storage_key``, ``cached_indices``, ``random_cached``, ...).
"""

from __future__ import annotations

import random
import time
from typing import Any

from . import builder, catalog
from .errors import CacheCorruptError, KeyedCacheError
from .fingerprint import compute_parts
from .selfrepair import CHECK_EVERY_S, file_id
from .store import KEY, Store

__all__ = ["Attaching"]

_monotonic = time.monotonic


class Attaching:
    """The opening half of :class:`kvcache.LmdbCachedDataset` (a base class, not used alone).

    It uses the dataset's ``path``, ``source``, ``_args``, ``_parts``, ``_keyfn``,
    ``_store``, ``_writer``, ``_lru``, ``_closed``, and sets ``_env``, ``_fp_id``,
    ``_fp_read``, ``_len``, ``_unstored``, ``_file_id``, ``_next_check``; it calls
    ``_recover()`` and ``_check_file()`` (:class:`kvcache.selfrepair.Recovering`) and
    ``_warn_once()``.
    """

    __slots__ = ()

    def _source_parts(self) -> dict[str, Any] | None:
        """The source's fingerprint parts, computed once (when constructed), again only
        if its length changed since."""
        src = self.source
        if src is None:
            return None
        p = self._parts
        if p is None or ("length" in p and p["length"] != len(src)):
            a = self._args
            p = self._parts = compute_parts(src, a["version"], a["fingerprint"], self._keyfn is not None)
        return p

    # -- opening

    def _prepare(self, wait: bool = False) -> Any:
        """Open this process's environment and match the source's fingerprint."""
        if self._closed:
            raise ValueError(f"{self.path}: I/O on a closed LmdbCachedDataset")
        src = self.source
        try:
            e = self._store.handle()
        except CacheCorruptError as exc:
            if src is None:
                raise
            e = self._recover(exc, wait)
        self._file_id = file_id(self.path)
        self._next_check = _monotonic() + CHECK_EVERY_S
        keyed = self._keyfn is not None
        parts = self._source_parts()
        length = None if src is None else len(src)
        res = catalog.resolve(self._store, parts, length, self._args["on_stale"])
        if src is None and res.fp_id is not None and self._cache_keyed(res.fp_id) != keyed:
            raise KeyedCacheError(
                f"{self.path} is a keyed cache (filled with key=): pass the same key= to read it by "
                "index, or read it by key with open_cache(path).by_key(k)" if not keyed else
                f"{self.path} is an index-keyed cache (filled without key=): open it without key=")
        if self._lru is not None and (res.fp_id != self._fp_id or res.reset):
            # The LRU holds verified records of this source's fingerprint: they stay right
            # across a reopen (after a build's workers forked, a compaction, a repair)
            # unless the id they were read under changed.
            self._lru.clear()
        self._fp_id = self._writer.fp_id = res.fp_id
        self._fp_read = -1 if res.fp_id is None else res.fp_id  # -1 matches no record
        if src is None:
            if res.length is not None:
                self._len = res.length
            else:
                self._len = 0 if keyed else self._last_index() + 1
        else:
            self._len = length
        if e.lockfree:  # published or on a network fs: warn at the first miss, not at open
            self._unstored = e.readonly_reason
            self._writer.disabled = e.readonly_reason
        elif e.readonly_reason and not self._args["readonly"] and src is not None:
            self._warn_once("readonly", f"kvcache: {e.readonly_reason}; misses are computed, not stored")
            self._writer.disabled = e.readonly_reason  # buffering rows would only warn again
        if res.stale and res.reset:
            self._warn_once("reset", f"kvcache: {self.path} emptied (on_stale='reset'): {'; '.join(res.stale)}")
        elif res.stale and res.recompute and not res.deliberate:
            self._warn_once("stale", (
                f"kvcache: {self.path}: the source changed since the cache was filled "
                f"({'; '.join(res.stale)}): {res.recompute:,} cached samples of the previous "
                "source will be recomputed as they are read, not served (`kvcache gc` then drops "
                "the old records; pass fingerprint=/version=, or list an attribute that does not "
                "change the samples in the source class's kvcache_fingerprint_exclude)"))
        self._env = e
        return e

    def _cache_keyed(self, fp_id: int) -> bool:
        parts = (catalog.fingerprints(self._store).get(fp_id) or {}).get("parts")
        return isinstance(parts, dict) and parts.get("keyed") is True

    def _last_index(self) -> int:
        with self._store.begin() as txn:
            cur = txn.cursor()
            if not cur.last():
                return -1
            for k in cur.iterprev(keys=True, values=False):  # past a keyed source's 16-byte keys
                if len(k) == KEY.size:
                    return KEY.unpack(bytes(k))[0]
            return -1

    def _handle(self) -> Any:
        e = self._env
        if self._next_check <= _monotonic():
            e = self._check_file()
        if e is None or e.dead:
            e = self._prepare()
        return e

    # -- the open cache, for kvcache's build and maintenance code

    @property
    def store(self) -> Store:
        """The :class:`kvcache.store.Store` this dataset reads and writes in this process
        (for kvcache's build and maintenance code; not a stable API)."""
        return self._store

    @property
    def fingerprint_parts(self) -> dict[str, Any] | None:
        """What identifies this source (class, length, class source hash, ``version``; or
        the ``fingerprint=`` given; a keyed source has ``keyed`` for the length); None
        without a source."""
        return self._source_parts()

    @property
    def fingerprint_id(self) -> int | None:
        """This source's fingerprint id in the cache (opening it if needed): the id its
        records carry. None when it never wrote here and cannot (read-only)."""
        self._handle()
        return self._fp_id

    @property
    def keyed(self) -> bool:
        """Whether samples are stored by ``key=`` rather than by index."""
        return self._keyfn is not None

    def storage_key(self, i: int) -> tuple[bytes, int, bytes | None]:
        """``(LMDB key, checksum seed, normalised user key or None)`` of index ``i`` (for
        kvcache's build and maintenance code; calls the key function of a keyed cache).

        Raises:
            KeyFunctionError: the key function failed for ``i``.
        """
        if self._keyfn is None:
            return KEY.pack(i), i, None
        return self._keyfn(i)

    def cached_indices(self) -> set[int]:
        """Indices whose record was written by this source's fingerprint (one cursor
        pass over the metadata rows: O(n) by nature, it returns n items; a keyed cache
        also calls the key function for every index)."""
        self._handle()
        if self._keyfn is not None:
            have = {lk for lk, _kb in self._store.keys_of(self._fp_id)}
            kf = self._keyfn
            return {i for i in range(len(self)) if kf(i)[0] in have}
        return builder.cached_set(self._store, self._fp_id)

    def random_cached(self, k: int, rng: random.Random | None = None) -> list[int]:
        """``k`` distinct random cached indices (fewer if fewer are cached), found by
        probing random rows: a spot check costs the same at 10^4 and 10^7 samples (a
        keyed cache lists them: :meth:`cached_indices`)."""
        self._handle()
        rng = rng or random.Random()
        if self._keyfn is not None:
            have = sorted(self.cached_indices())
            return rng.sample(have, min(k, len(have)))
        return builder.sample_cached(self._store, self._fp_id, len(self), k, rng)
