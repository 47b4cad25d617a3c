"""Staging: one verified copy of a published cache on node-local disk, shared by every
process and job on the node.

``stage(src, local_dir)`` returns the path of a local copy of the published cache ``src``
(usually on network storage): copied when absent, out of date (``src`` was published
again with ``--force``) or damaged, reused otherwise. Reading the local copy costs no
round trip to the server. What lives in ``local_dir``, per source (``ID`` is the source's
directory name and a hash of its real path, so every job on the node finds the same one)::

    ID/          the copy: every file of the published directory, byte for byte
    ID.staged    the marker, written last: what was copied (the source's data.mdb identity:
                 inode, size, mtime) and what the copy is (its own identity and size)
    ID.lock      flock: held exclusively while one process checks or copies this source
    ID.use       flock: held shared by every dataset that has the copy open (never evicted
                 then); its mtime is the copy's last use (eviction is least recently used first)
    .kvcache-stage.lock   flock: held while space is made and a copy is written

A copy is written into a temporary directory, verified (the bytes written read back equal
to the bytes read from ``src``, chunk hashes; the copy is a kvcache cache that says it is
published), fsynced, renamed into place; the marker comes last. A copy whose marker is
missing or no longer matches its files (half written, truncated, modified) is copied again.

Reuse costs one ``stat`` of ``src/data.mdb`` (no read): a republish (``kvcache publish
--force``) writes a new file, so its inode and mtime differ.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import KvCacheError, KvCacheWarning, NotACacheError
from .identity import LOCK_NAME, check_identity
from .progress import Progress, progress_for

__all__ = ["StageReport", "open_staged", "release", "stage", "stage_report", "staged_entries"]

CHUNK = 8 << 20  # bytes per request: large sequential reads (a network fs splits them further)
STREAMS = 4  # requests in flight
GLOBAL_LOCK = ".kvcache-stage.lock"
_SKIP = {"lock.mdb", "kvcache.valid"}  # never copied (a published cache has neither)
_ENTRY = re.compile(r"^(?P<id>.+-[0-9a-f]{16})(?P<ext>\.staged|\.lock|\.use)?$")


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


def entry_id(src: str) -> str:
    """The local name of a source: its directory name and a hash of its real path."""
    real = os.path.realpath(src)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real.rstrip("/")) or "cache")[:64]
    return f"{base}-{hashlib.sha256(real.encode()).hexdigest()[:16]}"


def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _flock(path: str, how: int) -> int | None:
    """Open ``path`` and flock it (``how``: LOCK_SH/LOCK_EX, maybe | LOCK_NB); None when
    a non-blocking lock is held by someone else."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int | None) -> None:
    """Close a lock descriptor (its flock goes with its last descriptor: a forked child
    that inherited it keeps the lock until it exits)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------- identities


def _files_of(src: str) -> list[tuple[str, int]]:
    """The regular files of a published cache directory, ``(name, size)``, data.mdb first."""
    out = []
    for name in sorted(os.listdir(src)):
        if name in _SKIP or name.startswith("."):
            continue
        st = os.stat(os.path.join(src, name))
        if not os.path.isfile(os.path.join(src, name)):
            continue
        out.append((name, st.st_size))
    out.sort(key=lambda f: f[0] != "data.mdb")
    return out


def _stat_id(st: os.stat_result, ctime: bool = False) -> list[int]:
    ident = [st.st_ino, st.st_size, st.st_mtime_ns]
    return ident + [st.st_ctime_ns] if ctime else ident


def _source_id(src: str) -> list[int] | None:
    try:
        return _stat_id(os.stat(os.path.join(src, "data.mdb")))
    except OSError:
        return None


def _read_marker(local_dir: str, eid: str) -> dict | None:
    try:
        with open(os.path.join(local_dir, eid + ".staged")) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def _check_copy(local_dir: str, eid: str, src_id: list[int] | None) -> str | None:
    """Why the copy of ``eid`` cannot be reused (None: it can)."""
    path = os.path.join(local_dir, eid)
    if not os.path.isdir(path):
        return "absent"
    m = _read_marker(local_dir, eid)
    if m is None:
        return "damaged: no marker (a copy that did not finish)"
    if src_id is not None and m.get("source") != src_id:
        return "out of date: the source was published again"
    for name, ident in (m.get("files") or {}).items():
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            return f"damaged: {name} is missing"
        if _stat_id(st, ctime=True) != ident:
            return f"damaged: {name} changed since it was copied (size {st.st_size:,}, copied {ident[1]:,})"
    if not m.get("files"):
        return "damaged: the marker lists no files"
    return None


def staged_entries(local_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The copies in ``local_dir``: ``{"id", "path", "bytes", "last_used", "source"}``
    (``last_used`` in ns since the epoch), least recently used first."""
    local_dir = os.path.abspath(os.fspath(local_dir))
    out = []
    try:
        names = os.listdir(local_dir)
    except FileNotFoundError:
        return []
    for name in names:
        mt = _ENTRY.match(name)
        if not mt or mt.group("ext") or not os.path.isdir(os.path.join(local_dir, name)):
            continue
        m = _read_marker(local_dir, name) or {}
        out.append({"id": name, "path": os.path.join(local_dir, name), "bytes": _dir_bytes(os.path.join(local_dir, name)),
                    "last_used": _last_used(local_dir, name), "source": m.get("src")})
    out.sort(key=lambda e: e["last_used"])
    return out


