"""``publish``: an immutable, compacted, verified copy of a cache for shared storage.

A published cache is read lock-free by any number of processes on any number of hosts
(see :mod:`kvcache.env`): readers never write a byte under it, never create
``lock.mdb`` or ``kvcache.lock``, and work on read-only mounts. It is made here:

1. ``copy(compact=True)`` of the source cache (from a registered read transaction, so a
   live writer on the source is fine) into a fresh directory next to DEST (same
   filesystem, so the final rename is atomic);
2. the ``published`` info row written into the copy (when, from where, how many records);
3. every record of the copy checked in a child process (checksum, decoding, metadata
   row: :func:`kvcache.maintenance.verify`'s scan) and its structure walked
   (:func:`kvcache.structure.validate`); nothing is published otherwise;
4. the publish record written (``kvcache.published``, :mod:`kvcache.pubrecord`): what
   was validated, so that readers trust it without walking the file again; the files
   made read-only (0444), fsynced with their directory;
5. renamed into place: DEST appears complete or not at all. With ``force``, an existing
   DEST is exchanged atomically (``renameat2(RENAME_EXCHANGE)``; where the filesystem
   lacks it, the old one is renamed aside first) and then deleted. Readers that have the
   old one open keep reading it until they reopen.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any

import lmdb

from .. import catalog, codec
from ..env import LOCK_NAME, classify, opened_here, read_identity
from ..errors import CacheCorruptError, CacheExistsError, PartialCacheError
from ..progress import progress_for
from ..pubrecord import make_record, write_record
from ..store import Store, translate
from ._common import check_cache, sibling_dir
from .recompress import recompress
from .verify import scan

__all__ = ["PublishReport", "publish"]


@dataclass(frozen=True)
class PublishReport:
    """What ``publish`` made."""

    src: str
    dest: str
    entries: int  # records in the published copy (every one checked)
    bytes: int  # data.mdb's size in the published copy
    src_bytes: int  # data.mdb's size in the source
    seconds: float
    replaced: bool  # an existing DEST was replaced (--force)
    exchange: str  # how it was put in place: "rename", "exchange" or "aside"
    missing: int = 0  # indices of the source not in the copy (only with partial=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename still orders it
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; False where the C
    library or the filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replaceable(dest: str) -> bool:
    """Whether ``dest`` exists and holds something (a cache: checked, else refused).

    Raises:
        NotACacheError: a file, or a directory with other things: never replaced.
    """
    if not os.path.lexists(dest):
        return False
    if classify(dest) == "new" and not os.listdir(dest):
        return False  # an empty directory: the rename takes its place
    if not opened_here(dest):  # then this process has checked it already
        read_identity(dest)  # only a kvcache cache may be replaced
    return True


def _missing(store: Store) -> tuple[int, int, list[int]]:
    """``(cached, length, first missing indices)`` for the current source of ``store``
    (length -1: unknown). O(1) for a complete cache (its tally); a cursor pass otherwise."""
    cur = catalog.current(store)
    if cur is None:
        return 0, -1, []
    length = cur.get("length")
    have = store.count(cur["id"])
    if length is None or have >= length:
        return have, -1 if length is None else length, []
    held = set(store.indices_of(cur["id"]))
    first = []
    for i in range(length):
        if i not in held:
            first.append(i)
            if len(first) == 10:
                break
    return len(held), length, first


def publish(src: str | os.PathLike, dest: str | os.PathLike, *, force: bool = False,
            progress: Any = False, partial: bool = False,
            compression: str | None = "keep", compression_level: int | None = None) -> PublishReport:
    """Publish the cache at ``src`` as an immutable cache at ``dest`` (usually on shared
    storage), compacted and verified record by record.

    Args:
        force: replace an existing cache at ``dest`` (atomically); without it an
            existing, non-empty ``dest`` is refused.
        partial: publish a cache that lacks some indices of its source (or holds no
            sample at all); without it such a cache is refused, since a published cache
            is immutable and every reader would compute the missing samples again.
        progress: True for a progress line on stderr, or a callable ``(done, total)``
            (it follows the verification of the copy, record by record).
        compression: ``"keep"`` (the default) publishes the records as they are;
            ``"zstd"`` / ``"lz4"`` recompress every record of the copy (each array leaf
            on its own, stored raw where it does not shrink by 10 %), ``None`` or
            ``"none"`` stores them all uncompressed. The source cache is not changed.
        compression_level: the codec's level (as for LmdbCachedDataset).

    Raises:
        NotACacheError: ``src`` is not a cache, or ``dest`` holds something that is not one.
        CacheExistsError: ``dest`` exists and ``force`` is False.
        PartialCacheError: ``src`` lacks indices of its source and ``partial`` is False.
        CacheCorruptError: the copy does not verify (nothing is published; run
            ``kvcache verify SRC``).
        CacheWriteError: writing next to ``dest`` failed (disk full, permissions).
    """
    t0 = time.perf_counter()
    keep = compression == "keep"
    comp = None if keep or compression == "none" else codec.compression_of(compression, compression_level)
    src = check_cache(src)
    dest = os.path.abspath(os.fspath(dest))
    if os.path.realpath(dest) == os.path.realpath(src):
        raise ValueError(f"publish {src}: the destination is the source itself")
    replacing = _replaceable(dest)
    if replacing and not force:
        raise CacheExistsError(f"{dest} already holds a cache; `kvcache publish --force` replaces it "
                               "atomically (readers that have it open keep the old one until they reopen)")
    with Store(src, readonly=True, create=False) as store:
        have, length, first = _missing(store)
    lacking = length - have if length >= 0 else 0
    if not partial and (lacking > 0 or have == 0):
        what = (f"holds {have:,} of the {length:,} samples of its source (missing {lacking:,}: "
                f"indices {', '.join(map(str, first))}{', ...' if lacking > len(first) else ''})"
                if lacking > 0 else "holds no sample")
        raise PartialCacheError(
            f"publish {src}: the cache {what}; a published cache is immutable, so every reader "
            "would compute them: fill it first (`kvcache build SPEC SRC`), or publish it as it "
            "is with --partial")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = sibling_dir(dest, "publish")
    try:
        with Store(src, readonly=True, create=False) as store:
            e = store.handle()
            try:
                e.env.copy(tmp, compact=True)
            except lmdb.Error as exc:
                raise translate(exc, tmp) from None
        if not keep:
            recompress(tmp, comp, progress_for(progress, "recompress"))
        data = os.path.join(tmp, "data.mdb")
        try:
            env = lmdb.open(tmp, subdir=True, lock=False, max_dbs=4, create=False,
                            map_size=os.path.getsize(data) + (64 << 20))
            try:
                info = env.open_db(b"info", create=False)
                samples = env.open_db(b"samples", create=False)
                with env.begin(write=True) as txn:
                    entries = txn.stat(samples)["entries"]
                    fmt = json.loads(bytes(txn.get(b"format", db=info)))
                    published = {"time": time.time(), "from": src, "host": socket.gethostname(),
                                 "entries": entries}
                    txn.put(b"published", json.dumps(published).encode(), db=info)
                env.sync(True)
            finally:
                env.close()
        except lmdb.Error as exc:
            raise translate(exc, tmp) from None
        size = os.path.getsize(data)
        check = scan(tmp, progress_for(progress, "publish"))
        if check.signal or check.errors or check.bad or check.orphans or check.entries != entries:
            why = "; ".join(check.errors) or check.signal or f"{len(check.bad) + len(check.orphans)} bad records"
            raise CacheCorruptError(f"publish {src}: the copy does not verify ({why}); nothing was "
                                    f"published; run `kvcache verify {src}`")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tmp, "lock.mdb"))  # no reader table: readers open lock-free
        # data.mdb, the publish record (kvcache.published) and an empty kvcache.lock (it marks
        # the directory as kvcache's for classify and staging; no reader of a published cache
        # opens it): what docs/network.md lists
        with open(os.path.join(tmp, LOCK_NAME), "w"):
            pass
        # validated above (the scan walks the structure too): record exactly this version
        write_record(tmp, make_record(tmp, fmt, published))
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o444)
            _fsync(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700: readers on other accounts need it
        _fsync(tmp)
        how = "rename"
        if replacing:
            if _exchange(tmp, dest):
                how = "exchange"  # tmp now holds the old cache
            else:
                how = "aside"
                aside = sibling_dir(dest, "old")
                os.rmdir(aside)
                os.rename(dest, aside)
                os.rename(tmp, dest)
                tmp = aside
        else:
            os.rename(tmp, dest)
        _fsync(os.path.dirname(dest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PublishReport(src, dest, entries, size, os.path.getsize(os.path.join(src, "data.mdb")),
                         time.perf_counter() - t0, replacing, how, lacking)
