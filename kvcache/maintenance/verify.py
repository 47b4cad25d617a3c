"""``verify``: check every record of a cache in a child process, and optionally repair it."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

import lmdb

from .. import structure
from ..compression import MissingCodecError
from ..errors import CacheCorruptError, KvCacheError, NotACacheError
from ..progress import Progress, progress_for
from ..pubrecord import file_digest, publish_record
from ..store import KEY, Rows, Store, count_rows
from ..tally import TALLY_KEY, Tally
from ._common import exclusive, open_raw
from .salvage import run_child, salvage
from .spec import load_key, load_spec

__all__ = ["VerifyReport", "scan", "verify"]

@dataclass
class VerifyReport:
    """What ``verify`` found.

    ``bad``, ``orphans``, ``errors`` and ``signal`` describe the first scan. With
    ``repair=True``, ``repaired`` says whether the cache was changed, and ``ok`` is the
    verdict of the scan run after the repair (``after`` holds it).
    """

    path: str
    ok: bool
    checked: int = 0
    entries: int = 0
    # records are named by index, or in a keyed cache by the hex of their 16-byte LMDB key
    bad: list[int | str] = field(default_factory=list)  # checksum, decoding or metadata mismatch
    reasons: dict[str, str] = field(default_factory=dict)  # index -> why it is bad
    orphans: list[int | str] = field(default_factory=list)  # a record without its metadata row or the reverse
    errors: list[str] = field(default_factory=list)  # structural problems
    signal: str | None = None  # the signal that killed the scan, e.g. "SIGBUS"
    repaired: bool = False
    removed: int = 0  # records and rows deleted by the repair
    salvaged: int | None = None  # records copied into a fresh file when the file was broken
    spot_checked: int = 0
    spot_mismatches: list[int] = field(default_factory=list)
    spot_repaired: int = 0  # mismatched records replaced by the recomputed ones (--repair)
    # the stored count of rows per fingerprint (len(open_cache), inspect) agrees with the
    # rows; not part of ``ok`` (no sample is wrong), and ``repair`` recounts it
    tally_ok: bool = True
    # a published cache: "matches" when data.mdb is, byte for byte (a full-file digest),
    # the version its publish record names; "differs" when it changed after publishing
    # (an error); None without a record
    published_record: str | None = None
    after: VerifyReport | None = None


def _signame(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def scan(path: str, progress: Progress | None = None, stamp: bool = False) -> VerifyReport:
    """Check every record of the cache at ``path`` in a child process (no repair, no
    spot check): what :func:`verify` does first, and what compact and publish run on
    their copies before swapping or publishing them. With ``stamp`` (a cache kvcache
    itself just rewrote, never a published one), a clean result stamps the version of
    the file its structural walk saw, so the next opener does not walk it again."""
    state: dict[str, Any] = {"result": None, "done": 0}

    def on_line(msg: dict) -> None:
        if "total" in msg and progress is not None:
            progress.start(msg["total"])
        elif "done" in msg:
            if progress is not None:
                progress.update(msg["done"] - state["done"])
            state["done"] = msg["done"]
        elif "result" in msg:
            state["result"] = msg["result"]

    rc, err = run_child([path], on_line)
    if progress is not None:
        progress.finish()
    rep = VerifyReport(path=path, ok=False)
    res = state["result"]
    if rc < 0 or res is None:
        rep.checked = state["done"]
        if rc < 0:
            rep.signal = _signame(rc)
            rep.errors.append(f"the scan was killed by {rep.signal} after about {state['done']} records: "
                              "the file is damaged (a broken page, or truncated)")
        else:
            last = (err.strip().splitlines() or ["no output"])[-1]
            rep.errors.append(f"the scan failed: {last}")
        return rep
    if res.get("missing_codec"):  # never reported (nor repaired) as damage
        raise MissingCodecError(res["missing_codec"])
    if res["not_a_cache"]:
        raise NotACacheError(f"{path} is not a kvcache cache ({'; '.join(res['errors']) or 'no info table'})")
    rep.checked, rep.entries = res["checked"], res["entries"]
    rep.bad, rep.reasons, rep.orphans, rep.errors = res["bad"], res["reasons"], res["orphans"], res["errors"]
    walked = None
    try:  # what opening checks first (it reads with pread: no signal can reach this process)
        before = structure.identity(path)
        txnid = structure.validate(path)
        if before is not None and txnid is not None and structure.identity(path) == before:
            walked = (before, txnid)
    except CacheCorruptError as exc:
        rep.errors.append(f"structure: {exc}")
    rep.ok = not (rep.bad or rep.orphans or rep.errors)
    if stamp and rep.ok:
        structure.remember(path, walked)
    return rep


def _check_record(rep: VerifyReport, path: str) -> None:
    """A published copy: is ``data.mdb`` still the version ``publish`` validated?"""
    rec = publish_record(path)
    if rec is None:
        return
    try:
        same = file_digest(path) == rec.get("file_xxh3")
    except OSError as exc:
        rep.errors.append(f"data.mdb cannot be read whole ({exc})")
        same = False
    rep.published_record = "matches" if same else "differs"
    if not same:
        rep.ok = False
        rep.errors.append(
            "data.mdb changed after it was published (its digest differs from kvcache.published): "
            "readers trust the published version's structure, so replace this copy "
            f"(`kvcache publish --force SRC {path}`, or copy it again)")


def _check_tally(rep: VerifyReport) -> None:
    """After a clean scan (the child walked every page, so reading here is safe): whether
    the stored tally (kvcache.tally) says what the metadata rows hold. A cache without one,
    or whose total differs from the rows, is fine: readers walk the rows there."""
    if not rep.ok:
        return
    with Store(rep.path, readonly=True, create=False) as store:  # this process's env if open
        e = store.handle()
        with store.begin(e.info) as txn:
            stored = Tally.from_json(txn.get(TALLY_KEY))
            if stored is not None and stored.rows == txn.stat(e.meta)["entries"]:
                rep.tally_ok = stored.agrees_with(count_rows(txn, e.meta))


def _spot_check(rep: VerifyReport, path: str, source_spec: str, n: int, repair: bool,
                key: str | None = None) -> None:
    """Recompute ``n`` cached samples with :func:`kvcache.integrity.spot_check`."""
    from ..dataset import LmdbCachedDataset  # torch lives there; keep this module light
    from ..integrity import spot_check

    source = load_spec(source_spec)
    keyfn = None if key is None else load_key(key, source)
    # on_stale="error": a source of another fingerprint is refused, naming what differs
    with LmdbCachedDataset(source, path, on_stale="error", readonly=not repair,
                           lru_bytes=0, key=keyfn) as ds:
        sc = spot_check(ds, n, repair=repair)
    rep.spot_checked, rep.spot_mismatches, rep.spot_repaired = sc.checked, sc.mismatched, sc.repaired
    if sc.mismatched:
        rep.ok = False


def _remove(path: str, indices: list[int | str], recount: bool = False) -> int:
    """Delete ``indices`` in one transaction (and recount the tally with ``recount``).

    Raises:
        CacheCorruptError: LMDB met a damaged page (nothing was deleted).
    """
    env = open_raw(path, write=True)
    try:
        dbs = [env.open_db(name, create=False) for name in (b"samples", b"meta", b"info")]
        n = 0
        with env.begin(write=True) as txn:
            rows = Rows(txn, *dbs, recount=recount)  # keeps the tally of metadata rows
            for i in indices:
                n += sum(rows.delete(bytes.fromhex(i) if isinstance(i, str) else KEY.pack(i)))
            rows.save()
        return n
    except lmdb.Error as exc:
        raise CacheCorruptError(f"{path}: cannot delete the bad records ({exc})") from None
    finally:
        env.close()


def verify(path: str | os.PathLike, *, repair: bool = False, spot_check: int = 0,
           source: str | None = None, key: str | None = None, progress: Any = False) -> VerifyReport:
    """Check every record of the cache at ``path`` in a child process.

    The child walks every database and checks each record's checksum, that it decodes,
    and that its metadata row agrees with it. A child killed by a signal (a truncated or
    broken file makes LMDB raise SIGBUS or abort) is reported in ``signal``, not raised.

    Args:
        repair: remove bad records and orphan rows; when the file itself is broken, copy
            every readable good record into a fresh file and swap it in. Needs the cache
            to itself (takes ``kvcache.lock`` exclusively); verifies again afterwards.
        spot_check: recompute this many random cached samples from ``source`` (a
            ``module:callable`` spec) and compare checksums with
            :func:`kvcache.integrity.spot_check`: catches a changed source. With
            ``repair``, each mismatched record is replaced by the recomputed one.
        key: a keyed cache's key function for the spot check: the source's attribute of
            that name, or a ``module:callable`` returning it (:func:`load_key`).
        progress: True for a progress line on stderr, or a callable ``(done, total)``.

    Raises:
        NotACacheError: nothing there, or not a kvcache cache.
        CacheBusyError: ``repair`` while another process has the cache open.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "data.mdb")):
        raise NotACacheError(f"{path}: no cache there (no data.mdb)")
    if spot_check and not source:
        raise ValueError("spot_check needs source= (a module:callable spec)")
    rep = scan(path, progress_for(progress, "verify"))
    _check_tally(rep)
    _check_record(rep, path)
    if rep.ok and spot_check:
        _spot_check(rep, path, source, spot_check, repair, key)  # type: ignore[arg-type]
    if not repair or (rep.ok and rep.tally_ok):
        return rep
    if rep.spot_mismatches:  # the spot check replaced them; the scan below checks the result
        rep.repaired = bool(rep.spot_repaired)
    else:
        with exclusive(path, "repair"):
            removed = None
            if not (rep.signal or rep.errors):
                try:
                    removed = _remove(path, list(set(rep.bad) | set(rep.orphans)),
                                      recount=not rep.tally_ok)
                except KvCacheError:  # deleting met a broken page: copy what is good instead
                    removed = None
            if removed is None:
                rep.salvaged = salvage(path)
                rep.removed = max(rep.entries - rep.salvaged, 0)
            else:
                rep.removed = removed
            rep.repaired = True
    rep.after = scan(path, stamp=rep.repaired)  # rewritten by kvcache: stamp what the scan walked
    _check_tally(rep.after)
    rep.ok = rep.after.ok and rep.spot_repaired == len(rep.spot_mismatches)
    return rep
