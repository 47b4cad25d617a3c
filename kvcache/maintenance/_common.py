"""Helpers shared by the maintenance commands: the exclusive lock, sizes, the data.mdb swap.

Maintenance opens LMDB directly (not through :class:`~kvcache.store.Store`) where it
holds ``kvcache.lock`` exclusively: a Store takes the same lock shared through another
file description, which would block against our own exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import lmdb

from ..env import LOCK_NAME, classify, read_identity
from ..errors import CacheBusyError, CacheReadOnlyError, KvCacheError, NotACacheError
from ..lockfree import published_note
from ..store import translate
from ..extent import used_bytes

__all__ = ["check_cache", "exclusive", "file_bytes", "live_bytes", "lock_holders", "open_raw",
           "sibling_dir", "swap_in"]


def check_cache(path: str) -> str:
    """The absolute path of an existing cache.

    Raises:
        NotACacheError: nothing there, or not a kvcache cache.
        IncompatibleCacheError, CacheCorruptError: from :func:`kvcache.env.read_identity`.
    """
    path = os.path.abspath(os.fspath(path))
    if classify(path) == "new":
        raise NotACacheError(f"{path}: no cache there")
    read_identity(path)
    return path


def lock_holders(path: str) -> int:
    """How many processes hold ``kvcache.lock`` (from /proc/locks; 0 when unknown)."""
    try:
        st = os.stat(os.path.join(path, LOCK_NAME))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
            pids.add(parts[4])
    return len(pids)


def _published(path: str) -> bool:
    try:
        return bool(read_identity(path).get("published"))
    except KvCacheError:
        return False  # a damaged cache: what repair is for


@contextlib.contextmanager
def exclusive(path: str, what: str) -> Iterator[None]:
    """Hold ``kvcache.lock`` exclusively, or fail at once.

    Raises:
        CacheBusyError: another process (or this one) has the cache open.
        CacheReadOnlyError: a published cache (immutable).
    """
    if _published(path):
        raise CacheReadOnlyError(f"{path}: cannot {what}: {published_note(path)}")
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            n = lock_holders(path)
            who = f"{n} process{'es' if n != 1 else ''}" if n else "another process"
            raise CacheBusyError(
                f"{path}: cannot {what}: the cache is in use by {who}; stop every training job, "
                "DataLoader and tool that has it open, then run it again"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def open_raw(path: str, *, write: bool = False, **kw: Any) -> Any:
    """Open the environment without the kvcache lock (the caller holds it exclusively)."""
    try:
        return lmdb.open(path, subdir=True, readonly=not write, lock=write, create=False,
                         max_dbs=4, **kw)
    except lmdb.Error as exc:
        raise translate(exc, path) from None


file_bytes = used_bytes  # what the environment uses (kvcache.extent owns the computation)


def live_bytes(env: Any) -> int:
    """Roughly what a compacted copy would take: the pages every database uses, plus meta."""
    st = env.stat()
    pages = 2 + st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"] + 2  # meta + free db
    with env.begin() as txn:
        names = [bytes(k) for k, _ in txn.cursor()]
    for name in names:
        try:
            db = env.open_db(name, create=False)
        except lmdb.Error:
            continue
        with env.begin() as txn:
            s = txn.stat(db)
        pages += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
    return pages * st["psize"]


def sibling_dir(path: str, tag: str) -> str:
    """A fresh directory next to ``path`` (same filesystem, so a rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(path))
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{tag}-", dir=parent)


def swap_in(path: str, tmpdir: str) -> None:
    """Move ``tmpdir/data.mdb`` over ``path/data.mdb`` and drop the stale ``lock.mdb``.

    Only ``data.mdb`` moves: ``kvcache.lock`` keeps its inode, so a process blocked on it
    wakes up on the new file. The caller holds the lock exclusively.
    """
    os.replace(os.path.join(tmpdir, "data.mdb"), os.path.join(path, "data.mdb"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, "lock.mdb"))  # its reader table describes the old file
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    shutil.rmtree(tmpdir, ignore_errors=True)
