"""Opening a cache's LMDB environment: one per process and path, locks, fork safety.

How a path is opened is decided once, by :func:`kvcache.opening.decide` (what is at the
path, on which filesystem, and so which mode: create, locked, readonly, published,
network, or damaged); this module takes ``kvcache.lock`` where it applies, asks for that
decision, and opens LMDB the way the mode says (``Env.opening`` keeps the decision).

Environments are opened lazily and at most once per process and path (py-lmdb refuses a
second open), and shared by every Store on that path in the process. An environment
inherited through ``fork`` is closed in the child by an at-fork hook and never used:
reading through it works, but its reader slots carry the parent's pid, so a child killed
mid-read leaves a slot ``reader_check()`` cannot clear, and that slot pins pages (seen:
2,060 pages of growth over 20 rewrite rounds, against about 300 without it).

Every opener holds ``kvcache.lock`` shared (flock) for as long as the environment is
open, so ``compact`` and ``repair`` can take it exclusively and refuse to swap files
under a live user (seen: a worker that kept the old file open after a swap committed
into the renamed-away file, and its writes were lost).

Two kinds of cache are opened **lock-free** instead: read-only, LMDB ``lock=False``, no
``kvcache.lock``, no ``lock.mdb``, not a byte written: a *published* cache (its info
row ``published`` says so; see :mod:`kvcache.maintenance.publish`), and any cache on a
network or FUSE filesystem (:mod:`kvcache.mounts`), where LMDB's shared-memory locks
mean nothing to other hosts. A new cache is never created on such a filesystem unless
the caller opts in (``allow_network_writes=True`` or ``KVCACHE_ALLOW_NETWORK_WRITES=1``).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import threading
import time
from typing import Any

import lmdb

from . import codec
from .errors import (
    CacheBusyError,
    CacheCorruptError,
    CacheReadOnlyError,
    KvCacheWarning,
)
from .coldread import map_of, willneed
from .lockfree import ALLOW_NETWORK_WRITES_ENV, NoEnvironment, cold_reads, prefetch, read_policy
from .mounts import FsInfo, filesystem_of
from .lmdb_errors import is_readonly_error
from .identity import FORMAT_VERSION, LOCK_NAME, classify, format_version, upgrade_format
from .opening import Opening, decide, identify, on_network
from .pubrecord import matches_record, meta_matches
from .structure import remember, validated

__all__ = ["ALLOW_NETWORK_WRITES_ENV", "FORMAT_VERSION", "LOCK_NAME", "absent_env", "classify",
           "is_readonly_error", "open_env", "opened_here", "read_identity", "release_env"]

DEFAULT_MAP_SIZE = 1 << 30
TAIL_BYTES = 64 << 10  # read ahead at the end of a cold published file (the trees' tops)


# --------------------------------------------------------------------------- process registry


class Env:
    """This process's one open environment for a path, shared by every Store on it."""

    __slots__ = ("path", "env", "samples", "meta", "info", "readonly", "lock_fd", "refs", "dead",
                 "readonly_reason", "lock", "write_lock", "lockfree", "published", "fs", "opening", "cold",
                 "old_format")

    def __init__(self, path: str) -> None:
        self.path = path
        self.env: Any = None
        self.samples = self.meta = self.info = None
        self.readonly = False
        self.readonly_reason: str | None = None
        self.lock_fd: int | None = None
        self.refs = 0
        self.dead = False
        self.lock = True
        self.write_lock = threading.Lock()
        self.lockfree = False  # opened read-only, lock=False: published, or on a network fs
        self.published: dict[str, Any] | None = None  # the cache's ``published`` info row
        self.fs: FsInfo | None = None
        self.opening: Opening | None = None  # how it was opened (kvcache.opening.decide)
        self.cold = False  # reads mostly miss the page cache: batches fetch their pages concurrently
        self.old_format = False  # a format-1 cache, stamped format 2 by its first writer

    def close(self) -> None:
        self.dead = True
        if self.env is not None:
            try:
                self.env.close()
            except lmdb.Error:
                pass
            self.env = None
        if self.lock_fd is not None:
            try:
                os.close(self.lock_fd)
            except OSError:
                pass
            self.lock_fd = None


