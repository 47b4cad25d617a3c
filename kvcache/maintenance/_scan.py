"""The checksum scan and the salvage copy, run in a child process.

``python -m kvcache.maintenance._scan PATH`` walks every database of the cache, checks
every record (checksum, decoding, agreement with its metadata row) and prints JSON lines
on stdout: ``{"total": n}``, ``{"done": n}`` now and then, and ``{"result": {...}}``.
``--salvage DEST`` instead copies every readable good record into a fresh environment at
DEST, printing ``{"try": index}`` before touching each key, so the parent can restart it
past a key whose pages kill the process (LMDB takes SIGBUS reading a page past the end
of a truncated file, and aborts on an assertion when a cursor meets a damaged branch or
leaf page: both seen in fault-injection runs).

This module imports only lmdb, numpy and the codec: a damaged file can kill it, and the
parent reports how it died.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from typing import Any

import lmdb
import numpy as np

from .. import codec, layout
from ..errors import CorruptRecordError
from ..keys import digest
from ..extent import used_bytes
from ..store import FORMAT_VERSION, KEY, LOCK_NAME, Rows

_PROGRESS_EVERY = 1000


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _open(path: str) -> Any:
    last: Exception | None = None
    # A registered reader is safe against live writers; but where there is no lock.mdb
    # (a published cache, a read-only copy) no writer is live, and creating one would
    # write under a tree that must not change.
    locks = (True, False) if os.path.exists(os.path.join(path, "lock.mdb")) else (False,)
    for lock in locks:
        try:
            return lmdb.open(path, subdir=True, readonly=True, lock=lock, create=False, max_dbs=4)
        except lmdb.InvalidError:
            raise
        except lmdb.Error as exc:
            last = exc
    raise last  # type: ignore[misc]


def _identity(env: Any) -> tuple[dict | None, dict | None, str | None]:
    """(format row, current row, problem) of the environment."""
    try:
        info = env.open_db(b"info", create=False)
    except lmdb.Error:
        return None, None, "not_a_cache"
    with env.begin(db=info) as txn:
        fmt, cur = txn.get(b"format"), txn.get(b"current")
    if fmt is None:
        return None, None, "not_a_cache"
    try:
        fmt, cur = json.loads(fmt), (json.loads(cur) if cur else None)
    except ValueError:
        return None, None, "damaged"
    if not isinstance(fmt, dict) or not (cur is None or isinstance(cur, dict)):
        return None, None, "damaged"
    return fmt, cur, None


# Storage widths of the torch dtypes numpy lacks (every other one is layout.TORCH_NATIVE).
_NON_NATIVE = {"bfloat16": 2, "complex32": 4, "bits16": 2, **dict.fromkeys((
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits1x8", "bits2x4", "bits4x2",
    *(f"int{b}" for b in range(1, 8)), *(f"uint{b}" for b in range(1, 8))), 1)}


def _numpy_torch() -> Any:
    """A stand-in for torch while decoding here: tensor leaves decode as numpy arrays.

    The scan checks bytes, not tensors, and importing torch costs a second per child. A
    dtype name missing here makes :func:`_decodes` retry with the real torch.
    """
    ns = types.SimpleNamespace(dtype=np.dtype, from_numpy=lambda a: a)
    for name in layout.TORCH_NATIVE:
        setattr(ns, name, np.dtype(name))
    for name, size in _NON_NATIVE.items():
        setattr(ns, name, layout.RAW_BY_SIZE[size])
    return ns


def _decodes(raw: Any, index: int) -> None:
    """Decode and verify ``raw`` stored at ``index`` (raises CorruptRecordError), without
    torch when the layout allows."""
    if layout.torch_in_use() is None:
        layout.use_torch(_numpy_torch())
    try:
        codec.decode(raw, True, None, index)
    except CorruptRecordError as exc:
        if "unknown torch dtype" not in str(exc) or isinstance(layout.torch_in_use(), types.ModuleType):
            raise
        layout.use_torch(None)  # a dtype the stand-in lacks: use torch from now on
        codec.decode(raw, True, None, index)


def _name(kb: bytes) -> int | str | None:
    """How a report names the record at LMDB key ``kb``: its index (8-byte key), the key's
    hex (16 bytes: a keyed cache's digest of the user's key), None for any other length."""
    if len(kb) == KEY.size:
        return KEY.unpack(kb)[0]
    return kb.hex() if len(kb) == 16 else None


def _order(x: int | str) -> tuple[bool, Any]:
    return isinstance(x, str), x


def _check_record(raw: Any, meta: bytes | None, index: int, kb: bytes | None = None) -> str | None:
    """Why the record stored at ``index`` (the checksum seed: ``codec.seed_of`` of its
    LMDB key ``kb``) is bad, or None."""
    try:
        fp, checksum, _ = codec.read_header(raw)
        _decodes(raw, index)  # its length is checked before the checksum reads it all
    except CorruptRecordError as exc:
        return str(exc)
    if meta is not None:
        fields = codec.meta_fields(meta)
        if fields is None:
            return "metadata row too short"
        if fields != (fp, checksum, len(raw)):
            return "metadata row does not match the record"
        if codec.meta_layout(meta) != codec.record_layout(raw):
            return "metadata layout does not match the record"
        user_key = codec.meta_key(meta)
        if kb is not None and len(kb) == 16 and user_key is not None and digest(user_key)[0] != kb:
            return "the metadata row's key does not hash to the record's LMDB key"
    return None


def scan(path: str) -> dict:
    res: dict[str, Any] = {"checked": 0, "bad": [], "reasons": {}, "orphans": [], "errors": [],
                           "entries": 0, "not_a_cache": False, "current": None}
    try:
        env = _open(path)
    except lmdb.InvalidError as exc:
        if not os.path.exists(os.path.join(path, LOCK_NAME)):
            res["not_a_cache"] = True
        res["errors"].append(f"cannot open: {exc}")
        return res
    except lmdb.Error as exc:
        res["errors"].append(f"cannot open: {exc}")
        return res
    try:
        need = used_bytes(env)
        have = os.path.getsize(os.path.join(path, "data.mdb"))
        if have < need:
            res["short_by"] = need - have  # reported if the walk below dies or fails
        _fmt, cur, problem = _identity(env)
        if problem:
            if os.path.exists(os.path.join(path, LOCK_NAME)):
                res["errors"].append("the info table (format, fingerprints) is missing or unreadable")
            else:
                res["not_a_cache"] = True
            return res
        res["current"] = cur
        samples = env.open_db(b"samples", create=False)
        meta = env.open_db(b"meta", create=False)
        # the main database and the info rows: touch every page
        for db in (None, env.open_db(b"info", create=False)):
            with env.begin(db=db, buffers=True) as txn:
                for _k, v in txn.cursor():
                    if len(v):
                        v[0], v[-1]
        meta_keys: set[bytes] = set()
        with env.begin(db=meta, buffers=True) as txn:
            n_meta = txn.stat(meta)["entries"]
            for k, _v in txn.cursor():
                meta_keys.add(bytes(k))
        if len(meta_keys) != n_meta:
            res["errors"].append(f"meta: the database says {n_meta} rows, a walk found {len(meta_keys)}")
        seen: set[bytes] = set()
        with env.begin(db=samples, buffers=True) as txn:
            total = txn.stat(samples)["entries"]
            res["entries"] = total
            _emit({"total": total})
            mtxn = env.begin(db=meta, buffers=True)
            try:
                for k, v in txn.cursor():
                    kb = bytes(k)
                    seen.add(kb)
                    res["checked"] += 1
                    name = _name(kb)
                    if name is None:
                        res["errors"].append(f"samples: a key of {len(kb)} bytes")
                        continue
                    m = mtxn.get(kb)
                    try:
                        why = _check_record(v, None if m is None else bytes(m), codec.seed_of(kb), kb)
                    except codec.MissingCodecError as exc:  # not damage: the parent raises it
                        res["missing_codec"] = str(exc)
                        break
                    if why:
                        res["bad"].append(name)
                        res["reasons"][str(name)] = why
                    elif m is None:
                        res["orphans"].append(name)
                    if res["checked"] % _PROGRESS_EVERY == 0:
                        _emit({"done": res["checked"]})
            finally:
                mtxn.abort()
        if len(seen) != total:
            res["errors"].append(f"samples: the database says {total} records, a walk found {len(seen)}")
        for kb in meta_keys - seen:
            name = _name(kb)
            if name is not None:
                res["orphans"].append(name)
            else:
                res["errors"].append(f"meta: a key of {len(kb)} bytes")
        res["orphans"].sort(key=_order)
    except lmdb.Error as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        env.close()
    return res


def salvage(path: str, dest: str, skip: set[int | str], skip_walks: set[str]) -> dict:
    """Copy every good record (and the info rows) of ``path`` into a new env at ``dest``."""
    try:
        src = _open(path)
    except lmdb.Error as exc:  # e.g. damaged meta pages: only the leaf pages can be read
        _emit({"error": f"open: {exc}"})
        import tempfile

        src = lmdb.open(tempfile.mkdtemp(prefix="nothing-", dir=dest), subdir=True,
                        create=True, max_dbs=4, map_size=1 << 20)
        for name in (b"samples", b"meta", b"info"):
            src.open_db(name)
    # room for everything the file holds, reached by the tree or found in its leaf pages
    room = 2 * os.path.getsize(os.path.join(path, "data.mdb")) + (1 << 24)
    out = lmdb.open(dest, subdir=True, create=True, max_dbs=4, map_size=max(src.info()["map_size"], room))
    o_samples, o_meta, o_info = (out.open_db(n) for n in (b"samples", b"meta", b"info"))
    copied = 0
    keys: set[bytes] = set()
    try:
        info = src.open_db(b"info", create=False)
        with src.begin(db=info) as txn, out.begin(write=True, db=o_info) as otxn:
            for k, v in txn.cursor():
                try:
                    value = json.loads(bytes(v))
                except ValueError:
                    continue  # a damaged row is left out (the next writer rebuilds it)
                if bytes(k) in (b"format", b"current") and not isinstance(value, dict):
                    continue
                otxn.put(bytes(k), bytes(v))
    except lmdb.Error as exc:
        _emit({"error": f"info: {exc}"})
    length = None
    try:
        _fmt, cur, _problem = _identity(src)
        length = (cur or {}).get("length")
    except (lmdb.Error, ValueError):
        pass
    walked = 0
    for name in (b"meta", b"samples"):  # gather candidate keys; a broken walk stops early
        if name.decode() in skip_walks:
            continue
        _emit({"walk": name.decode()})  # if we die now, the parent skips this walk next time
        try:
            db = src.open_db(name, create=False)
            with src.begin(db=db) as txn:
                for k in txn.cursor().iternext(keys=True, values=False):
                    keys.add(bytes(k))
            walked += 1
        except lmdb.Error as exc:
            _emit({"error": f"{name.decode()}: {exc}"})
    if walked < 2 and length:  # a walk failed: probe every index the source has
        keys.update(KEY.pack(i) for i in range(length))
    try:
        samples = src.open_db(b"samples", create=False)
    except lmdb.Error as exc:
        _emit({"error": f"samples: {exc}"})
        samples = None
        keys.clear()  # nothing to copy; still finish a valid (empty) cache below
    batch: list[tuple[bytes, bytes, bytes | None]] = []
    fps: set[int] = set()  # the fingerprint ids of the records copied

    def commit() -> None:
        with out.begin(write=True) as otxn:
            rows = Rows(otxn, o_samples, o_meta, o_info)  # recounts the copied info's tally
            for kb, rec, user_key in batch:
                rows.put(kb, rec, codec.meta_row_of(rec, user_key))
            rows.save()
        batch.clear()

    try:
        meta = src.open_db(b"meta", create=False)
    except lmdb.Error:
        meta = None
    for kb in sorted(keys):
        i = _name(kb)
        if i is None or i in skip:
            continue
        _emit({"try": i})
        try:
            with src.begin(db=samples) as txn:
                rec = txn.get(kb)
        except lmdb.Error:
            continue
        if rec is None or _check_record(rec, None, codec.seed_of(kb)):
            continue
        user_key = None
        if len(kb) == 16 and meta is not None:  # a keyed record: keep its key if the row still has it
            try:
                with src.begin(db=meta) as txn:
                    row = txn.get(kb)
                    user_key = None if row is None else codec.meta_key(row)
            except lmdb.Error:
                user_key = None
            if user_key is not None and digest(user_key)[0] != kb:
                user_key = None  # a damaged row: the record is kept, its key is not known
        batch.append((kb, rec, user_key))
        fps.add(codec.unpack_head(rec, 0)[2])
        copied += 1
        if len(batch) >= 256:
            commit()
    if batch:
        commit()
    # What the tree no longer reaches (a zeroed branch page, a truncated file): records in
    # intact leaf pages, bound to their index by their keyed checksum, whose fingerprint
    # the cache still knows (others could never be served).
    _emit({"raw": True})
    with out.begin(db=o_info) as otxn:
        fp_rows = {bytes(k): bytes(v) for k, v in otxn.cursor() if bytes(k).startswith(b"fp:")}
        have = {bytes(k) for k, _ in otxn.cursor(db=o_samples)}
    known_fp = dict(fp_rows)
    extra = _from_raw_pages(path, have, fp_rows)
    ids = set()
    for v in fp_rows.values():
        try:
            ids.add(json.loads(v)["id"])
        except (ValueError, KeyError, TypeError):
            pass
    with out.begin(write=True, db=o_info) as otxn:
        for k, v in fp_rows.items():
            if k not in known_fp:
                otxn.put(k, v)
        for kb, rec in sorted(extra.items()):
            if codec.unpack_head(rec, 0)[2] in ids:
                batch.append((kb, rec, None))
                copied += 1
        # never hand out an id that a copied record carries (it would serve another
        # source's sample): the next fingerprint id is past every one seen
        seen = max(ids | fps | {codec.unpack_head(rec, 0)[2] for _k, rec, _u in batch}, default=0)
        nxt = otxn.get(b"fp_next")
        try:
            nxt = int(nxt) if nxt is not None else 0
        except ValueError:
            nxt = 0
        otxn.put(b"fp_next", str(max(nxt, seen + 1)).encode())
    if batch:
        commit()
    with out.begin(write=True, db=o_info) as otxn:
        Rows(otxn, o_samples, o_meta, o_info).save()  # a tally even when nothing was copied
        otxn.put(b"last_written", json.dumps(time.time()).encode())
        if otxn.get(b"format") is None:  # the info rows were lost: still a cache of this format
            otxn.put(b"format", json.dumps({"format": "kvcache", "version": FORMAT_VERSION,
                                            "codec": codec.CODEC_VERSION, "created": time.time()}).encode())
    out.sync(True)
    out.close()
    src.close()
    return {"copied": copied}


def _raw_leaves(path: str) -> Any:
    """Every ``(key, value)`` of every leaf page in ``path/data.mdb`` that is in its own
    place (it carries its own page number) and well-formed, read with plain reads (no map):
    what a damaged tree (a zeroed branch, a truncated file whose newest root is past the
    cut) no longer reaches. Old versions of pages LMDB freed are found too: callers keep
    only what proves itself (a keyed record's checksum is seeded with its index)."""
    import struct

    with open(os.path.join(path, "data.mdb"), "rb") as f:
        head = f.read(4096)
        psize = struct.unpack_from("<I", head, 16 + 24)[0] if len(head) >= 64 else 4096
        if psize not in (4096, 8192, 16384, 32768, 65536):
            psize = 4096
        size = os.fstat(f.fileno()).st_size
        for pgno in range(2, size // psize):
            f.seek(pgno * psize)
            buf = f.read(psize)
            pg, _pad, flags, lower, upper = struct.unpack_from("<QHHHH", buf, 0)
            if pg != pgno or flags & ~0x10 != 0x02 or lower & 1 or not 16 <= lower <= upper <= psize:
                continue
            for ptr in struct.unpack_from(f"<{(lower - 16) // 2}H", buf, 16):
                if not upper <= ptr <= psize - 8:
                    break
                lo, hi, nflags, ksize = struct.unpack_from("<HHHH", buf, ptr)
                kend, dsize = ptr + 8 + ksize, lo | hi << 16
                if nflags == 0 and kend + dsize <= psize:
                    yield bytes(buf[ptr + 8:kend]), bytes(buf[kend:kend + dsize])
                elif nflags == 1 and kend + 8 <= psize and dsize < 1 << 31:
                    opg = struct.unpack_from("<Q", buf, kend)[0]
                    if 2 <= opg and opg * psize + 16 + dsize <= size:
                        f.seek(opg * psize + 16)
                        yield bytes(buf[ptr + 8:kend]), f.read(dsize)
            f.seek(0)


def _from_raw_pages(path: str, have: set[bytes], fp_rows: dict[bytes, Any]) -> dict[bytes, bytes]:
    """Keyed records (and fingerprint rows missing from ``fp_rows``) found in leaf pages
    that the tree no longer reaches; for each index, a record of the newest fingerprint."""
    found: dict[bytes, tuple[int, bytes]] = {}
    for k, v in _raw_leaves(path):
        if k.startswith(b"fp:") and k not in fp_rows:
            try:
                row = json.loads(v)
            except ValueError:
                continue
            if isinstance(row, dict) and type(row.get("id")) is int:
                fp_rows[k] = v
        elif len(k) == KEY.size and k not in have and len(v) >= 24:
            h, _cs, fp, _ll = codec.unpack_head(v, 0)
            if h == codec.HEAD_KEYED and fp >= found.get(k, (-1, b""))[0] \
                    and _check_record(v, None, codec.seed_of(k)) is None:
                found[k] = (fp, v)
    return {k: v for k, (_fp, v) in found.items()}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "--salvage":
        skip = set(json.loads(argv[3])) if len(argv) > 3 else set()
        skip_walks = set(json.loads(argv[4])) if len(argv) > 4 else set()
        _emit({"result": salvage(argv[0], argv[2], skip, skip_walks)})
    else:
        _emit({"result": scan(argv[0])})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
