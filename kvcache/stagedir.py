"""What lives in a staging directory, and who may touch it: names, markers, locks, eviction.

Per source (``ID``: the source's directory name and a hash of its real path, so every job
on the node finds the same one)::

    ID/          the copy: every file of the published directory, byte for byte
    ID.staged    the marker, written last: what was copied (the source's data.mdb identity:
                 inode, size, mtime) and what the copy is (each file's inode, size, mtime, ctime)
    ID.lock      flock: held exclusively while one process checks or copies this source
    ID.use       flock: held shared by every dataset that has the copy open (never evicted
                 then); its mtime is the copy's last use (eviction is least recently used first)
    .kvcache-stage.lock   flock: held while space is made and a copy is written
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

from .copyfile import fsync_dir

__all__ = ["GLOBAL_LOCK", "check_copy", "clean_temps", "dir_bytes", "entry_id", "files_of", "flock",
           "make_room", "read_marker", "release", "remove_dir", "source_id", "stat_id", "staged_entries",
           "touch", "write_marker"]

GLOBAL_LOCK = ".kvcache-stage.lock"
SKIP = {"lock.mdb", "kvcache.valid"}  # never copied (a published cache has neither)
ENTRY = re.compile(r"^(?P<id>.+-[0-9a-f]{16})(?P<ext>\.staged|\.lock|\.use)?$")


def entry_id(src: str) -> str:
    """The local name of a source: its directory name and a hash of its real path."""
    real = os.path.realpath(src)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real.rstrip("/")) or "cache")[:64]
    return f"{base}-{hashlib.sha256(real.encode()).hexdigest()[:16]}"


def open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def flock(path: str, how: int) -> int | None:
    """Open ``path`` and flock it (``how``: LOCK_SH/LOCK_EX, maybe | LOCK_NB); None when
    a non-blocking lock is held by someone else."""
    fd = open_lock(path)
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


def files_of(src: str) -> list[tuple[str, int]]:
    """The regular files of a published cache directory, ``(name, size)``, data.mdb first."""
    out = []
    for name in sorted(os.listdir(src)):
        if name in SKIP or name.startswith("."):
            continue
        st = os.stat(os.path.join(src, name))
        if not os.path.isfile(os.path.join(src, name)):
            continue
        out.append((name, st.st_size))
    out.sort(key=lambda f: f[0] != "data.mdb")
    return out


def stat_id(st: os.stat_result, ctime: bool = False) -> list[int]:
    ident = [st.st_ino, st.st_size, st.st_mtime_ns]
    return ident + [st.st_ctime_ns] if ctime else ident


def source_id(src: str) -> list[int] | None:
    try:
        return stat_id(os.stat(os.path.join(src, "data.mdb")))
    except OSError:
        return None


def read_marker(local_dir: str, eid: str) -> dict | None:
    try:
        with open(os.path.join(local_dir, eid + ".staged")) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def check_copy(local_dir: str, eid: str, src_id: list[int] | None) -> str | None:
    """Why the copy of ``eid`` cannot be reused (None: it can)."""
    path = os.path.join(local_dir, eid)
    if not os.path.isdir(path):
        return "absent"
    m = read_marker(local_dir, eid)
    if m is None:
        return "damaged: no marker (a copy that did not finish)"
    if src_id is not None and m.get("source") != src_id:
        return "out of date: the source was published again"
    for name, ident in (m.get("files") or {}).items():
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            return f"damaged: {name} is missing"
        if stat_id(st, ctime=True) != ident:
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
        mt = ENTRY.match(name)
        if not mt or mt.group("ext") or not os.path.isdir(os.path.join(local_dir, name)):
            continue
        m = read_marker(local_dir, name) or {}
        out.append({"id": name, "path": os.path.join(local_dir, name), "bytes": dir_bytes(os.path.join(local_dir, name)),
                    "last_used": last_used(local_dir, name), "source": m.get("src")})
    out.sort(key=lambda e: e["last_used"])
    return out


def dir_bytes(path: str) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(path, name)).st_size
    return total


def last_used(local_dir: str, eid: str) -> int:
    for suffix in (".use", ".staged"):
        with contextlib.suppress(OSError):
            return os.stat(os.path.join(local_dir, eid + suffix)).st_mtime_ns
    return 0


def touch(local_dir: str, eid: str) -> None:
    """Mark ``eid`` used now: the mtime of ``ID.use``, strictly later than any other copy's
    (file times tick in jiffies here: two uses within ~4 ms would otherwise tie)."""
    p = os.path.join(local_dir, eid + ".use")
    with contextlib.suppress(OSError):
        os.close(open_lock(p))
        latest = max((e["last_used"] for e in staged_entries(local_dir)), default=0)
        t = max(time.time_ns(), latest + 1)
        try:
            os.utime(p, ns=(t, t))
        except PermissionError:  # another user's file: only "now" may be set
            os.utime(p)


# --------------------------------------------------------------------------- removal


def write_marker(local_dir: str, eid: str, marker: dict) -> None:
    p = os.path.join(local_dir, eid + ".staged")
    tmp = f"{p}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(local_dir)


def remove_dir(local_dir: str, path: str) -> None:
    """Rename aside, then delete: readers that have the files open keep reading them."""
    if not os.path.lexists(path):
        return
    trash = tempfile.mkdtemp(prefix=".trash-", dir=local_dir)
    os.rename(path, os.path.join(trash, "x"))
    shutil.rmtree(trash, ignore_errors=True)


def clean_temps(local_dir: str, eid: str) -> None:
    """Temporary directories a copier of ``eid`` left behind (its lock is ours now)."""
    for name in os.listdir(local_dir):
        if name.startswith(f".{eid}.tmp-") or name.startswith(".trash-"):
            shutil.rmtree(os.path.join(local_dir, name), ignore_errors=True)


def try_evict(local_dir: str, eid: str) -> bool:
    """Remove the copy ``eid`` unless a stager or a reader holds it."""
    lock = flock(os.path.join(local_dir, eid + ".lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    if lock is None:
        return False
    try:
        use = flock(os.path.join(local_dir, eid + ".use"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if use is None:
            return False  # a dataset has it open
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(local_dir, eid + ".staged"))  # first: never a marker without its copy
            remove_dir(local_dir, os.path.join(local_dir, eid))
            clean_temps(local_dir, eid)
            return True
        finally:
            release(use)
    finally:
        release(lock)


def free_bytes(local_dir: str) -> tuple[int, int]:
    s = os.statvfs(local_dir)
    return s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize


def make_room(local_dir: str, eid: str, size: int, max_bytes: int | None) -> tuple[list[str], str | None]:
    """Evict least recently used copies (not ``eid``, none in use) until ``size`` more
    bytes fit under ``max_bytes`` and on the disk. Returns ``(evicted, why_not)``."""
    evicted: list[str] = []
    if max_bytes is not None and size > max_bytes:
        return evicted, f"the cache ({size:,} B) is larger than max_bytes={max_bytes:,}"
    others = [e for e in staged_entries(local_dir) if e["id"] != eid]
    while True:
        free, total = free_bytes(local_dir)
        reserve = total // 100  # leave 1% of the disk free
        used = sum(e["bytes"] for e in others)
        over_budget = max_bytes is not None and used + size > max_bytes
        no_space = free < size + reserve
        if not over_budget and not no_space:
            return evicted, None
        victim = next((e for e in others if try_evict(local_dir, e["id"])), None)
        if victim is None:
            if over_budget:
                return evicted, (f"{used + size:,} B of staged copies would exceed max_bytes={max_bytes:,} "
                                 f"and the other copies ({len(others)}) are in use")
            return evicted, (f"{local_dir} has {free:,} B free, the cache needs {size:,} B "
                             f"(+{reserve:,} B kept free), and no staged copy can be evicted")
        evicted.append(victim["path"])
        others.remove(victim)


# --------------------------------------------------------------------------- the copy