def absent_env(path: str, reason: str) -> Env:
    """A read-only, empty environment for ``path`` that holds no file: reads miss and
    writes raise CacheReadOnlyError(``reason``)."""
    e = Env(path)
    e.env = NoEnvironment()
    e.readonly = e.lockfree = True
    e.lock = False
    e.readonly_reason = reason
    e.fs = filesystem_of(path)
    return e


_REGISTRY: dict[str, Env] = {}
_REGISTRY_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # The child must never use the parent's environment. Closing it here only drops the
    # child's mapping and file descriptors (the parent's reader slots and fcntl locks are
    # its own); kvcache never holds a read transaction across calls, so none is live.
    for e in list(_REGISTRY.values()):
        e.close()
    _REGISTRY.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- opening


def read_identity(path: str, persist_stamp: bool = True) -> dict[str, Any]:
    """Validate an existing cache without changing a byte and return its ``format`` info
    row (:func:`kvcache.identity.check_identity`), through this process's environment
    when it has the path open.

    Raises:
        NotACacheError, IncompatibleCacheError, CacheCorruptError.
    """
    held = _REGISTRY.get(path)
    if held is not None and not held.dead:
        # This process has it open (py-lmdb refuses a second open of a path in one
        # process, so gc or inspect beside a live dataset failed): its identity was
        # checked when it opened; read the row through that environment.
        try:
            with held.env.begin(db=held.info) as txn:
                return json.loads(bytes(txn.get(b"format")))
        except lmdb.Error as exc:
            raise CacheCorruptError(f"{path}: damaged cache ({type(exc).__name__}: {exc})") from None
    return identify(path, persist_stamp)[0]


def _take_shared_lock(path: str) -> int | None:
    """Open ``kvcache.lock`` and hold it shared for as long as the env is open.

    Blocks while a compact or repair holds it exclusively. Returns None where the lock
    file cannot be opened (a read-only location): there, nobody can compact either.
    """
    lp = os.path.join(path, LOCK_NAME)
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(lp, flags | os.O_CLOEXEC, 0o666)
            break
        except OSError:
            continue
    else:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def open_env(path: str, *, readonly: bool, create: bool, map_size: int | None,
             readahead: bool | None = False, max_readers: int = 126, lock: bool = True,
             allow_network_writes: bool = False) -> Env:
    """Open (or reuse) this process's environment for ``path``.

    ``readahead=None`` turns OS readahead on for lock-free (published or network) caches
    and off otherwise.

    Raises:
        NetworkFilesystemError: ``create`` on a new path on a network or FUSE filesystem.
    """
    with _REGISTRY_LOCK:
        e = _REGISTRY.get(path)
        if e is not None and not e.dead:
            e.refs += 1
        else:
            e = _open_new(path, readonly=readonly, create=create, map_size=map_size,
                          readahead=readahead, max_readers=max_readers, lock=lock,
                          allow_network_writes=allow_network_writes)
            e.refs = 1
            _REGISTRY[path] = e
        if e.old_format and not readonly and not e.readonly:
            upgrade_format(e.env, e.info)
            e.old_format = False
        return e


def opened_here(path: str) -> bool:
    """Whether this process has the environment at ``path`` open (py-lmdb refuses to
    open it a second time, even read-only)."""
    e = _REGISTRY.get(path)
    return e is not None and not e.dead


def release_env(e: Env) -> None:
    with _REGISTRY_LOCK:
        e.refs -= 1
        if e.refs <= 0:
            e.close()
            if _REGISTRY.get(e.path) is e:
                del _REGISTRY[e.path]


