"""How a cache path is opened: one decision, made once per process and path.

:func:`decide` finds out what is at the path (nothing yet, a cache, something else:
:func:`kvcache.identity.classify`) and on which filesystem (:mod:`kvcache.mounts`),
checks an existing cache's identity and structure, and chooses one mode:

========== =====================================================================
mode       what :func:`kvcache.env.open_env` does
========== =====================================================================
create     a new cache on local disk: created, ``kvcache.lock`` held exclusively
           until its format row is committed, then shared
locked     an existing cache: read-write where the location allows (a read-only
           Store still shares one environment with later writers in the process),
           ``kvcache.lock`` held shared so that compact and repair wait for it
readonly   an existing cache this process cannot write (permissions, a read-only
           mount): LMDB read-only; hits are served, misses computed, not stored
published  a published cache (:mod:`kvcache.maintenance.publish`): read-only,
           lock-free (LMDB ``lock=False``, no ``kvcache.lock``), not a byte written
network    an existing cache on a network or FUSE filesystem: read like a
           published one (LMDB's locks mean nothing to other hosts)
damaged    the file failed validation: ``reason`` says how; ``open_env`` raises
           :class:`~kvcache.errors.CacheCorruptError` with it
========== =====================================================================

A published cache whose publish record matches ``data.mdb``
(:func:`kvcache.pubrecord.matches_record`: its size and meta pages, a few round trips)
is trusted as ``publish`` validated it: the structural walk, which reads every tree page
of the file, is skipped. Any other existing cache is walked once per file version
(:mod:`kvcache.structure`, stamped where the location is writable).

The decision is a value (:class:`Opening`), so a caller can act on it before opening,
e.g. serve a damaged cache's samples from the source instead of raising.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import CacheCorruptError, NetworkFilesystemError, NotACacheError
from .identity import check_compatible, check_identity, classify
from .lockfree import network_refusal, network_writes_allowed, published_note
from .mounts import FsInfo, filesystem_of
from .pubrecord import matches_record, publish_record

__all__ = ["MODES", "WALK_PUBLISHED_ENV", "Opening", "decide", "identify", "on_network"]

# KVCACHE_WALK_PUBLISHED=1: walk published caches too, ignoring their publish records
WALK_PUBLISHED_ENV = "KVCACHE_WALK_PUBLISHED"
MODES = ("create", "locked", "readonly", "published", "network", "damaged")


@dataclass(frozen=True)
class Opening:
    """What is at a cache path and how this process opens it (see the module docstring)."""

    path: str
    fs: FsInfo | None  # the filesystem holding it (None: no mount table, not Linux)
    state: str  # "new" or "existing"
    mode: str  # one of MODES
    reason: str  # why this mode: the message a write or a miss is told, or the damage
    fmt: dict[str, Any] | None = None  # the format info row, with "published" (existing caches)
    trusted: str | None = None  # how the structure is trusted: "record", "validated", "new"
    size: int = 0  # data.mdb's size in bytes when decided
    # trusted == "record": the publish record, whose meta pages the opener still compares
    # with those LMDB maps (kvcache.env) before reading anything else
    record: dict[str, Any] | None = None

    @property
    def lockfree(self) -> bool:
        """Opened read-only without LMDB's lock, writing nothing (published or network)."""
        return self.mode in ("published", "network")

    @property
    def published(self) -> dict[str, Any] | None:
        """The cache's ``published`` info row (None: not published)."""
        return self.fmt.get("published") if self.fmt else None


def on_network(fs: FsInfo | None, allow_network_writes: bool = False) -> bool:
    """Whether ``fs`` is a network or FUSE filesystem kvcache must not write or lock."""
    return fs is not None and fs.network is not None and not network_writes_allowed(allow_network_writes)


