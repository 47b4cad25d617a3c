"""Self-repair: what a dataset with a source does when its cache's file is damaged.

Without a source a damaged cache is refused (``CacheCorruptError`` naming ``kvcache verify
--repair``). With one, damage costs only what it damaged, and training never stops:

* **A damaged overflow page** (the first page of a large value; LMDB follows an overflow
  page's content only to read that value, and reads its header only to free the run when
  the value is replaced): under the writer lock the header is rewritten in place from
  what the tree says about the run, the file is walked again, and the value's own
  checksum makes its record a miss that is recomputed. No other record is touched.
* **A damaged tree** (a leaf, a branch, the free list, a named database's record, the
  info or metadata rows): what ``kvcache verify --repair`` keeps, copied in a *child
  process* (LMDB may abort or take SIGBUS reading a damaged file; the child may die, the
  training process cannot) into a fresh file that is swapped in; then the dataset goes on,
  recomputing what was lost.
* **Where the cache cannot be written** (``readonly=True``, a published cache, a network
  filesystem, a directory or file this process may not write) or the writer lock cannot
  be had in time: this process serves every sample from the source, without the cache.

Exactly one process repairs: the repairer holds ``kvcache.lock`` exclusively (every other
opener holds it shared while its environment is open, so it is alone with the file);
processes that opened the damaged file at the same time wait for the lock, find the file
valid again, and open it. One ``KvCacheWarning`` per process says what happened.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

from . import structure
from .errors import CacheCorruptError, CorruptRecordError, KvCacheError
from .identity import LOCK_NAME, check_identity
from .mounts import filesystem_of
from .pubrecord import RECORD_NAME
from .lockfree import network_writes_allowed

__all__ = ["CHECK_EVERY_S", "DAMAGE_STORM", "REPAIR_WAIT_ENV", "Recovering", "SelfRepair", "cannot_write",
           "file_id", "repair", "wait_seconds", "what_damage"]

REPAIR_WAIT_ENV = "KVCACHE_REPAIR_WAIT_S"
# How often (at most) a dataset looks at data.mdb's identity and size for a file replaced
# or truncated underneath it: one stat per interval, at a batch or a miss, never per read.
CHECK_EVERY_S = 2.0
# Damaged records (checksum failures) since the last look that make it walk the file again.
DAMAGE_STORM = 8
DEFAULT_WAIT_S = 60.0
P_OVERFLOW = 0x04


@dataclass
class SelfRepair:
    """What a dataset did about a damaged cache (``LmdbCachedDataset.self_repair``).

    ``action``: ``"patched"`` (damaged overflow headers rewritten in place: only their
    records are recomputed), ``"salvaged"`` (the intact records copied into a fresh file),
    ``"repaired_by_another"`` (another process repaired it while this one waited),
    ``"unstored"`` (served from the source, without the cache: ``reason`` says why).
    """

    path: str
    action: str
    damage: str
    kept: int | None = None  # records in the cache after a salvage
    pages: int = 0  # overflow headers rewritten
    seconds: float = 0.0
    reason: str | None = None

    def message(self) -> str:
        what = f"kvcache: {self.path}: the cache's file was damaged ({self.damage})"
        if self.action == "patched":
            return (f"{what}; the {self.pages} damaged overflow page(s) were repaired in place in "
                    f"{self.seconds:.2f}s: every other record is kept and the damaged ones are recomputed")
        if self.action == "salvaged":
            return (f"{what}; it was repaired in {self.seconds:.2f}s: the {self.kept} intact records "
                    "were kept and the rest are recomputed from the source as they are read")
        if self.action == "repaired_by_another":
            return f"{what}; another process repaired it ({self.seconds:.2f}s waiting)"
        return (f"{what}; {self.reason}, so samples are computed from the source and not cached "
                f"in this process. Repair it with `kvcache verify --repair {self.path}` (or delete it)")


def what_damage(exc: Exception, path: str) -> str:
    """The part of a CacheCorruptError's message that says what is damaged (without the
    path and the advice to run ``kvcache verify --repair``: this module does that)."""
    text = str(exc)
    if text.startswith(path + ": "):
        text = text[len(path) + 2:]
    for cut in ("; reading it could kill", "; rebuild it", "; recover it", "; run `kvcache", "; Recover"):
        text = text.split(cut)[0]
    return text


def wait_seconds() -> float:
    """How long a process waits for the writer lock before it serves from the source
    (``KVCACHE_REPAIR_WAIT_S``, default 60)."""
    try:
        return max(0.0, float(os.environ.get(REPAIR_WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        return DEFAULT_WAIT_S


def cannot_write(path: str, readonly: bool, allow_network_writes: bool) -> str | None:
    """Why this process may not repair the cache at ``path`` (None: it may)."""
    if readonly:
        return "it was opened with readonly=True"
    fs = filesystem_of(path)
    if fs is not None and fs.network is not None and not network_writes_allowed(allow_network_writes):
        return f"it is on a {fs.network} filesystem, where kvcache does not write"
    if os.path.exists(os.path.join(path, RECORD_NAME)):
        # a published copy stays what publish recorded, even where its files were made
        # writable (a copy, a chmod): repairing it would break the record readers trust
        return f"it is published ({RECORD_NAME}); publish it again to change it"
    data = os.path.join(path, "data.mdb")
    try:
        st = os.stat(data)
    except OSError as exc:
        return f"its data.mdb cannot be read ({exc})"
    if not st.st_mode & 0o222:
        # kvcache publish leaves every file 0444: immutable by contract, even for root
        return "it is published or read-only (data.mdb has no write permission)"
    if not (os.access(path, os.W_OK) and os.access(data, os.W_OK)):
        return "this process may not write its directory"
    return None


def _take_exclusive(path: str, deadline: float) -> int | None:
    """``kvcache.lock`` held exclusively, or None when it could not be had by ``deadline``."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
        except OSError:
            os.close(fd)
            return None


