"""Structural validation of ``data.mdb``, once per version of the file.

LMDB 0.9 trusts the page references it reads: a damaged one can make it touch a page
past the end of the file (SIGBUS), past its map (SIGSEGV), or hit an assertion (SIGABRT)
in a cursor walk (observed with py-lmdb 3.0 / LMDB 0.9.36). No check of a value prevents it, so
before a process trusts a file it has not seen validated, :func:`validate` walks every
tree with plain ``pread`` calls (it cannot itself take a signal: it never maps the file)
and refuses a file where

* a page reference is not below the last page, or the page lies past the end of the file;
* a page does not carry its own number, or is not the kind its place needs (branch above
  the leaf level, leaf at it, overflow for a big value), or is reached twice;
* a page's bounds, or a node's offset, key or inline value, fall outside its page;
* an overflow run lies past the file, or is shorter than the value it holds;
* a named database's record or a free-list entry is malformed.

A validated file is remembered by its identity, ``(dev, ino, size, mtime_ns, ctime_ns)``
of ``data.mdb`` plus the meta page's transaction id: in this process's memory, and in a
sidecar file (``kvcache.valid``) where the directory is writable, so a healthy cache is
walked once, not on every open of every DataLoader worker. A write by kvcache's own
writers re-stamps the file (:func:`restamp`: only when the stamp matched the file as
the write began, under LMDB's writer lock); any other write changes ``mtime``/``ctime``,
so the stamp no longer matches and the next opener validates again.

kvcache's writers hold :func:`stamping` (an exclusive ``flock`` on ``data.mdb``, which
LMDB never locks) from before their write transaction until the new version is
stamped: LMDB's writer lock ends at the commit, so without it a second process (another
DataLoader worker writing back) could begin its transaction between the first one's
commit and its re-stamp, find the stamp behind the file, and leave every later version
unstamped. :func:`walks` counts the walks this process made (tests assert on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from typing import Iterator

from .errors import CacheCorruptError

__all__ = ["STAMP_NAME", "forget", "identity", "remember", "restamp", "stamp_matches", "stamping", "validate",
           "validated", "walks"]

STAMP_NAME = "kvcache.valid"
# Files up to this size are read in one sequential pass and walked in memory (fewer, larger
# reads: what a network filesystem needs); larger ones are walked with a pread per page.
WHOLE_FILE_BYTES = 64 << 20
MAGIC = 0xBEEFC0DE
P_BRANCH, P_LEAF, P_OVERFLOW = 0x01, 0x02, 0x04
F_BIGDATA, F_SUBDATA = 0x01, 0x02
P_INVALID = (1 << 64) - 1
_HDR = struct.Struct("<QHHHH")  # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
_NODE = struct.Struct("<HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
_DB = struct.Struct("<IHHQQQQQ")  # md_pad, md_flags, md_depth, 3 page counts, entries, root
_U64 = struct.Struct("<Q")

_MEMO: dict[str, tuple] = {}  # path -> the identity this process validated or stamped
_WALKS = [0]  # whole-file walks (validate calls that got past the meta pages) in this process


class _Damage(Exception):
    pass


def identity(path: str) -> tuple | None:
    """``(dev, ino, size, mtime_ns, ctime_ns)`` of ``path/data.mdb`` (None if missing)."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_stamp(path: str) -> tuple | None:
    try:
        with open(os.path.join(path, STAMP_NAME)) as f:
            return tuple(json.load(f)["identity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_stamp(path: str, ident: tuple, txnid: int | None) -> None:
    tmp = os.path.join(path, f".{STAMP_NAME}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump({"identity": list(ident), "txnid": txnid}, f)
        os.replace(tmp, os.path.join(path, STAMP_NAME))
    except OSError:  # a read-only location: the in-process memo still holds it
        try:
            os.unlink(tmp)
        except OSError:
            pass


def stamp_matches(path: str) -> bool:
    """Whether ``data.mdb`` is, byte for byte, a version this process or the sidecar
    stamp has seen validated (or written through kvcache since)."""
    ident = identity(path)
    return ident is not None and (_MEMO.get(path) == ident or _read_stamp(path) == ident)


def restamp(path: str, trusted: bool) -> None:
    """After a commit by kvcache: stamp the new version of the file if the previous one
    was ``trusted`` (it matched the stamp when the write transaction began)."""
    if not trusted:
        return
    ident = identity(path)
    if ident is not None:
        _MEMO[path] = ident
        _write_stamp(path, ident, None)


@contextlib.contextmanager
def stamping(path: str) -> Iterator[None]:
    """Hold kvcache's stamping lock on ``path`` (an exclusive ``flock`` on ``data.mdb``):
    a writer takes it before its write transaction begins and keeps it until
    :func:`restamp` has stamped what it committed, so writers in other processes see the
    stamp and the file move together. Without a ``data.mdb`` (a cache LMDB has not
    created yet), or where the filesystem refuses flock, it holds nothing."""
    try:
        fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no flock here: writers may race to stamp; the next opener then walks
        yield
    finally:
        os.close(fd)  # releases the lock


def walks() -> int:
    """How many times this process walked a whole ``data.mdb`` (:func:`validate`): an
    open that found a matching stamp adds nothing."""
    return _WALKS[0]


def forget(path: str) -> None:
    """Drop what this process and the sidecar stamp remember of ``path``: the next
    opener walks the file again (damage was seen in a file that was stamped valid)."""
    _MEMO.pop(path, None)
    try:
        os.unlink(os.path.join(path, STAMP_NAME))
    except OSError:
        pass


def validated(path: str) -> tuple | None:
    """Make sure ``path``'s ``data.mdb`` has been validated: walk it unless its stamp
    matches. Returns what :func:`remember` stamps once the caller knows the directory is
    a kvcache cache (None: nothing to stamp).

    Raises:
        CacheCorruptError: the structure is damaged; the message names the page and what
            is wrong, and the fix.
    """
    if stamp_matches(path):
        return None
    ident = identity(path)
    txnid = validate(path)
    if txnid is None or ident is None or identity(path) != ident:  # not LMDB's, or it moved
        return None
    return ident, txnid


def remember(path: str, walked: tuple | None, persist: bool = True) -> None:
    """Stamp the version :func:`validated` walked: in memory, and with ``persist`` in the
    sidecar file (not for a published or network cache, where nothing may be written)."""
    if walked is not None:
        _MEMO[path] = walked[0]
        if persist:
            _write_stamp(path, *walked)


# --------------------------------------------------------------------------- the walk


class _File:
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.psize = 4096
        self.last = 0
        self.data: bytes | None = None  # the whole file, when it was read in one pass

    def read_whole(self) -> None:
        """Read the file in one sequential pass (1 MiB requests): over a network each
        request is a round trip, and a walk that preads page by page pays one per tree
        page; a few large reads cost fewer (docs/network.md counts them)."""
        chunks, off = [], 0
        while off < self.size:
            chunk = os.pread(self.fd, min(1 << 20, self.size - off), off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        self.data = b"".join(chunks)
        self.size = len(self.data)

    def read(self, n: int, off: int) -> bytes:
        if self.data is not None:
            return self.data[off:off + n]
        return os.pread(self.fd, n, off)

    def page(self, pgno: int) -> bytes:
        if not 2 <= pgno <= self.last:
            raise _Damage(f"a page reference {pgno} is not between 2 and the last page {self.last}")
        off = pgno * self.psize
        if off + self.psize > self.size:
            raise _Damage(f"truncated: page {pgno} lies past the end of the file ({self.size} bytes)")
        buf = self.read(self.psize, off)
        if len(buf) != self.psize:
            raise _Damage(f"truncated: page {pgno} could not be read whole")
        if _U64.unpack_from(buf, 0)[0] != pgno:
            raise _Damage(f"page {pgno} carries the number {_U64.unpack_from(buf, 0)[0]} (a misplaced page)")
        return buf


def _meta(buf: bytes) -> dict | None:
    if len(buf) < 16 + 136:
        return None
    magic, version = struct.unpack_from("<II", buf, 16)
    if magic != MAGIC or version != 1:
        return None
    free = _DB.unpack_from(buf, 40)
    main = _DB.unpack_from(buf, 88)
    last, txnid = struct.unpack_from("<QQ", buf, 136)
    return {"psize": free[0], "free": free, "main": main, "last": last, "txnid": txnid}


def validate(path: str, overflow_damage: list | None = None) -> int | None:
    """Walk every tree of ``path/data.mdb`` (see the module docstring); return the meta
    page's transaction id, or None when the meta pages are not LMDB's (LMDB's open then
    says what is wrong).

    With a list as ``overflow_damage``, a main-tree value whose overflow run is intact in
    place (inside the file, reached once) but whose first page's header is damaged is
    appended to it as ``(pgno, pages, psize)`` instead of refusing the file: the value's
    own checksum catches its bytes, and :mod:`kvcache.selfrepair` can rewrite that header
    (LMDB reads an overflow header only to free the run, when the value is replaced).

    Raises:
        CacheCorruptError: the structure is damaged.
    """
    f = os.path.join(path, "data.mdb")
    try:
        fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        metas = [_meta(os.pread(fd, 4096, 0))]
        psize = metas[0]["psize"] if metas[0] else 4096
        if psize not in (4096, 8192, 16384, 32768, 65536):
            return None
        metas.append(_meta(os.pread(fd, 4096, psize)))
        if None in metas:
            return None  # not LMDB's meta pages: lmdb.open reports it (InvalidError)
        m = max(metas, key=lambda x: x["txnid"])  # what LMDB picks
        _WALKS[0] += 1
        fl = _File(fd, size)
        fl.psize, fl.last = psize, m["last"]
        if size <= WHOLE_FILE_BYTES:
            fl.read_whole()
        seen = bytearray((m["last"] >> 3) + 1) if m["last"] < 1 << 36 else None
        if seen is None:
            raise _Damage(f"the meta page's last page {m['last']} is absurd")
        _Walk(fl, seen, overflow_damage).run(m)
        return m["txnid"]
    except _Damage as exc:
        raise CacheCorruptError(
            f"{path}: the LMDB file's structure is damaged ({exc}); reading it could kill the "
            f"process, so it was not opened. Recover what is readable with "
            f"`kvcache verify --repair {path}`, or delete the cache") from None
    finally:
        os.close(fd)


class _Walk:
    def __init__(self, fl: _File, seen: bytearray, overflow_damage: list | None = None) -> None:
        self.fl, self.seen = fl, seen
        self.overflow_damage = overflow_damage

    def run(self, m: dict) -> None:
        self.tree(m["free"], "free")
        self.tree(m["main"], "main")

    def mark(self, pgno: int) -> None:
        i, bit = pgno >> 3, 1 << (pgno & 7)
        if self.seen[i] & bit:
            raise _Damage(f"page {pgno} is reached twice")
        self.seen[i] |= bit

    def tree(self, db: tuple, kind: str) -> None:
        depth, root = db[2], db[7]
        if root == P_INVALID:
            return
        if not 1 <= depth <= 32:
            raise _Damage(f"{kind} database: depth {depth}")
        stack = [(root, 1)]
        while stack:
            pgno, level = stack.pop()
            buf = self.fl.page(pgno)
            self.mark(pgno)
            _pg, _pad, flags, lower, upper = _HDR.unpack_from(buf, 0)
            want = P_LEAF if level == depth else P_BRANCH
            if flags & (P_BRANCH | P_LEAF | P_OVERFLOW) != want or flags & ~(P_BRANCH | P_LEAF | 0x10):
                raise _Damage(f"{kind} database: page {pgno} has flags {flags:#x} where a "
                              f"{'leaf' if want == P_LEAF else 'branch'} page belongs")
            psize = self.fl.psize
            if lower & 1 or not 16 <= lower <= upper <= psize:
                raise _Damage(f"page {pgno}: bounds lower={lower} upper={upper}")
            n = (lower - 16) >> 1
            ptrs = struct.unpack_from(f"<{n}H", buf, 16)
            for ptr in ptrs:
                if not upper <= ptr <= psize - 8:
                    raise _Damage(f"page {pgno}: a node at offset {ptr} outside the page's node area")
                lo, hi, nflags, ksize = _NODE.unpack_from(buf, ptr)
                kend = ptr + 8 + ksize
                if kend > psize:
                    raise _Damage(f"page {pgno}: a key runs past the page")
                if want == P_BRANCH:
                    stack.append((lo | hi << 16 | nflags << 32, level + 1))
                    continue
                dsize = lo | hi << 16
                if nflags & F_BIGDATA:
                    if nflags & ~F_BIGDATA or kend + 8 > psize:
                        raise _Damage(f"page {pgno}: a malformed big-value node")
                    self.overflow(_U64.unpack_from(buf, kend)[0], dsize, kind)
                elif kend + dsize > psize:
                    raise _Damage(f"page {pgno}: a value of {dsize} bytes runs past the page")
                elif nflags == F_SUBDATA and kind == "main":
                    if dsize != _DB.size:
                        raise _Damage(f"page {pgno}: a named database record of {dsize} bytes")
                    self.tree(_DB.unpack_from(buf, kend), bytes(buf[ptr + 8:kend]).decode("latin-1"))
                elif nflags:
                    raise _Damage(f"page {pgno}: node flags {nflags:#x} in the {kind} database")
                elif kind == "free":
                    self.free_list(buf[kend:kend + dsize], pgno)

    def overflow(self, pgno: int, dsize: int, kind: str) -> None:
        psize = self.fl.psize
        try:
            buf = self.fl.page(pgno)
            flags = _HDR.unpack_from(buf, 0)[2]
            pages = struct.unpack_from("<I", buf, 12)[0]  # mp_pages, over mp_lower/mp_upper
            if flags & ~0x10 != P_OVERFLOW or pages < 1:
                raise _Damage(f"{kind} database: page {pgno} is not the overflow page a value points to")
        except _Damage:
            need = (dsize + 16 + psize - 1) // psize
            end = pgno + need - 1
            if (self.overflow_damage is None or kind in ("main", "free") or not 2 <= pgno <= end <= self.fl.last
                    or (end + 1) * psize > self.fl.size):
                raise
            for p in range(pgno, end + 1):
                self.mark(p)  # a run that overlaps another page is tree damage after all
            self.overflow_damage.append((pgno, need, psize))
            return
        if dsize > pages * psize - 16:
            raise _Damage(f"{kind} database: a value of {dsize} bytes in an overflow run of {pages} pages")
        end = pgno + pages - 1
        if end > self.fl.last or (end + 1) * psize > self.fl.size:
            raise _Damage(f"truncated: the overflow run at page {pgno} ({pages} pages) lies past the file")
        for p in range(pgno, end + 1):
            self.mark(p)
        if kind == "free":
            self.free_list(self.fl.read(dsize, pgno * psize + 16), pgno)

    def free_list(self, ids: bytes, pgno: int) -> None:
        if len(ids) < 8 or len(ids) % 8:
            raise _Damage(f"free list at page {pgno}: {len(ids)} bytes")
        n = _U64.unpack_from(ids, 0)[0]
        if n != len(ids) // 8 - 1:
            raise _Damage(f"free list at page {pgno}: count {n} for {len(ids) // 8 - 1} entries")
        last = self.fl.last
        for (p,) in struct.iter_unpack("<Q", ids[8:]):
            if not 2 <= p <= last:
                raise _Damage(f"free list at page {pgno}: page {p} is out of range")
