"""What is at a cache path, checked without opening it for use: path hygiene and identity.

:func:`classify` tells a new location from an existing cache and refuses anything else
(a plain file, a directory holding other files). :func:`check_identity` validates an
existing cache without changing a byte: its structure is walked first
(:mod:`kvcache.structure`: a damaged page reference can kill a process inside LMDB),
then its ``format`` row is read through a lock-free, read-only LMDB handle and compared
with the format and codec this kvcache reads. Opening a cache for use is
:mod:`kvcache.env`'s job.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lmdb

from . import codec
from .errors import CacheCorruptError, IncompatibleCacheError, NotACacheError
from .pubrecord import RECORD_NAME
from .structure import STAMP_NAME, remember, validated

__all__ = ["FORMAT_VERSION", "LOCK_NAME", "OWN_FILES", "READS_FORMATS", "check_compatible", "check_identity",
           "classify", "format_version", "upgrade_format"]

# Format 2 added compressed (PACKED) records and keyed records (16-byte keys, key-bearing
# metadata rows); a format-1 cache holds neither, so it reads as it is, and a writer
# stamps it format 2 when it first opens it for writing (kvcache.env), since an older
# kvcache would take the new records for damage.
FORMAT_VERSION = 2
READS_FORMATS = (1, 2)
LOCK_NAME = "kvcache.lock"
OWN_FILES = frozenset({"data.mdb", "lock.mdb", LOCK_NAME, STAMP_NAME, RECORD_NAME})


def classify(path: str) -> str:
    """``"new"`` (nothing there yet, or an empty directory) or ``"existing"``.

    Raises:
        NotACacheError: a plain file, or a directory that holds other things.
    """
    if not os.path.exists(path):
        return "new"
    if not os.path.isdir(path):
        raise NotACacheError(
            f"{path} is a file, not a cache directory; give the directory that holds data.mdb"
        )
    names = set(os.listdir(path))
    if "data.mdb" in names:
        if os.path.getsize(os.path.join(path, "data.mdb")) == 0:
            if LOCK_NAME in names:
                return "new"  # kvcache created it and was stopped before the first commit
            raise NotACacheError(f"{path}: data.mdb is empty and kvcache did not create it")
        return "existing"
    if names <= OWN_FILES - {"data.mdb"}:
        return "new"
    others = ", ".join(sorted(names - OWN_FILES)[:5])
    raise NotACacheError(
        f"{path} is not a kvcache cache: the directory holds other files ({others}); "
        "give an empty or new directory"
    )


def check_identity(path: str, persist_stamp: bool = True) -> dict[str, Any]:
    """Validate an existing cache without changing a byte, and return its ``format`` info
    row. The one file it may create is the structural stamp (``kvcache.valid``), with
    ``persist_stamp`` and never in a published cache.

    Raises:
        NotACacheError, IncompatibleCacheError, CacheCorruptError.
    """
    # kvcache.lock (a local cache) or the publish record (a published one, which has no lock)
    ours = any(os.path.exists(os.path.join(path, n)) for n in (LOCK_NAME, RECORD_NAME))
    # Before LMDB reads a page: a damaged page reference can kill the process (SIGBUS,
    # SIGSEGV, SIGABRT) inside LMDB. Walked once per version of the file (kvcache.structure).
    walked = validated(path)
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=4, subdir=True, create=False)
    except lmdb.InvalidError as exc:
        if ours:
            raise CacheCorruptError(
                f"{path}: not a valid LMDB cache (meta pages damaged: {exc}); "
                f"rebuild it with `kvcache verify --repair {path}` or delete the directory"
            ) from None
        raise NotACacheError(f"{path}: data.mdb is not an LMDB file") from None
    except lmdb.Error as exc:
        if ours:
            raise CacheCorruptError(f"{path}: cannot open the damaged cache ({exc}); "
                                    f"run `kvcache verify --repair {path}`") from None
        raise NotACacheError(f"{path}: cannot open as a cache ({exc})") from None
    try:
        damaged = (f"{path}: a damaged kvcache cache (its info table or format row is unreadable); "
                   f"recover it with `kvcache verify --repair {path}` or delete it")
        try:
            info_db = env.open_db(b"info", create=False)
        except lmdb.Error:
            if ours or _has_kvcache_tables(env):
                raise CacheCorruptError(damaged) from None
            raise NotACacheError(
                f"{path} is an LMDB environment but not a kvcache cache (no info table)"
            ) from None
        with env.begin(db=info_db) as txn:
            raw = txn.get(b"format")
            pub = txn.get(b"published")
        if raw is None:
            if ours or _has_kvcache_tables(env):
                raise CacheCorruptError(damaged)
            raise NotACacheError(f"{path} is an LMDB environment but not a kvcache cache")
        try:
            fmt = json.loads(raw)
        except ValueError:
            raise CacheCorruptError(damaged) from None
        if not isinstance(fmt, dict):
            raise CacheCorruptError(damaged)
    except lmdb.Error as exc:
        raise CacheCorruptError(f"{path}: damaged cache ({type(exc).__name__}: {exc})") from None
    finally:
        if env is not None:
            env.close()
    try:
        fmt["published"] = json.loads(pub) if pub else None  # not part of the row: read with it
    except ValueError:
        fmt["published"] = {"unreadable": True}  # still published: never write it
    check_compatible(path, fmt)
    # a kvcache cache whose structure was walked: stamp it (a published one only in memory)
    remember(path, walked, persist_stamp and not fmt.get("published"))
    return fmt


def check_compatible(path: str, fmt: dict[str, Any]) -> None:
    """Refuse a ``format`` row this kvcache does not read.

    Raises:
        IncompatibleCacheError: another format or codec version, naming the fix.
    """
    if (fmt.get("format") != "kvcache" or fmt.get("version") not in READS_FORMATS
            or fmt.get("codec") != codec.CODEC_VERSION):
        raise IncompatibleCacheError(
            f"{path} was written by kvcache format {fmt.get('version')} / codec {fmt.get('codec')}; "
            f"this kvcache reads formats {', '.join(map(str, READS_FORMATS))} / codec "
            f"{codec.CODEC_VERSION}. "
            "Rebuild it (delete the directory, or `kvcache build SPEC PATH` into a new one)."
        )


def _has_kvcache_tables(env: Any) -> bool:
    """Whether the main database names a table only kvcache creates (damage elsewhere)."""
    try:
        with env.begin() as txn:
            return any(bytes(k) in (b"samples", b"meta") for k, _ in txn.cursor())
    except lmdb.Error:
        return True  # an unreadable main database in a file that opened: damage


def format_version(raw: bytes) -> Any:
    """The ``version`` of a ``format`` info row (None where it is unreadable)."""
    try:
        fmt = json.loads(raw)
    except ValueError:
        return None  # check_identity refused it already, or will
    return fmt.get("version") if isinstance(fmt, dict) else None


def upgrade_format(env: Any, info_db: Any) -> None:
    """Stamp a format-1 cache format 2, as a writer first opens it (see FORMAT_VERSION);
    a read-only opener leaves it as it is."""
    with env.begin(write=True, db=info_db) as txn:
        raw = txn.get(b"format")
        if raw is not None and format_version(raw) == 1:
            fmt = json.loads(raw)
            fmt.update(version=FORMAT_VERSION, upgraded_from=1)
            txn.put(b"format", json.dumps(fmt).encode())