def _patch_overflow(path: str, damaged: list) -> None:
    """Rewrite each damaged overflow run's first header: its own page number, the
    overflow flag, and the run's length as the tree's node needs it."""
    fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
    try:
        for pgno, pages, psize in damaged:
            os.pwrite(fd, struct.pack("<QHHI", pgno, 0, P_OVERFLOW, pages), pgno * psize)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(path: str, damage: str, wait: float | None = None) -> SelfRepair:
    """Repair the damaged cache at ``path`` under the writer lock (see the module
    docstring); the caller has checked :func:`cannot_write`. ``wait``: seconds to wait
    for the lock (None: :func:`wait_seconds`; a DataLoader worker waits briefly, since
    its parent may hold the cache open for the whole epoch).

    Returns a :class:`SelfRepair`; its action is ``"unstored"`` when the lock could not
    be had in time or the repair failed (the caller then serves from the source).
    """
    t0 = time.monotonic()
    wait = wait_seconds() if wait is None else wait
    fd = _take_exclusive(path, t0 + wait)
    if fd is None:
        return SelfRepair(path, "unstored", damage, reason=(
            f"another process kept it open for {wait:.0f}s ({REPAIR_WAIT_ENV}), so it could not be "
            "repaired here (the next process to open it repairs it)"))
    try:
        # Alone with the file now (every opener holds the lock shared): is it still damaged?
        try:
            check_identity(path)  # walks it (unless stamped), opens it, reads its format row
            return SelfRepair(path, "repaired_by_another", damage, seconds=time.monotonic() - t0)
        except KvCacheError:
            pass
        overflow: list = []
        try:
            structure.validate(path, overflow_damage=overflow)
        except CacheCorruptError:
            overflow = []
        else:
            if overflow:
                _patch_overflow(path, overflow)
                structure.forget(path)
                try:
                    structure.remember(path, structure.validated(path))
                    return SelfRepair(path, "patched", damage, pages=len(overflow),
                                      seconds=time.monotonic() - t0)
                except CacheCorruptError:
                    pass  # not what it seemed: salvage below
        from .maintenance.salvage import salvage  # the maintenance layer, only when needed

        try:
            kept = salvage(path, start_empty=True)
        except (KvCacheError, OSError) as exc:
            return SelfRepair(path, "unstored", damage, reason=f"the repair failed ({exc})")
        structure.forget(path)
        try:
            structure.remember(path, structure.validated(path))
        except CacheCorruptError as exc:
            return SelfRepair(path, "unstored", damage, reason=f"the repaired file is still damaged ({exc})")
        return SelfRepair(path, "salvaged", damage, kept=kept, seconds=time.monotonic() - t0)
    finally:
        os.close(fd)


