"""``merge``: combine caches of one source (built on several machines or ranks) into one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import catalog, codec
from ..errors import CorruptRecordError, StaleCacheError
from ..fingerprint import diff_parts
from ..keys import digest
from ..store import KEY, Store
from ..view import CacheView
from ._common import check_cache

__all__ = ["MergeReport", "merge"]

BATCH = 512


@dataclass
class MergeReport:
    dest: str
    sources: list[str]
    copied: int = 0  # records written into dest
    already_present: int = 0  # keys dest already held (first writer wins)
    # source -> records failing their checksum: indices, or a keyed cache's LMDB keys in hex
    bad: dict[str, list[int | str]] = field(default_factory=dict)
    entries: int = 0  # current records in dest afterwards

    @property
    def ok(self) -> bool:
        return not any(self.bad.values())


def merge(dest: str | os.PathLike, srcs: list[str | os.PathLike]) -> MergeReport:
    """Copy every good record of the current fingerprint of each cache in ``srcs`` into ``dest``.

    All caches (and ``dest`` if it exists) must have the same fingerprint digest. A key
    already in ``dest`` is kept (first writer wins); a record that fails its checksum
    in a source is skipped and listed in ``bad``.

    Raises:
        StaleCacheError: the fingerprints differ; the message names the parts.
        NotACacheError: a source is not a cache, or has no current fingerprint.
    """
    srcs = [check_cache(s) for s in srcs]
    dest = os.path.abspath(os.fspath(dest))
    fps = []
    for s in srcs:
        with CacheView(s, verify=False) as v:
            info = v.info()
        if info.fingerprint is None:
            raise StaleCacheError(f"{s} has no current fingerprint (never written); nothing to merge")
        fps.append((s, info.fingerprint, info.source_length))
    first, fp0, length = fps[0]
    _same(first, fp0, fps[1:])
    rep = MergeReport(dest=dest, sources=srcs)
    with Store(dest, create=True) as store:
        cur = catalog.current(store)
        if cur is not None and cur["digest"] != fp0["digest"]:
            old = (catalog.fingerprints(store).get(cur["id"]) or {}).get("parts") or {}
            raise StaleCacheError(
                f"cannot merge into {dest}: it holds another source; differs from {first}: "
                f"{'; '.join(diff_parts(old, fp0['parts'] or {})) or 'fingerprint digest'}")
        fp_id = catalog.resolve(store, fp0["parts"], length, "error").fp_id
        assert fp_id is not None
        for s, fp, _len in fps:
            bad = rep.bad.setdefault(s, [])
            with CacheView(s, verify=False) as v:
                e = v.store.handle()
                rows: list[tuple[bytes, bytes, bytes]] = []
                with v.store.begin(e.samples) as txn:
                    for k, raw in txn.cursor():
                        lk = bytes(k)
                        # an index (8-byte key) or a keyed cache's digest (16 bytes)
                        name = KEY.unpack(lk)[0] if len(lk) == KEY.size else lk.hex()
                        seed = codec.seed_of(lk)
                        try:
                            if codec.read_header(raw)[0] != fp["id"]:
                                continue
                            if not codec.checksum_ok(raw, seed):
                                raise CorruptRecordError("checksum mismatch")
                            rec = codec.with_fp(raw, fp_id, seed)
                            row = txn.get(lk, db=e.meta) if len(lk) != KEY.size else None
                            user_key = None if row is None else codec.meta_key(row)
                            if user_key is not None and digest(user_key)[0] != lk:
                                user_key = None  # a damaged row: the sample is right, its key unknown
                            meta = codec.meta_row_of(rec, user_key)
                        except CorruptRecordError:
                            bad.append(name)
                            continue
                        rows.append((lk, rec, meta))
                        if len(rows) >= BATCH:
                            _write(store, rows, fp_id, rep)
                _write(store, rows, fp_id, rep)
        rep.entries = store.count(fp_id)
    return rep


def _write(store: Store, rows: list, fp_id: int, rep: MergeReport) -> None:
    if rows:
        n = store.write_records(rows, fp_id)
        rep.copied += n
        rep.already_present += len(rows) - n
        rows.clear()


def _same(first: str, fp0: dict, others: list) -> None:
    for s, fp, _len in others:
        if fp["digest"] != fp0["digest"]:
            parts = diff_parts(fp0.get("parts") or {}, fp.get("parts") or {})
            raise StaleCacheError(
                f"cannot merge {s} with {first}: different sources; "
                f"{'; '.join(parts) or 'fingerprint digest'}")