def _hold_lock(path: str, *, readonly: bool, create: bool) -> tuple[int | None, bool]:
    """Take ``kvcache.lock`` before deciding how to open ``path`` (local disk, ``lock=True``):
    shared for an existing cache, exclusive for one this process creates. Returns
    ``(fd or None, creating)``.

    Processes that open a new path at once (the ranks of a job on one machine) would
    otherwise trip over each other: one sees the ``data.mdb`` another is initialising,
    without its format row yet, and calls it "not a kvcache cache". The creator holds the
    lock exclusively until its format row is committed; everyone else waits on the shared
    lock, then finds a finished cache.
    """
    for attempt in range(1000):
        if classify(path) == "existing":
            if not os.path.exists(os.path.join(path, LOCK_NAME)):
                return None, False  # not kvcache's (a foreign LMDB stays untouched)
            return _take_shared_lock(path), False  # blocks while a creator or compact holds it
        if readonly or not create:
            return None, False  # decide() refuses it
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise CacheReadOnlyError(f"{path}: cannot create the cache directory ({exc})") from None
        fd = _lock_fd(path)
        if fd is None:  # cannot create the lock file: creating the cache reports why
            return None, False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another opener is creating it (or holds it shared): wait our turn
            fcntl.flock(fd, fcntl.LOCK_SH)
        else:
            if classify(path) == "new":  # alone now: did someone finish creating it meanwhile?
                return fd, True
            fcntl.flock(fd, fcntl.LOCK_SH)
        if classify(path) == "existing":
            return fd, False
        os.close(fd)  # still new: the holder is another waiter; try again shortly
        time.sleep(0.001 * (1 + attempt % 10))
    raise CacheBusyError(f"{path}: could not take kvcache.lock to create the cache")


def _lock_fd(path: str) -> int | None:
    try:
        return os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        return None


# How each mode opens LMDB: (readonly, lock) attempts in order. A locked cache falls back
# to read-only where the location turns out not to be writable after all (a lock.mdb
# another user owns); read-only with the lock, then without it (a 0444 lock.mdb).
_ATTEMPTS = {
    "create": [(False, True)],
    "locked": [(False, True), (True, True), (True, False)],
    "readonly": [(True, True), (True, False)],
    "published": [(True, False)],
    "network": [(True, False)],
}


def _record_confirmed(e: Env, op: Opening) -> bool:
    """For a cache trusted by its publish record: are the meta pages LMDB mapped the ones
    the record names? Read from the map (LMDB has just read them: no round trip), else
    from the file."""
    data = os.path.join(op.path, "data.mdb")
    m = map_of(data)
    psize = int(op.record["psize"])  # type: ignore[index]
    if m is None or m[1] < 2 * psize or os.path.getsize(data) < 2 * psize:
        return matches_record(op.path, op.record)
    return meta_matches(ctypes.string_at(m[0], 2 * psize), op.record)  # type: ignore[arg-type]


