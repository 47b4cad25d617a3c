"""The LMDB environment behind a cache: transactions, growth, batched writes.

This module and :mod:`kvcache.env` make the library's LMDB calls, and
:mod:`kvcache.lmdb_errors` turns ``lmdb.Error`` into kvcache errors (:func:`translate`),
with two deliberate exceptions: the read path in :mod:`kvcache.reader` begins its read
transaction on the environment handle itself (a call through here is a measurable share
of a cached read; it translates errors with :func:`translate`), and maintenance code opens
LMDB directly where it holds ``kvcache.lock`` exclusively or works on a private copy
(``maintenance/_common.open_raw``, ``publish``), or runs in a child process that a damaged
file may kill (``maintenance/_scan``, which reports rather than raises).
:mod:`kvcache.structure` reads ``data.mdb``'s pages with ``pread``, never through LMDB.

One environment directory holds ``data.mdb``, ``lock.mdb``, ``kvcache.lock`` and
``kvcache.valid`` (the structural stamp), with three named databases:

* ``samples``: key (8-byte big-endian index; in a keyed cache, the 16-byte digest of
  the user's key, :mod:`kvcache.keys`) -> record (see :mod:`kvcache.codec`)
* ``meta``:    key -> metadata row (fingerprint id, checksum, byte size, layout; the
  format is :mod:`kvcache.codec`'s), written in the same transaction as the record
* ``info``:    format version, codec version, fingerprints and their parts, current
  fingerprint, recorded map size, created and last-written times, and the tally of
  metadata rows per fingerprint (:mod:`kvcache.tally`)

Every change to ``samples`` and ``meta`` goes through :class:`Rows` (``write_records``,
``delete_keys`` and ``transact_rows`` use it), which keeps the tally in the same
transaction.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any, Iterable

import lmdb

from . import codec, structure
from .env import (
    FORMAT_VERSION,
    LOCK_NAME,
    Env,
    absent_env,
    open_env,
    release_env,
)
from .extent import used_bytes
from .errors import (
    CacheBusyError,
    CacheCorruptError,
    CacheFullError,
    CacheReadOnlyError,
    NetworkFilesystemError,
)
from .lmdb_errors import translate
from .tally import NO_FP, TALLY_KEY, Tally

__all__ = ["FORMAT_VERSION", "KEY", "LOCK_NAME", "Rows", "Store", "index_of", "key_of", "translate",
           "used_bytes"]

KEY = struct.Struct(">Q")
DEFAULT_MAX_MAP_SIZE = 1 << 40
key_of = KEY.pack


def index_of(key: bytes) -> int:
    return KEY.unpack(key)[0]


# --------------------------------------------------------------------------- rows and their tally


class Rows:
    """The records and metadata rows of one write transaction, with their tally.

    Every writer changes ``samples`` and ``meta`` through this class (the Store's write
    methods, gc, verify's repair, the salvage copy), so the tally of metadata rows per
    fingerprint stays exact; :meth:`save` writes it into the same transaction. Opening
    recounts (one walk of ``meta``) when the stored tally is missing or does not describe
    the rows there (a cache written before the tally existed).

    Args:
        txn: a write transaction (``buffers=False``).
        samples, meta, info: the three databases.
        recount: walk the rows even where the stored tally's total matches them
            (``kvcache verify --repair`` of a tally that disagrees with its rows).
    """

    def __init__(self, txn: Any, samples: Any, meta: Any, info: Any, recount: bool = False) -> None:
        self.txn, self.samples, self.meta, self.info = txn, samples, meta, info
        t = None if recount else Tally.from_json(txn.get(TALLY_KEY, db=info))
        if t is None or t.rows != txn.stat(meta)["entries"]:
            t = count_rows(txn, meta)
        self.tally = t

    def _note(self, row: Any, sign: int) -> None:
        fields = codec.meta_fields(row)
        if fields is not None:
            self.tally.add(fields[0], fields[2], codec.meta_layout(row), sign)
        else:
            self.tally.add(NO_FP, 0, b"", sign)

    def put(self, key: bytes, record: bytes, meta_row: bytes, keep_fp: int | None = None) -> bool:
        """Store ``record`` and its metadata row at ``key``; False where ``keep_fp`` is
        given and the key already holds a valid record of that fingerprint (kept)."""
        txn = self.txn
        # put(overwrite=False) is one B-tree descent for the common new key; only a key
        # that exists is read, and kept if it is a valid record of this source.
        if not txn.put(key, record, db=self.samples, overwrite=False):
            if keep_fp is not None:
                old = txn.get(key, db=self.samples)
                if codec.checksum_ok(old, codec.seed_of(key)) and codec.read_header(old)[0] == keep_fp:
                    return False
            txn.put(key, record, db=self.samples)
        if not txn.put(key, meta_row, db=self.meta, overwrite=False):
            self._note(txn.get(key, db=self.meta), -1)
            txn.put(key, meta_row, db=self.meta)
        self._note(meta_row, 1)
        return True

    def delete(self, key: bytes) -> tuple[bool, bool]:
        """Delete the record and the metadata row at ``key``; which of them were there."""
        txn = self.txn
        row = txn.get(key, db=self.meta)
        if row is not None:
            txn.delete(key, db=self.meta)
            self._note(row, -1)
        return bool(txn.delete(key, db=self.samples)), row is not None

    def clear(self) -> None:
        """Delete every record and metadata row."""
        self.txn.drop(self.samples, delete=False)
        self.txn.drop(self.meta, delete=False)
        self.tally = Tally()

    def save(self) -> None:
        """Write the tally (call once, after the last change, in the same transaction)."""
        self.txn.put(TALLY_KEY, self.tally.to_json(), db=self.info)


def count_rows(txn: Any, meta: Any) -> Tally:
    """A tally of the metadata rows by walking them (what :class:`Rows` keeps up to date)."""
    t = Tally()
    for _k, row in txn.cursor(db=meta):
        fields = codec.meta_fields(row)
        if fields is not None:
            t.add(fields[0], fields[2], codec.meta_layout(row))
        else:
            t.add(NO_FP, 0, b"")
    return t


# --------------------------------------------------------------------------- the store


class Store:
    """A handle on one cache environment for this process (lazy, fork-aware).

    Args:
        path: the cache directory.
        readonly: never write; fail with NotACacheError where there is no cache.
        create: create the cache if the path is new or an empty directory.
        map_size: initial LMDB map size in bytes (the map grows by doubling on demand).
        max_map_size: the cap on growth; past it, writes raise CacheFullError.
        readahead: OS readahead on the map; None: on for published caches and caches on
            a network filesystem (read lock-free), off otherwise.
        allow_network_writes: create and write a cache on a network or FUSE filesystem
            (refused by default: NetworkFilesystemError).
        degrade: where a new cache is refused on a network filesystem, stand in an empty
            read-only one (every read misses) instead of raising.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, create: bool = True,
                 map_size: int | None = None, max_map_size: int | None = None,
                 readahead: bool | None = False, max_readers: int = 126, lock: bool = True,
                 allow_network_writes: bool = False, degrade: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.readonly = readonly
        self.create = create
        self.map_size = map_size
        self.max_map_size = max_map_size or DEFAULT_MAX_MAP_SIZE
        self.readahead = readahead
        self.max_readers = max_readers
        self.lock = lock
        self.allow_network_writes = allow_network_writes
        self.degrade = degrade
        self._e: Env | None = None
        self._walked: tuple[Any, Tally] | None = None  # tally() of a cache without one

    # -- lifecycle

    def handle(self) -> Env:
        """This process's open environment (opened on first use, and again after fork)."""
        e = self._e
        if e is None or e.dead:
            try:
                e = open_env(self.path, readonly=self.readonly, create=self.create,
                             map_size=self.map_size, readahead=self.readahead,
                             max_readers=self.max_readers, lock=self.lock,
                             allow_network_writes=self.allow_network_writes)
            except NetworkFilesystemError as exc:
                if not self.degrade:
                    raise
                e = absent_env(self.path, str(exc))
                e.refs = 1
            self._e = e
        return e

    def stand_in(self, reason: str) -> Env:
        """Replace this store's environment by an empty read-only one holding no file
        (every read misses; writes raise CacheReadOnlyError(``reason``)): a dataset with a
        source serves from it when its cache is damaged and cannot be repaired here."""
        self.close()
        e = self._e = absent_env(self.path, reason)
        e.refs = 1
        return e

    @property
    def writable(self) -> bool:
        return not self.readonly and not self.handle().readonly

    def close(self) -> None:
        e, self._e, self._walked = self._e, None, None
        if e is not None and not e.dead:
            release_env(e)

    def __enter__(self) -> "Store":
        self.handle()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions

    def begin(self, db: Any = None, write: bool = False) -> Any:
        """Begin a transaction, handling MapResized (another process grew the map) and
        ReadersFull (stale slots of dead processes) once."""
        e = self.handle()
        for attempt in range(3):
            try:
                return e.env.begin(db=db if db is not None else e.samples, write=write, buffers=not write)
            except lmdb.MapResizedError:
                e.env.set_mapsize(0)
            except lmdb.ReadersFullError:
                if attempt or not e.lock or not e.env.reader_check():
                    raise CacheBusyError(
                        f"{self.path}: LMDB reader table full ({e.env.max_readers()} slots in use "
                        "by live processes); fewer DataLoader workers or a larger max_readers "
                        "on a fresh cache"
                    ) from None
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None
        raise CacheBusyError(f"{self.path}: could not begin a transaction")

    # -- info rows

    def info_get(self, key: bytes) -> Any:
        """The JSON value of info row ``key`` (None when absent).

        Raises:
            CacheCorruptError: the row (or the tree above it) is damaged.
        """
        e = self.handle()
        with self.begin(e.info) as txn:
            try:
                raw = txn.get(key)
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None
            if raw is None:
                return None
            try:
                return json.loads(bytes(raw))
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                raise self.damaged_row(key) from None

    def damaged_row(self, key: bytes) -> CacheCorruptError:
        """The error for an info row that does not hold what kvcache wrote there."""
        name = key.decode("ascii", "replace")
        return CacheCorruptError(
            f"{self.path}: the cache's {name!r} info row is damaged; run `kvcache verify --repair "
            f"{self.path}` (a dataset with its source rebuilds it on open), or delete the cache")

    def info_items(self) -> dict[str, Any]:
        """Every info row decoded (a row that is not valid JSON maps to None).

        Raises:
            CacheCorruptError: the info table is damaged.
        """
        e = self.handle()
        out: dict[str, Any] = {}
        with self.begin(e.info) as txn:
            try:
                for k, v in txn.cursor():
                    try:
                        out[bytes(k).decode()] = json.loads(bytes(v))
                    except ValueError:
                        out[bytes(k).decode(errors="replace")] = None
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None
        return out

    def tally(self) -> Tally:
        """The metadata rows per fingerprint: the stored tally (O(1)), or a walk of the
        rows where the cache has none that matches them (written before the tally existed)."""
        e = self.handle()
        with self.begin(e.info) as txn:
            t = Tally.from_json(txn.get(TALLY_KEY))
            if t is not None and t.rows == txn.stat(e.meta)["entries"]:
                return t
            snapshot = (e, txn.id())  # a walk holds until the next commit: keep it till then
            if self._walked is None or self._walked[0] != snapshot:
                self._walked = (snapshot, count_rows(txn, e.meta))
            return self._walked[1]

    def count(self, fp_id: int | None) -> int:
        """How many metadata rows ``fp_id`` wrote (O(1) where the tally is stored)."""
        return 0 if fp_id is None else self.tally().get(fp_id).rows

    def info_put(self, items: dict[bytes, Any], overwrite: bool = True) -> None:
        e = self.handle()
        self.transact(lambda txn: [txn.put(k, json.dumps(v).encode(), db=e.info, overwrite=overwrite)
                                 for k, v in items.items()])

    # -- writes

    def write_records(self, rows: Iterable[tuple[int | bytes, bytes, bytes]], fp_id: int) -> int:
        """Store ``(index, record, meta_row)`` rows in one transaction (in a keyed cache
        the index is the record's LMDB key, bytes); return how many were written. A key
        that already holds a valid record of ``fp_id`` is kept (first writer wins); a
        stale or corrupt one is replaced.

        Raises:
            CacheFullError, CacheReadOnlyError, CacheWriteError.
        """
        batch = {i if type(i) is bytes else key_of(i): (rec, meta) for i, rec, meta in rows}  # dedupe
        stamp = json.dumps(time.time()).encode()

        def put_all(w: Rows) -> int:
            n = 0
            for key, (rec, meta) in batch.items():
                n += w.put(key, rec, meta, keep_fp=fp_id)
            w.txn.put(b"last_written", stamp, db=w.info)
            return n

        return self.transact_rows(put_all)

    def indices_of(self, fp_id: int | None) -> list[int]:
        """The indices whose metadata row says fingerprint ``fp_id`` wrote them, ascending
        (the one scan of "what the current source has cached")."""
        if fp_id is None:
            return []
        e = self.handle()
        meta_fp = codec.meta_fp
        with self.begin(e.meta) as txn:
            try:
                return [index_of(k) for k, v in txn.cursor() if len(k) == KEY.size and meta_fp(v) == fp_id]
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None

    def keys_of(self, fp_id: int | None) -> list[tuple[bytes, bytes | None]]:
        """``(LMDB key, normalised user key or None)`` of every keyed record (16-byte LMDB
        key) whose metadata row says fingerprint ``fp_id`` wrote it, in LMDB key order."""
        if fp_id is None:
            return []
        e = self.handle()
        meta_fp, meta_key = codec.meta_fp, codec.meta_key
        with self.begin(e.meta) as txn:
            try:
                return [(bytes(k), meta_key(v)) for k, v in txn.cursor()
                        if len(k) == 16 and meta_fp(v) == fp_id]
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None

    def used_bytes(self) -> int:
        """What the environment uses: ``(last page + 1) * page size`` (not the file's length)."""
        return used_bytes(self.handle().env)

    def delete_keys(self, indices: Iterable[int | bytes]) -> int:
        """Delete the records and metadata rows of ``indices`` (or LMDB keys, bytes);
        return how many records were there."""
        keys = [i if type(i) is bytes else key_of(i) for i in indices]
        return self.transact_rows(lambda w: sum(w.delete(k)[0] for k in keys))

    def transact_rows(self, fn: Any) -> Any:
        """Run ``fn(rows)`` in a write transaction, ``rows`` a :class:`Rows` whose tally
        is saved when ``fn`` returns."""
        e = self.handle()

        def run(txn: Any) -> Any:
            rows = Rows(txn, e.samples, e.meta, e.info)
            out = fn(rows)
            rows.save()
            return out

        return self.transact(run)

    def transact(self, fn: Any) -> Any:
        """Run ``fn(txn)`` in a write transaction, growing the map on MapFull."""
        e = self.handle()
        if self.readonly or e.readonly:
            raise CacheReadOnlyError(e.readonly_reason or f"{self.path}: opened read-only")
        grown = None  # a map size to record with the write (a commit of its own would be unstamped)
        # every commit here is stamped: the stamping lock spans trust, commit and re-stamp
        with e.write_lock, structure.stamping(self.path):
            while True:
                try:
                    with e.env.begin(write=True) as txn:
                        # under LMDB's writer lock: was the file as validated before this write?
                        trusted = structure.stamp_matches(self.path)
                        out = fn(txn)
                        if grown is not None:
                            txn.put(b"map_size", str(grown).encode(), db=e.info)
                    structure.restamp(self.path, trusted)  # committed: stamp the new version
                    return out
                except lmdb.MapFullError:
                    grown = self._grow()
                except lmdb.MapResizedError:
                    e.env.set_mapsize(0)
                except lmdb.Error as exc:
                    raise translate(exc, self.path) from None

    def _grow(self) -> int:
        """Double the map (up to ``max_map_size``); return the new size, which the retried
        write records (so the next opener maps it at once)."""
        e = self.handle()
        cur = e.env.info()["map_size"]
        if cur >= self.max_map_size:
            raise CacheFullError(
                f"{self.path}: the cache reached max_map_size={self.max_map_size} bytes; "
                "raise max_map_size or run `kvcache compact`"
            )
        new = min(cur * 2, self.max_map_size)
        try:
            e.env.set_mapsize(new)
        except lmdb.Error as exc:
            raise translate(exc, self.path) from None
        return new
