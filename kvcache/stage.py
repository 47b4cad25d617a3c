"""Staging: one verified copy of a published cache on node-local disk, shared by every
process and job on the node.

``stage(src, local_dir)`` returns the path of a local copy of the published cache ``src``
(usually on network storage): copied when absent, out of date (``src`` was published
again with ``--force``) or damaged, reused otherwise. Reading the local copy costs no
round trip to the server. The layout of ``local_dir`` and its locks: :mod:`kvcache.stagedir`.

A copy is written into a temporary directory, fsynced, verified, renamed into place; the
marker comes last. Verified: the copy, read back whole, has the xxh3-128 digest that
``src``'s publish record (:mod:`kvcache.pubrecord`) took of the file publish validated, so
the staged bytes are the published ones and open without a structural walk; a cache
published without a record is read back chunk by chunk against what was read from
``src`` and walked (:func:`kvcache.identity.check_identity`). A copy whose marker is
missing or no longer matches its files (half written, truncated, modified) is copied again.

Reuse costs one ``stat`` of ``src/data.mdb`` (no read): a republish (``kvcache publish
--force``) writes a new file, so its inode and mtime differ.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from .copyfile import NoSpace, copy_file, fsync_dir
from .errors import CacheCorruptError, KvCacheError, KvCacheWarning, NotACacheError
from .identity import LOCK_NAME, check_identity
from .progress import Progress, progress_for
from .pubrecord import RECORD_NAME, file_digest, publish_record
from .stagedir import (
    GLOBAL_LOCK,
    check_copy,
    clean_temps,
    dir_bytes,
    entry_id,
    files_of,
    flock,
    make_room,
    release,
    remove_dir,
    source_id,
    stat_id,
    staged_entries,
    touch,
    write_marker,
)

__all__ = ["StageReport", "entry_id", "open_staged", "release", "stage", "stage_report", "staged_entries"]


@dataclass(frozen=True)
class StageReport:
    """What :func:`stage_report` did.

    ``path`` is what to read: the local copy, or ``src`` itself when ``in_place``.
    """

    src: str
    path: str
    copied: bool  # copied in this call (else reused, or read in place)
    in_place: bool  # no local copy: read ``src`` where it is (not enough space; see reason)
    reason: str  # "reused", "absent", "out of date: ...", "damaged: ...", or why in place
    bytes: int  # the size of the copy (of src's files)
    seconds: float
    evicted: tuple[str, ...] = field(default=())  # copies removed to make room


# --------------------------------------------------------------------------- names and locks


def _copy(src: str, local_dir: str, eid: str, files: list[tuple[str, int]], src_id: list[int],
          progress: Any) -> None:
    """Copy ``src`` into ``local_dir/eid``: a temp directory, verified, fsynced, renamed
    into place, then the marker."""
    tmp = tempfile.mkdtemp(prefix=f".{eid}.tmp-", dir=local_dir)
    bar = progress_for(progress, "stage")
    try:
        if bar is not None:
            bar.unit = "MiB"
            bar.start(max(1, sum(s for _, s in files) >> 20))
        recorded = any(name == RECORD_NAME for name, _ in files)
        for name, size in files:  # data.mdb first
            copy_file(os.path.join(src, name), os.path.join(tmp, name), size,
                      bar if name == "data.mdb" else None, read_back=not recorded)
        if source_id(src) != src_id:
            raise KvCacheError(f"{src} was published again while it was being staged; stage it again")
        rec = publish_record(tmp) if recorded else None
        if rec is not None:
            # the whole copy, read back, against the digest publish took of the file it
            # validated: the staged bytes are the published ones (no walk needed after)
            if file_digest(tmp) != rec.get("file_xxh3"):
                raise CacheCorruptError(
                    f"{src}: its data.mdb does not match the digest its publish record holds (damaged "
                    f"after publishing, or misread); nothing was staged; check it with `kvcache verify {src}` "
                    "and publish it again")
            published = rec.get("published")
        else:  # published by a kvcache without records: the chunks were read back; walk it
            published = check_identity(tmp, persist_stamp=False).get("published")
        if not published:
            raise _not_published(src)
        for name, _ in files:
            os.chmod(os.path.join(tmp, name), 0o444)  # before the marker records ctime
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        final = os.path.join(local_dir, eid)
        remove_dir(local_dir, final)  # out of date or damaged: readers keep what they have open
        os.rename(tmp, final)
        fsync_dir(local_dir)
        tmp = ""
        marker = {"src": src, "source": src_id, "time": time.time(),
                  "files": {name: stat_id(os.stat(os.path.join(final, name)), ctime=True) for name, _ in files}}
        write_marker(local_dir, eid, marker)
    finally:
        if bar is not None:
            bar.finish()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the public API


def stage_report(src: str | os.PathLike, local_dir: str | os.PathLike, *, max_bytes: int | None = None,
                 progress: Any = False, hold: bool = False) -> tuple[StageReport, int | None]:
    """:func:`stage`, returning what it did, and with ``hold`` the descriptor of the
    shared lock that keeps the copy from being evicted (close it with :func:`release`)."""
    t0 = time.perf_counter()
    src = os.path.abspath(os.fspath(src))
    local_dir = os.path.abspath(os.fspath(local_dir))
    src_id = source_id(src)  # reusing costs this one stat of the source
    if src_id is None:
        raise _no_cache(src)
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
    try:
        os.makedirs(local_dir, exist_ok=True)
    except OSError as exc:
        raise _dir_error(local_dir, exc) from None
    if os.path.realpath(local_dir).startswith(os.path.realpath(src) + os.sep):
        raise ValueError(f"stage {src}: the local directory {local_dir} is inside the cache")
    eid = entry_id(src)
    path = os.path.join(local_dir, eid)

    def report(copied: bool, reason: str, size: int, evicted: list[str] = (), in_place: bool = False) -> StageReport:
        return StageReport(src, src if in_place else path, copied, in_place, reason, size,
                           time.perf_counter() - t0, tuple(evicted))

    lock = flock(os.path.join(local_dir, eid + ".lock"), fcntl.LOCK_EX)
    try:
        why = check_copy(local_dir, eid, src_id)
        if why is None:
            touch(local_dir, eid)
            use = flock(os.path.join(local_dir, eid + ".use"), fcntl.LOCK_SH) if hold else None
            return report(False, "reused", dir_bytes(path)), use
        if not any(os.path.exists(os.path.join(src, n)) for n in (LOCK_NAME, RECORD_NAME)):
            raise _no_cache(src)  # a published copy holds data.mdb and its record (no lock file)
        if os.path.exists(os.path.join(src, "lock.mdb")):  # publish removes it; a live cache has one
            raise _not_published(src)
        files = files_of(src)
        size = sum(s for _, s in files)
        if why != "absent":  # out of date or damaged: gone before the space is counted
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(local_dir, eid + ".staged"))
            remove_dir(local_dir, path)
        clean_temps(local_dir, eid)
        glock = flock(os.path.join(local_dir, GLOBAL_LOCK), fcntl.LOCK_EX)
        try:
            evicted, no_room = make_room(local_dir, eid, size, max_bytes)
            if no_room is None:
                try:
                    _copy(src, local_dir, eid, files, src_id, progress)
                except NoSpace as exc:
                    no_room = f"the disk filled up while copying ({exc})"
        finally:
            release(glock)
        if no_room is not None:
            warnings.warn(f"kvcache: not staging {src} to {local_dir}: {no_room}; reading the published "
                          "copy in place (free space there, or raise max_bytes)", KvCacheWarning, stacklevel=3)
            return report(False, f"in place: {no_room}", size, evicted, in_place=True), None
        touch(local_dir, eid)
        use = flock(os.path.join(local_dir, eid + ".use"), fcntl.LOCK_SH) if hold else None
        return report(True, why, size, evicted), use
    finally:
        release(lock)


def _no_cache(src: str) -> NotACacheError:
    return NotACacheError(f"{src}: no kvcache cache there (nothing to stage); give the published "
                          "cache's directory (`kvcache publish SRC DEST` makes one)")


def _not_published(src: str) -> NotACacheError:
    return NotACacheError(f"{src} is not a published cache: only published caches (immutable) can be "
                          f"staged; run `kvcache publish {src} DEST` and stage DEST")


def _dir_error(local_dir: str, exc: OSError) -> KvCacheError:
    return KvCacheError(f"cannot create the staging directory {local_dir} ({exc}); give a writable "
                        "directory on node-local disk")


def stage(src: str | os.PathLike, local_dir: str | os.PathLike, *, max_bytes: int | None = None,
          progress: Any = False) -> str:
    """The path of a verified local copy of the published cache ``src`` under ``local_dir``.

    The copy is made when there is none, when ``src`` was published again
    (``kvcache publish --force``), or when the local copy is damaged or half written;
    otherwise the one there is reused (by every process and job on this node: it is named
    after ``src``'s real path). Processes staging one source at once wait for one of them
    to copy it. Reusing costs one ``stat`` of ``src``. The copy streams in 8 MiB requests,
    4 in flight.

    Args:
        max_bytes: the most bytes all copies in ``local_dir`` may take together: older
            copies (least recently used first; never one that a dataset has open) are
            evicted to make room. None: bounded by the disk only (1% of it is left free).
        progress: True for a progress line on stderr (MiB copied), or a callable
            ``(done, total)`` in MiB.

    Returns:
        the local copy's path; or ``src`` itself when there is not enough space (a
        ``KvCacheWarning`` says why): the published copy is read in place.

    Raises:
        NotACacheError: ``src`` is not a published kvcache cache.
        CacheCorruptError: the copy is not a readable cache (``kvcache verify SRC``).
        KvCacheError: ``src`` changed while it was being copied, or ``local_dir`` cannot be
            created.
    """
    return stage_report(src, local_dir, max_bytes=max_bytes, progress=progress)[0].path


def open_staged(src: str, local_dir: str | os.PathLike) -> tuple[str, int | None]:
    """For ``LmdbCachedDataset(..., stage=local_dir)``: the path to read (the local copy, or
    ``src`` in place) and the shared lock that keeps the copy from eviction while it is
    open (a progress line while copying, on a terminal only)."""
    bar = Progress(f"kvcache: staging {os.path.basename(src)}", enabled=None, unit="MiB")
    rep, fd = stage_report(src, local_dir, progress=bar, hold=True)
    return rep.path, fd