def _open_new(path: str, *, readonly: bool, create: bool, map_size: int | None,
              readahead: bool | None, max_readers: int, lock: bool, allow_network_writes: bool,
              trust_record: bool = True) -> Env:
    e = Env(path)
    try:
        e.fs = fs = filesystem_of(path)
        creating = False
        if lock and not on_network(fs, allow_network_writes):
            e.lock_fd, creating = _hold_lock(path, readonly=readonly, create=create)
        op = decide(path, readonly=readonly, create=create, allow_network_writes=allow_network_writes, fs=fs,
                    trust_record=trust_record)
        if op.mode == "damaged":
            raise CacheCorruptError(op.reason)
        if op.mode == "create" and not lock:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise CacheReadOnlyError(f"{path}: cannot create the cache directory ({exc})") from None
    except BaseException:
        e.close()
        raise
    e.opening = op
    e.published = op.published
    e.lockfree = op.lockfree
    if op.mode == "readonly":
        e.readonly_reason = op.reason
    if e.lockfree:
        e.readonly_reason = op.reason
        if e.lock_fd is not None:  # taken while its identity was unknown; lock-free from now
            os.close(e.lock_fd)
            e.lock_fd = None
    elif lock and e.lock_fd is None and op.mode in ("locked", "readonly"):
        e.lock_fd = _take_shared_lock(path)  # a kvcache cache copied without its kvcache.lock
    readahead, prefetching = read_policy(readahead, e.lockfree, op.size)
    e.cold = cold_reads(e.lockfree, prefetching, op.size)
    state = op.state
    recorded = 0
    size = max(map_size or DEFAULT_MAP_SIZE, 1 << 20)
    # Open read-write where we can, even for a read-only Store: the environment is shared by
    # every Store on the path in this process (py-lmdb allows one open), so a read-only view
    # opened first must not turn a later dataset's write-back off. Stores enforce readonly.
    attempts = list(dict.fromkeys((ro, lk and lock) for ro, lk in _ATTEMPTS[op.mode]))
    last: BaseException | None = None
    for ro, lk in attempts:
        try:
            e.env = lmdb.open(
                path, subdir=True, readonly=ro, lock=lk, create=(state == "new"), max_dbs=4,
                map_size=size, readahead=readahead, max_readers=max_readers, meminit=False,
                # one fsync per commit, not two: an OS crash or power loss may undo the last
                # commit (samples are recomputed), it never corrupts the file; SIGKILL loses
                # nothing acknowledged (50 kills inside write transactions and commits, with
                # and without metasync, lost no acknowledged commit).
                metasync=False,
            )
            e.readonly, e.lock = ro, lk
            break
        except lmdb.ReadersFullError:
            e.close()
            raise CacheBusyError(
                f"{path}: the LMDB reader table is full of stale or live readers; a process "
                "that has the cache open can clear stale ones (any kvcache read does), or stop "
                "every user of the cache so the next open resets the table"
            ) from None
        except (lmdb.Error, OSError) as exc:
            last = exc
            if not is_readonly_error(exc):
                e.close()
                raise CacheCorruptError(f"{path}: cannot open the cache ({exc})") from None
            if state == "new":
                e.close()
                raise CacheReadOnlyError(f"{path}: cannot create a cache here ({exc})") from None
    else:
        e.close()
        raise CacheReadOnlyError(f"{path}: cannot open the cache even read-only ({last})")
    if op.trusted == "record" and not _record_confirmed(e, op):
        # the record names another version of data.mdb: decide again, walking the file
        e.close()
        return _open_new(path, readonly=readonly, create=create, map_size=map_size, readahead=readahead,
                         max_readers=max_readers, lock=lock, allow_network_writes=allow_network_writes,
                         trust_record=False)
    if e.cold and op.size > TAIL_BYTES:
        # A compacted (published) file ends with the tops of its trees: the main and info
        # roots, the samples root. Ask for them in one request before the first lookups,
        # not a round trip each.
        willneed(os.path.join(path, "data.mdb"), op.size - TAIL_BYTES, TAIL_BYTES)
    if e.readonly and not readonly and not e.lockfree and last is not None:
        e.readonly_reason = f"{path} is not writable ({last}); write-back is off"
    env = e.env
    try:
        if e.lock:
            env.reader_check()
            if env.max_readers() < max_readers:  # the first opener fixed the table size
                import warnings

                warnings.warn(
                    f"kvcache: {path}: the LMDB reader table has {env.max_readers()} slots, fewer "
                    f"than the {max_readers} asked for (the first process to open the cache set it); "
                    "more readers than that will get CacheBusyError", KvCacheWarning, stacklevel=2)
        if e.readonly:
            e.samples = env.open_db(b"samples", create=False)
            e.meta = env.open_db(b"meta", create=False)
            e.info = env.open_db(b"info", create=False)
        else:
            e.samples = env.open_db(b"samples")
            e.meta = env.open_db(b"meta")
            e.info = env.open_db(b"info")
            with env.begin(write=True, db=e.info) as txn:
                raw = txn.get(b"format")
                if raw is None:
                    txn.put(b"format", json.dumps({
                        "format": "kvcache", "version": FORMAT_VERSION, "codec": codec.CODEC_VERSION,
                        "created": time.time(),
                    }).encode())
                else:
                    e.old_format = format_version(raw) == 1
                raw = txn.get(b"map_size")
                recorded = int(raw) if raw else 0
            if recorded > env.info()["map_size"]:
                env.set_mapsize(recorded)  # open with max(configured, recorded)
            if state == "new":  # nothing but kvcache has written it: stamp it now (it is tiny)
                remember(path, validated(path))
        if creating and e.lock_fd is not None:
            fcntl.flock(e.lock_fd, fcntl.LOCK_SH)  # created: let the others in
    except lmdb.Error as exc:
        e.close()
        if is_readonly_error(exc):
            raise CacheReadOnlyError(f"{path}: cannot initialise the cache ({exc})") from None
        raise CacheCorruptError(f"{path}: cannot open the cache ({type(exc).__name__}: {exc})") from None
    if prefetching:
        prefetch(path)
    return e