def _dir_bytes(path: str) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(path, name)).st_size
    return total


def _last_used(local_dir: str, eid: str) -> int:
    for suffix in (".use", ".staged"):
        with contextlib.suppress(OSError):
            return os.stat(os.path.join(local_dir, eid + suffix)).st_mtime_ns
    return 0


def _touch(local_dir: str, eid: str) -> None:
    """Mark ``eid`` used now: the mtime of ``ID.use``, strictly later than any other copy's
    (file times tick in jiffies here: two uses within ~4 ms would otherwise tie)."""
    p = os.path.join(local_dir, eid + ".use")
    with contextlib.suppress(OSError):
        os.close(_open_lock(p))
        latest = max((e["last_used"] for e in staged_entries(local_dir)), default=0)
        t = max(time.time_ns(), latest + 1)
        try:
            os.utime(p, ns=(t, t))
        except PermissionError:  # another user's file: only "now" may be set
            os.utime(p)


# --------------------------------------------------------------------------- removal


def _remove_dir(local_dir: str, path: str) -> None:
    """Rename aside, then delete: readers that have the files open keep reading them."""
    if not os.path.lexists(path):
        return
    trash = tempfile.mkdtemp(prefix=".trash-", dir=local_dir)
    os.rename(path, os.path.join(trash, "x"))
    shutil.rmtree(trash, ignore_errors=True)


def _clean_temps(local_dir: str, eid: str) -> None:
    """Temporary directories a copier of ``eid`` left behind (its lock is ours now)."""
    for name in os.listdir(local_dir):
        if name.startswith(f".{eid}.tmp-") or name.startswith(".trash-"):
            shutil.rmtree(os.path.join(local_dir, name), ignore_errors=True)