def _recorded(path: str) -> tuple[dict[str, Any], int] | None:
    """The ``format`` row (with ``published``) and size a matching publish record gives, or
    None (no record, a malformed one, or one that does not match ``data.mdb``)."""
    if os.environ.get(WALK_PUBLISHED_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    rec = publish_record(path)
    if rec is None or not isinstance(rec.get("format"), dict) or not matches_record(path, rec):
        return None
    fmt = dict(rec["format"])
    fmt["published"] = rec.get("published") or {"record": True}
    return fmt, rec["size"]


def identify(path: str, persist_stamp: bool = True) -> tuple[dict[str, Any], str]:
    """An existing cache's ``format`` row (with ``published``) and how its structure is
    trusted: ``"record"`` (a matching publish record: nothing walked, nothing read
    through LMDB) or ``"validated"`` (walked now, or stamped earlier).

    Raises:
        NotACacheError, IncompatibleCacheError, CacheCorruptError.
    """
    got = _recorded(path)
    if got is not None:
        check_compatible(path, got[0])
        return got[0], "record"
    return check_identity(path, persist_stamp), "validated"


def _unwritable(path: str) -> str | None:
    """Why this process cannot write the cache at ``path`` (None: it can)."""
    if os.access(path, os.W_OK) and os.access(os.path.join(path, "data.mdb"), os.W_OK):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "a read-only filesystem"
    except OSError:
        pass
    return "permission denied"


def _sized_record(path: str) -> dict[str, Any] | None:
    """A publish record at ``path`` whose size is ``data.mdb``'s (the meta pages are
    compared by the opener, from its own map: no second open of the file)."""
    if os.environ.get(WALK_PUBLISHED_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    rec = publish_record(path)
    if rec is None or not isinstance(rec.get("format"), dict):
        return None
    try:
        if os.stat(os.path.join(path, "data.mdb")).st_size != rec["size"]:
            return None
    except OSError:
        return None
    return rec


def decide(path: str, *, readonly: bool, create: bool, allow_network_writes: bool = False,
           fs: FsInfo | None = None, trust_record: bool = True) -> Opening:
    """Decide how to open the cache at ``path`` (see the module docstring).

    ``env.open_env`` calls it holding ``kvcache.lock`` shared (or exclusively, when it
    creates the cache) where kvcache's locks apply, so a cache another process is creating
    or compacting is looked at only once that is done. ``fs`` saves looking the
    filesystem up again.

    Raises:
        NotACacheError: nothing there and ``readonly`` or not ``create``; or not a cache.
        NetworkFilesystemError: a new cache on a network or FUSE filesystem.
        IncompatibleCacheError: a cache of another format version.

    With ``trust_record`` (the default), a publish record whose size matches decides
    alone (``trusted="record"``, ``record`` set): the opener must then compare the meta
    pages (:func:`kvcache.pubrecord.meta_matches`) before reading the file, and decide
    again with ``trust_record=False`` when they differ. :func:`identify` compares them
    itself.
    """
    fs = fs if fs is not None else filesystem_of(path)
    network = on_network(fs, allow_network_writes)
    # A published cache whose record matches needs nothing else looked at: not the
    # directory's listing, not its structure, not its info rows (a few round trips in all)
    rec = _sized_record(path) if trust_record else None
    if rec is not None:
        fmt = dict(rec["format"])
        fmt["published"] = rec.get("published") or {"record": True}
        check_compatible(path, fmt)
        return Opening(path, fs, "existing", "published", published_note(path), fmt, "record", rec["size"], rec)
    state = classify(path)
    if state == "new":
        if readonly or not create:
            raise NotACacheError(f"{path}: no cache there (nothing to open read-only)")
        if network:
            raise NetworkFilesystemError(network_refusal(path, fs))  # type: ignore[arg-type]
        return Opening(path, fs, state, "create", f"{path}: a new cache", trusted="new")
    try:
        size = os.path.getsize(os.path.join(path, "data.mdb"))
    except OSError:
        size = 0
    try:
        fmt = check_identity(path, persist_stamp=not network)
    except CacheCorruptError as exc:
        return Opening(path, fs, state, "damaged", str(exc), size=size)
    trusted = "validated"
    if fmt.get("published"):
        return Opening(path, fs, state, "published", published_note(path), fmt, trusted, size)
    if network:
        return Opening(path, fs, state, "network", network_refusal(path, fs), fmt, trusted, size)  # type: ignore[arg-type]
    why = _unwritable(path)
    if why is not None:
        return Opening(path, fs, state, "readonly", f"{path} is not writable ({why}); write-back is off",
                       fmt, trusted, size)
    return Opening(path, fs, state, "locked", f"{path}: a cache kvcache reads and writes", fmt, trusted, size)
