"""The publish record: what ``kvcache publish`` validated, so readers need not walk again.

A published cache is immutable. ``publish`` walks its structure once
(:func:`kvcache.structure.validate`) and checks every record, then writes
``kvcache.published`` next to ``data.mdb``: a small JSON file that names exactly the
version of ``data.mdb`` it validated. Readers that find a matching record trust the
structure and skip the walk, so opening costs a handful of round trips whatever the size
of the file (the walk reads every tree page: 50,430 reads for 2.35 GiB).

The record identifies the file by its content, not by where it lies (no device, inode or
times, which change on every copy), so a plain copy of the folder (``cp -r``, ``rsync``,
a staged copy) whose bytes are the same is trusted as well:

* ``size``: ``data.mdb``'s length in bytes, and ``psize``, LMDB's page size;
* ``meta_xxh3``: an xxh3-128 digest of both LMDB meta pages (the first two pages: every
  database root, depth and count, the last page number, the transaction id), with the
  newest meta page's ``txnid``, ``last_page`` and ``main_root`` in the clear;
* ``file_xxh3``: an xxh3-128 digest of the whole file, for what is not O(1):
  ``kvcache verify`` and staging compare it (:func:`file_digest`);
* ``format`` and ``published``: the cache's ``format`` and ``published`` info rows, so a
  reader with a matching record need not read them through LMDB before opening.

:func:`matches_record` checks the size and the meta pages: one ``stat`` and one 8 KiB
read. It does not see damage to other pages after publishing (a disk error, another
program writing into the file): what that does is stated in docs/reliability.md
("Published caches: the trust model").
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import xxhash

__all__ = ["RECORD_NAME", "RECORD_VERSION", "file_digest", "make_record", "matches_record", "meta_matches",
           "publish_record", "write_record"]

RECORD_NAME = "kvcache.published"
RECORD_VERSION = 1
_MAGIC = 0xBEEFC0DE
_PSIZES = (4096, 8192, 16384, 32768, 65536)


def _meta_fields(page: bytes) -> tuple[int, int, int] | None:
    """``(txnid, last_page, main_root)`` of one LMDB meta page, or None."""
    if len(page) < 160 or struct.unpack_from("<II", page, 16) != (_MAGIC, 1):
        return None
    main_root = struct.unpack_from("<Q", page, 88 + 40)[0]
    last, txnid = struct.unpack_from("<QQ", page, 136)
    return txnid, last, main_root


def _meta_state(head: bytes, psize: int) -> dict[str, Any] | None:
    """The record's meta fields from the file's first ``2 * psize`` bytes."""
    if len(head) < 2 * psize:
        return None
    metas = [_meta_fields(head[:psize]), _meta_fields(head[psize:2 * psize])]
    if None in metas:
        return None
    txnid, last, root = max(metas)  # type: ignore[type-var]  # LMDB uses the newest
    return {"meta_xxh3": xxhash.xxh3_128_hexdigest(head[:2 * psize]), "txnid": txnid,
            "last_page": last, "main_root": root}


def file_digest(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    """xxh3-128 (hex) of ``path/data.mdb`` in full: O(size), large sequential reads.

    Raises:
        OSError: the file cannot be read.
    """
    h = xxhash.xxh3_128()
    with open(os.path.join(os.fspath(path), "data.mdb"), "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def make_record(path: str, fmt: dict[str, Any], published: dict[str, Any] | None) -> dict[str, Any]:
    """The record of ``path/data.mdb`` as it is now (``publish`` calls it on its finished,
    validated copy).

    Raises:
        ValueError: ``data.mdb`` does not start with two LMDB meta pages.
    """
    data = os.path.join(path, "data.mdb")
    with open(data, "rb", buffering=0) as f:
        first = f.read(4096)
        psize = struct.unpack_from("<I", first, 40)[0] if len(first) >= 44 else 0  # the free db's md_pad
        psize = psize if psize in _PSIZES else 4096
        head = first + f.read(2 * psize - len(first))
        size = os.fstat(f.fileno()).st_size
    state = _meta_state(head, psize)
    if state is None:
        raise ValueError(f"{data}: not an LMDB file (no meta pages)")
    return {"record": "kvcache-publish", "version": RECORD_VERSION, "size": size, "psize": psize,
            **state, "file_xxh3": file_digest(path), "format": fmt, "published": published}


def write_record(path: str, record: dict[str, Any]) -> None:
    """Write ``record`` as ``path/kvcache.published`` (read-only, fsynced)."""
    dest = os.path.join(path, RECORD_NAME)
    with open(dest, "w") as f:
        json.dump(record, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest, 0o444)


def publish_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The publish record stored in the cache directory ``path`` (None: there is none, or it
    is not a readable record). One small file read."""
    try:
        with open(os.path.join(os.fspath(path), RECORD_NAME), "rb") as f:
            raw = f.read(1 << 20)
        rec = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("record") != "kvcache-publish" or rec.get("version") != RECORD_VERSION:
        return None
    if not isinstance(rec.get("size"), int) or rec.get("psize") not in _PSIZES:
        return None
    return rec


def matches_record(path: str | os.PathLike, record: dict[str, Any] | None = None) -> bool:
    """Whether ``path/data.mdb`` is the file version ``record`` describes: the same size and
    the same two meta pages (one ``fstat`` and one read of ``2 * psize`` bytes: O(1)).

    ``record`` defaults to the one stored at ``path`` (:func:`publish_record`); pass another
    cache's record to ask whether ``path`` holds a copy of that cache's current version
    (``matches_record(local_copy, publish_record(published))``). Never raises: a missing
    or unreadable file, or a malformed record, does not match.
    """
    rec = publish_record(path) if record is None else record
    if not rec:
        return False
    try:
        psize, size = int(rec["psize"]), int(rec["size"])
        fd = os.open(os.path.join(os.fspath(path), "data.mdb"), os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, KeyError, TypeError, ValueError):
        return False
    try:
        if os.fstat(fd).st_size != size:
            return False
        head = os.pread(fd, 2 * psize, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return meta_matches(head, rec)


def meta_matches(head: bytes, record: dict[str, Any]) -> bool:
    """Whether ``head``, the first two pages of a ``data.mdb``, are the meta pages
    ``record`` names (what :func:`matches_record` checks, from bytes already read)."""
    try:
        psize = int(record["psize"])
    except (KeyError, TypeError, ValueError):
        return False
    state = _meta_state(head[:2 * psize], psize)
    return state is not None and all(state[k] == record.get(k) for k in state)