def _try_evict(local_dir: str, eid: str) -> bool:
    """Remove the copy ``eid`` unless a stager or a reader holds it."""
    lock = _flock(os.path.join(local_dir, eid + ".lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    if lock is None:
        return False
    try:
        use = _flock(os.path.join(local_dir, eid + ".use"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if use is None:
            return False  # a dataset has it open
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(local_dir, eid + ".staged"))  # first: never a marker without its copy
            _remove_dir(local_dir, os.path.join(local_dir, eid))
            _clean_temps(local_dir, eid)
            return True
        finally:
            release(use)
    finally:
        release(lock)


def _free_bytes(local_dir: str) -> tuple[int, int]:
    s = os.statvfs(local_dir)
    return s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize


def _make_room(local_dir: str, eid: str, size: int, max_bytes: int | None) -> tuple[list[str], str | None]:
    """Evict least recently used copies (not ``eid``, none in use) until ``size`` more
    bytes fit under ``max_bytes`` and on the disk. Returns ``(evicted, why_not)``."""
    evicted: list[str] = []
    if max_bytes is not None and size > max_bytes:
        return evicted, f"the cache ({size:,} B) is larger than max_bytes={max_bytes:,}"
    others = [e for e in staged_entries(local_dir) if e["id"] != eid]
    while True:
        free, total = _free_bytes(local_dir)
        reserve = total // 100  # leave 1% of the disk free
        used = sum(e["bytes"] for e in others)
        over_budget = max_bytes is not None and used + size > max_bytes
        no_space = free < size + reserve
        if not over_budget and not no_space:
            return evicted, None
        victim = next((e for e in others if _try_evict(local_dir, e["id"])), None)
        if victim is None:
            if over_budget:
                return evicted, (f"{used + size:,} B of staged copies would exceed max_bytes={max_bytes:,} "
                                 f"and the other copies ({len(others)}) are in use")
            return evicted, (f"{local_dir} has {free:,} B free, the cache needs {size:,} B "
                             f"(+{reserve:,} B kept free), and no staged copy can be evicted")
        evicted.append(victim["path"])
        others.remove(victim)


# --------------------------------------------------------------------------- the copy


class _NoSpace(Exception):
    pass


def _copy_file(src: str, dst: str, size: int, bar: Any) -> None:
    """Copy ``src`` to ``dst`` with ``STREAMS`` concurrent ``CHUNK``-sized requests, then
    read ``dst`` back and compare every chunk's hash with what was read from ``src``."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(sfd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(sfd).st_size != size:
                raise KvCacheError(f"{src} changed size while it was being staged; stage it again")
            try:
                if size:
                    os.posix_fallocate(dfd, 0, size)  # no space: said now, not half way
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _NoSpace(str(exc)) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            n = (size + CHUNK - 1) // CHUNK
            hashes: list[int] = [0] * n
            done = [0]  # bytes copied (the bar counts MiB)
            lock = threading.Lock()
            chunks = iter(range(n))

            def work(read_fd: int, write_fd: int | None, check: bool) -> None:
                buf = bytearray(CHUNK)
                while True:
                    with lock:
                        i = next(chunks, None)
                    if i is None:
                        return
                    off = i * CHUNK
                    want = min(CHUNK, size - off)
                    view = memoryview(buf)[:want]
                    got = 0
                    while got < want:
                        k = os.preadv(read_fd, [view[got:]], off + got)
                        if k <= 0:
                            raise KvCacheError(f"{src}: the file ended at {off + got:,} B while being "
                                               f"staged ({size:,} B expected); stage it again")
                        got += k
                    h = xxhash.xxh3_64_intdigest(view)
                    if check:
                        if h != hashes[i]:
                            raise KvCacheError(f"{dst}: the local copy does not read back what was "
                                               f"copied (bytes {off:,}-{off + want:,}): a local disk error?")
                        continue
                    hashes[i] = h
                    put = 0
                    while put < want:
                        put += os.pwrite(write_fd, view[put:], off + put)  # type: ignore[arg-type]
                    if bar is not None:
                        with lock:
                            done[0] += want
                            bar.update((done[0] >> 20) - bar.done)

            def run(read_fd: int, write_fd: int | None, check: bool) -> None:
                nonlocal chunks
                chunks = iter(range(n))
                with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
                    for f in [pool.submit(work, read_fd, write_fd, check) for _ in range(min(STREAMS, n))]:
                        f.result()

            try:
                run(sfd, dfd, False)
                os.fsync(dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _NoSpace(str(exc)) from None
                raise
            run(dfd, None, True)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(local_dir: str, eid: str, marker: dict) -> None:
    p = os.path.join(local_dir, eid + ".staged")
    tmp = f"{p}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    _fsync_dir(local_dir)


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
        for name, size in files:
            _copy_file(os.path.join(src, name), os.path.join(tmp, name), size, bar if name == "data.mdb" else None)
        if _source_id(src) != src_id:
            raise KvCacheError(f"{src} was published again while it was being staged; stage it again")
        fmt = check_identity(tmp, persist_stamp=False)  # a kvcache cache, whole and readable
        if not fmt.get("published"):
            raise _not_published(src)
        for name, _ in files:
            os.chmod(os.path.join(tmp, name), 0o444)  # before the marker records ctime
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        final = os.path.join(local_dir, eid)
        _remove_dir(local_dir, final)  # out of date or damaged: readers keep what they have open
        os.rename(tmp, final)
        _fsync_dir(local_dir)
        tmp = ""
        marker = {"src": src, "source": src_id, "time": time.time(),
                  "files": {name: _stat_id(os.stat(os.path.join(final, name)), ctime=True) for name, _ in files}}
        _write_marker(local_dir, eid, marker)
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
    if not os.path.isfile(os.path.join(src, "data.mdb")) or not os.path.exists(os.path.join(src, LOCK_NAME)):
        raise NotACacheError(f"{src}: no kvcache cache there (nothing to stage); give the published "
                             "cache's directory (`kvcache publish SRC DEST` makes one)")
    if os.path.exists(os.path.join(src, "lock.mdb")):  # publish removes it; a live cache has one
        raise _not_published(src)
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

    lock = _flock(os.path.join(local_dir, eid + ".lock"), fcntl.LOCK_EX)
    try:
        src_id = _source_id(src)
        why = _check_copy(local_dir, eid, src_id)
        if why is None:
            _touch(local_dir, eid)
            use = _flock(os.path.join(local_dir, eid + ".use"), fcntl.LOCK_SH) if hold else None
            return report(False, "reused", _dir_bytes(path)), use
        files = _files_of(src)
        size = sum(s for _, s in files)
        if why != "absent":  # out of date or damaged: gone before the space is counted
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(local_dir, eid + ".staged"))
            _remove_dir(local_dir, path)
        _clean_temps(local_dir, eid)
        glock = _flock(os.path.join(local_dir, GLOBAL_LOCK), fcntl.LOCK_EX)
        try:
            evicted, no_room = _make_room(local_dir, eid, size, max_bytes)
            if no_room is None:
                try:
                    _copy(src, local_dir, eid, files, src_id or [], progress)
                except _NoSpace as exc:
                    no_room = f"the disk filled up while copying ({exc})"
        finally:
            release(glock)
        if no_room is not None:
            warnings.warn(f"kvcache: not staging {src} to {local_dir}: {no_room}; reading the published "
                          "copy in place (free space there, or raise max_bytes)", KvCacheWarning, stacklevel=3)
            return report(False, f"in place: {no_room}", size, evicted, in_place=True), None
        _touch(local_dir, eid)
        use = _flock(os.path.join(local_dir, eid + ".use"), fcntl.LOCK_SH) if hold else None
        return report(True, why, size, evicted), use
    finally:
        release(lock)


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
