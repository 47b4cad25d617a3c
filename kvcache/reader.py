"""The read path of a cached sample: ``__getitem__`` and ``__getitems__``.

This is the code that runs millions of times an epoch, kept apart from the dataset's
lifecycle (:mod:`kvcache.dataset`), opening and fingerprints (:mod:`kvcache.attach`), and
misses and write-back (:mod:`kvcache.misses`). A cached read is one LMDB ``get`` in a
short read transaction, the record's length checked against its layout, its checksum,
and one copy out of LMDB memory (:mod:`kvcache.codec`); a bytes-bounded LRU may sit in
front of it. Anything unusual (a miss, a stale or damaged record, a damaged tree) leaves
the fast path for ``_lookup``/``_damaged`` and, for a miss, the dataset's ``_compute``
(:mod:`kvcache.misses`).
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import lmdb

from . import codec
from .coldread import fetch as _fetch
from .errors import CacheCorruptError, CorruptRecordError, KvCacheError
from .store import KEY, translate

__all__ = ["STALE", "CachedReader"]

STALE = object()  # a record written by another fingerprint, or none: compute it
_STALE = STALE
_SLOW = object()  # __getitems__'s inline decode met something unusual: take _lookup
_key = KEY.pack
_decode = codec.decode
_unpack_head, _HEAD_KEYED, _HEAD_PLAIN, _PLANS, _checksum = (
    codec.unpack_head, codec.HEAD_KEYED, codec.HEAD_PLAIN, codec.PLANS, codec.checksum)


class CachedReader:
    """The read half of :class:`kvcache.LmdbCachedDataset` (a base class, not used alone).

    It reads these attributes, which the dataset sets up: ``path``, ``source``,
    ``verify``, ``_len``, ``_lru``, ``_stats``, ``_env``, ``_store``, ``_fp_read``,
    ``_transform``, ``_writer``, ``_keyfn`` (a :class:`kvcache.keys.KeyFunction`, or
    None for an index-keyed cache); and calls ``_handle()`` (this process's open
    environment), ``_compute(i, ...)`` (a miss), ``_warn_once(key, message)`` and
    ``_note_damage(exc)`` (damage seen: the dataset looks at the file again).

    A keyed cache's reads (:meth:`_get_keyed`, :meth:`_getitems_keyed`) are the same
    steps with the LMDB key and checksum seed from ``_keyfn(i)`` instead of the index;
    the LRU is keyed by the LMDB key there.
    """

    __slots__ = ()

    def _index(self, index: Any) -> int:
        i = operator.index(index)
        n = self._len if self._len is not None else len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        return i

    def __getitem__(self, index: int) -> Any:
        # The hot path (a cached read) is inlined: one read txn, one get, one decode,
        # no per-item syscall. Anything unusual falls back to _lookup, which handles it.
        if self._keyfn is not None:
            return self._get_keyed(index)
        n = self._len
        if type(index) is int and n is not None and 0 <= index < n:
            i = index
        else:
            i = self._index(index)
        lru = self._lru
        if lru is not None:
            rec = lru.get(i)
            if rec is not None:
                self._stats.lru_hits += 1
                value = _decode(rec, False)
                return value if self._transform is None else self._transform(value)
        e = self._env
        if e is None or e.dead:
            e = self._handle()
        try:
            txn = e.env.begin(e.samples, None, False, True)
        except lmdb.Error:
            txn = self._store.begin()
        try:
            try:
                buf = txn.get(_key(i))
                value = _STALE if buf is None else _decode(buf, self.verify, self._fp_read, i)
            except lmdb.Error as exc:  # a damaged tree: the txn is dead, don't read it again
                value = self._damaged(i, translate(exc, self.path))
            except (codec.StaleRecord, CorruptRecordError):
                value = self._lookup(txn, i)  # counts, warns or raises as it should
            else:
                if value is not _STALE:
                    self._stats.hits += 1
                    if lru is not None and len(buf) <= lru.max_item:
                        lru.put(i, bytes(buf))
        finally:
            txn.abort()
        if value is _STALE:
            value = self._compute(i)
            if self._writer.rows:
                self._writer.after_miss()
        if self._transform is not None:
            return self._transform(value)
        return value

    def __getitems__(self, indices: Sequence[int]) -> list:
        """Serve a DataLoader batch: one read transaction for all cached indices, then
        the misses computed outside it. Where reads are cold (a lock-free cache over a
        network, a file larger than memory), the records' pages are first fetched
        concurrently (:mod:`kvcache.coldread`): a batch costs a few round trips, not one
        per record."""
        if self._keyfn is not None:
            return self._getitems_keyed(indices)
        e = self._handle()
        n = self._len
        idx = [i if type(i) is int and 0 <= i < n else self._index(i) for i in indices]  # type: ignore[operator]
        if e.cold:  # lock-free: 16 threads; locked (a local file past memory): 4 reader slots
            _fetch(e.env, e.samples, [_key(i) for i in idx], 16 if e.lockfree else 4)
        out: list[Any] = []
        todo: list[int] = []
        lru = self._lru
        verify, fp = self.verify, self._fp_read
        head, keyed, plain, plans, xxh = _unpack_head, _HEAD_KEYED, _HEAD_PLAIN, _PLANS, _checksum
        hash_first = codec.HASH_FIRST
        hits = 0
        try:
            txn = e.env.begin(e.samples, None, False, True)
        except lmdb.Error:
            txn = self._store.begin()
        try:
            get_rec = txn.get
            for i in idx:
                if lru is not None:
                    rec = lru.get(i)
                    if rec is not None:
                        self._stats.lru_hits += 1
                        out.append(_decode(rec, False))
                        continue
                try:
                    buf = get_rec(_key(i))
                except lmdb.Error as exc:  # a damaged tree: this txn is dead, start another
                    v = self._damaged(i, translate(exc, self.path))
                    txn.abort()
                    txn = self._store.begin()
                    get_rec = txn.get
                else:
                    # codec.decode's steps inlined, in its order (a call per item is a
                    # measurable share of a batch read): the plan checks the record's length
                    # against its layout before the checksum reads it all. Any anomaly
                    # (short, bad magic, stale, new layout, a plan that refuses, checksum)
                    # goes to _lookup, which decodes again and counts, warns or raises.
                    # tests/test_getitems.py holds this loop and ds[i] in lockstep.
                    v = _SLOW
                    if buf is None:
                        v = _STALE
                    elif len(buf) >= 24:
                        h, cs, f, ll = head(buf, 0)
                        if f == fp and (h == keyed or h == plain) and len(buf) <= hash_first:
                            body = 24 + ll
                            try:
                                v = plans[buf[24:body]](buf, body)
                            except Exception:  # noqa: BLE001 - _lookup sorts it out
                                v = _SLOW
                            else:
                                if verify and xxh(buf[16:], i if h == keyed else 0) != cs:
                                    v = _SLOW
                        elif f == fp:  # compressed, or large (hashed before it is copied)
                            try:
                                v = _decode(buf, verify, fp, i)
                            except (codec.StaleRecord, CorruptRecordError):
                                v = _SLOW
                    if v is _SLOW:
                        v = self._lookup(txn, i)
                    elif v is not _STALE:
                        hits += 1
                        if lru is not None and len(buf) <= lru.max_item:
                            lru.put(i, bytes(buf))
                if v is _STALE:
                    todo.append(len(out))
                out.append(v)
        finally:
            txn.abort()
            self._stats.hits += hits
        for pos in todo:
            out[pos] = self._compute(idx[pos])
        if self._writer.rows:
            self._writer.maybe_flush()
        if self._transform is not None:
            t = self._transform
            return [t(v) for v in out]
        return out

    def _get_keyed(self, index: int) -> Any:
        """``__getitem__`` of a keyed cache: the same steps, by the key of ``index``."""
        n = self._len
        if type(index) is int and n is not None and 0 <= index < n:
            i = index
        else:
            i = self._index(index)
        lk, seed, kb = self._keyfn(i)  # KeyFunctionError before anything is read or stored
        lru = self._lru
        if lru is not None:
            rec = lru.get(lk)
            if rec is not None:
                self._stats.lru_hits += 1
                value = _decode(rec, False)
                return value if self._transform is None else self._transform(value)
        e = self._env
        if e is None or e.dead:
            e = self._handle()
        try:
            txn = e.env.begin(e.samples, None, False, True)
        except lmdb.Error:
            txn = self._store.begin()
        try:
            try:
                buf = txn.get(lk)
                value = _STALE if buf is None else _decode(buf, self.verify, self._fp_read, seed)
            except lmdb.Error as exc:
                value = self._damaged(i, translate(exc, self.path), lk)
            except (codec.StaleRecord, CorruptRecordError):
                value = self._lookup(txn, i, lk, seed)
            else:
                if value is not _STALE:
                    self._stats.hits += 1
                    if lru is not None and len(buf) <= lru.max_item:
                        lru.put(lk, bytes(buf))
        finally:
            txn.abort()
        if value is _STALE:
            value = self._compute(i, lk, seed, kb)
        if self._transform is not None:
            return self._transform(value)
        return value

    def _getitems_keyed(self, indices: Sequence[int]) -> list:
        """``__getitems__`` of a keyed cache: every key first (a key function that fails
        fails the batch before anything is read), then one read transaction."""
        e = self._handle()
        n = self._len
        idx = [i if type(i) is int and 0 <= i < n else self._index(i) for i in indices]  # type: ignore[operator]
        kf = self._keyfn
        keys = [kf(i) for i in idx]
        if e.cold:  # as in __getitems__: fetch the records' pages concurrently first
            _fetch(e.env, e.samples, [k[0] for k in keys], 16 if e.lockfree else 4)
        out: list[Any] = []
        todo: list[int] = []
        lru = self._lru
        verify, fp = self.verify, self._fp_read
        head, keyed, plans, xxh = _unpack_head, _HEAD_KEYED, _PLANS, _checksum
        keyed_z, hash_first = codec.HEAD_KEYED_PACKED, codec.HASH_FIRST
        hits = 0
        try:
            txn = e.env.begin(e.samples, None, False, True)
        except lmdb.Error:
            txn = self._store.begin()
        try:
            get_rec = txn.get
            for i, (lk, seed, _kb) in zip(idx, keys):
                if lru is not None:
                    rec = lru.get(lk)
                    if rec is not None:
                        self._stats.lru_hits += 1
                        out.append(_decode(rec, False))
                        continue
                try:
                    buf = get_rec(lk)
                except lmdb.Error as exc:  # a damaged tree: this txn is dead, start another
                    v = self._damaged(i, translate(exc, self.path), lk)
                    txn.abort()
                    txn = self._store.begin()
                    get_rec = txn.get
                else:
                    # as in __getitems__ (codec.decode's steps inlined); a keyed cache's
                    # records are all KEYED: anything else goes to _lookup
                    v = _SLOW
                    if buf is None:
                        v = _STALE
                    elif len(buf) >= 24:
                        h, cs, f, ll = head(buf, 0)
                        if f == fp and h == keyed and len(buf) <= hash_first:
                            body = 24 + ll
                            try:
                                v = plans[buf[24:body]](buf, body)
                            except Exception:  # noqa: BLE001 - _lookup sorts it out
                                v = _SLOW
                            else:
                                if verify and xxh(buf[16:], seed) != cs:
                                    v = _SLOW
                        elif f == fp and (h == keyed or h == keyed_z):  # large, or compressed
                            try:
                                v = _decode(buf, verify, fp, seed)
                            except (codec.StaleRecord, CorruptRecordError):
                                v = _SLOW
                    if v is _SLOW:
                        v = self._lookup(txn, i, lk, seed)
                    elif v is not _STALE:
                        hits += 1
                        if lru is not None and len(buf) <= lru.max_item:
                            lru.put(lk, bytes(buf))
                if v is _STALE:
                    todo.append(len(out))
                out.append(v)
        finally:
            txn.abort()
            self._stats.hits += hits
        for pos in todo:
            out[pos] = self._compute(idx[pos], *keys[pos])
        if self._writer.rows:
            self._writer.maybe_flush()
        if self._transform is not None:
            t = self._transform
            return [t(v) for v in out]
        return out

    def _lookup(self, txn: Any, i: int, lk: bytes | None = None, seed: int | None = None) -> Any:
        """The decoded sample at ``i`` from ``txn``, or ``_STALE`` when it must be computed
        (``lk``, ``seed``: a keyed record's LMDB key and checksum seed)."""
        if lk is None:
            key, seed, wkey = _key(i), i, i
        else:
            key = wkey = lk
        try:
            buf = txn.get(key)
        except lmdb.Error as exc:
            return self._damaged(i, translate(exc, self.path), wkey)
        if buf is None:
            return _STALE
        try:
            value = _decode(buf, self.verify, self._fp_read, seed)
        except codec.StaleRecord:
            self._stats.stale += 1
            return _STALE
        except CorruptRecordError as exc:
            return self._damaged(i, exc, wkey)
        self._stats.hits += 1
        lru = self._lru
        if lru is not None and len(buf) <= lru.max_item:
            lru.put(wkey, bytes(buf))
        return value

    def _damaged(self, i: int, exc: KvCacheError, wkey: Any = None) -> Any:
        if self._writer.pending(i if wkey is None else wkey) is None:  # count a damaged record once
            self._stats.corrupt += 1
        if self._note_damage(exc) and self.source is not None:
            return _STALE  # a damaged tree: the dataset looks at the file again, and one warning says what it did
        if self.source is None:
            if isinstance(exc, CorruptRecordError):
                raise CorruptRecordError(
                    f"{self.path}: record {i} is corrupt ({exc}); run `kvcache verify --repair {self.path}`"
                ) from None
            raise CacheCorruptError(f"{exc} (while reading index {i})") from None
        self._warn_once("corrupt", f"kvcache: {self.path}: record {i} was damaged ({exc}); "
                                   "recomputing from the source (further damaged records are counted "
                                   "in stats().corrupt); `kvcache verify` checks the whole cache")
        return _STALE