def file_id(path: str) -> tuple | None:
    """``(dev, ino, size)`` of ``path/data.mdb`` (None if it cannot be stat'ed)."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size)


class Recovering:
    """The damage half of :class:`kvcache.LmdbCachedDataset` (a base class, not used
    alone): what it does when its cache's file is found damaged, at open or while open.

    It uses the dataset's ``path``, ``source``, ``_args``, ``_store``, ``_env``,
    ``_stats``, ``_warned``, ``self_repair``, ``_suspect``, ``_corrupt_base``,
    ``_next_check``, ``_file_id`` and calls ``_prepare()`` and ``_warn_once()``.
    """

    __slots__ = ()

    def _recover(self, exc: CacheCorruptError, wait: bool, reason: str | None = None) -> Any:
        """The cache's file is damaged and there is a source: repair it, or serve from the
        source without it (kvcache.selfrepair; ``reason``: why it may not be written); one
        warning says which."""
        a = self._args
        reason = reason or cannot_write(self.path, a["readonly"], a.get("allow_network_writes", False))
        if reason is None:
            rep = repair(self.path, what_damage(exc, self.path), wait=None if wait else 1.0)
            if rep.action != "unstored":
                try:
                    e = self._store.handle()
                except CacheCorruptError as again:
                    rep = SelfRepair(self.path, "unstored", rep.damage,
                                     reason=f"it is still damaged after the repair ({again})")
                else:
                    self.self_repair = rep
                    if rep.action != "repaired_by_another":
                        self._warn_once("self_repair", rep.message())
                        self._warned.add("corrupt")  # the records it lost are recomputed, as it said
                    return e
        else:
            rep = SelfRepair(self.path, "unstored", what_damage(exc, self.path), reason=reason)
        self.self_repair = rep
        self._warn_once("unstored", rep.message())
        return self._store.stand_in(rep.message())

    def _note_damage(self, exc: KvCacheError) -> bool:
        """The read path met a damaged record or tree: an LMDB error, or a run of bad
        checksums, means the file may have changed under this process; look again
        before the next read (at ``_handle`` or the miss), not inside the read's
        transaction. Returns whether it was damage to the tree (an LMDB error)."""
        tree = not isinstance(exc, CorruptRecordError)
        if tree or self._stats.corrupt - self._corrupt_base >= DAMAGE_STORM:
            self._suspect = True
            self._next_check = 0.0
        return tree

    def _check_file(self) -> Any:
        """At most every CHECK_EVERY_S, or after damage was seen: if ``data.mdb`` was
        replaced, truncated or damaged under this process, reopen it (validation walks
        it again; damage goes to :meth:`_recover`)."""
        self._next_check = time.monotonic() + CHECK_EVERY_S
        e = self._env
        if e is None or e.dead or self.source is None and not self._suspect:
            return e
        now = file_id(self.path)
        old, self._file_id = self._file_id, now
        moved = now is None or old is None or now[:2] != old[:2] or now[2] < old[2]
        if not (moved or self._suspect):
            return e
        suspect, self._suspect = self._suspect, False
        if suspect and e.lockfree and self.source is not None:
            # published or on network storage: nothing is repaired there; serve from the source
            self._env = None
            self._store.close()
            self._env = self._recover(CacheCorruptError(
                "damaged records or pages were met while reading it"), wait=False,
                reason="it is published or on network storage, where kvcache writes nothing")
            return self._env
        if suspect:
            structure.forget(self.path)  # the stamp vouches for a file that is damaged now
        self._corrupt_base = self._stats.corrupt
        self._env = None
        self._store.close()  # buffered rows stay with the writer: they go to the reopened file
        return self._prepare()

