"""``inspect_cache``: what a cache holds, read from its info and metadata rows only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from .. import codec
from ..view import CacheInfo, CacheView
from ._common import check_cache, live_bytes

__all__ = ["InspectReport", "LeafSummary", "inspect_cache"]


@dataclass(frozen=True)
class LeafSummary:
    """One leaf of one distinct layout: ``image: uint8[3,32,32] x 50000``."""

    path: str
    summary: str
    count: int

    def __str__(self) -> str:
        return f"{self.path}: {self.summary} x {self.count}"


@dataclass(frozen=True)
class InspectReport(CacheInfo):
    """:class:`kvcache.CacheInfo` (``total_bytes`` is the logical size: the sum of record
    sizes; ``file_bytes`` what the environment uses) and what the tally and LMDB tell."""

    current_entries: int = 0  # records of the current fingerprint
    stale_entries: int = 0  # records of other fingerprints (``kvcache gc`` drops them)
    live_bytes: int = 0  # about what a compacted copy would take
    disk_bytes: int = 0  # data.mdb's length on disk
    map_used: float = 0.0  # file_bytes / map_size
    readers_used: int = 0
    max_readers: int = 0
    leaves: list[LeafSummary] = field(default_factory=list)
    layouts: int = 0  # distinct layouts among current records (the first MAX_LAYOUTS)
    other_layout_entries: int = 0  # current records of layouts past the first MAX_LAYOUTS
    filesystem: str | None = None  # e.g. "nfs4: server:/export on /mnt/data"
    network: str | None = None  # "network" / "FUSE" where kvcache reads it lock-free, never writes
    published: dict | None = None  # the ``published`` info row (when, from where) of a published cache
    lockfree: bool = False  # opened read-only without LMDB's lock (published, or on a network fs)
    # Sizes, from the first SAMPLED records (their headers and segment tables only):
    sampled_records: int = 0
    compression: dict[str, int] = field(default_factory=dict)  # codec -> sampled records using it
    payload_bytes: float = 0.0  # mean record bytes uncompressed (header, layout, npy blobs, scalars)
    stored_bytes: float = 0.0  # mean record bytes as stored (compressed where it shrank)
    page_bytes: float = 0.0  # mean bytes LMDB takes for it (records over ~2 KiB fill whole pages)
    ratio: float = 1.0  # payload_bytes / stored_bytes
    disk_ratio: float = 1.0  # payload_bytes / page_bytes: what compression saves on disk


SAMPLED = 2000


def inspect_cache(path: str | os.PathLike) -> InspectReport:
    """Describe the cache at ``path`` without decoding any record.

    Reads the info rows only: the counts, sizes and layouts come from the cache's tally
    of metadata rows (:mod:`kvcache.tally`), kept by every writer. A cache written
    before the tally existed has its metadata rows walked instead (a few bytes each).

    Raises:
        NotACacheError, IncompatibleCacheError, CacheCorruptError.
    """
    path = check_cache(path)
    with CacheView(path) as view:
        info = view.info()
        store = view.store
        e = store.handle()
        cur = store.tally().get(info.fingerprint["id"] if info.fingerprint else None)
        leaves: list[LeafSummary] = []
        for lay, n in sorted(cur.layouts.items(), key=lambda kv: -kv[1]):
            try:
                described = codec.describe_layout(lay)
            except codec.CorruptRecordError:
                leaves.append(LeafSummary("?", "malformed layout", n))
                continue
            for leaf in described:
                leaves.append(LeafSummary(_short(leaf.path), leaf.summary(), n))
        # a lock-free environment has no reader table (and no other reader is visible)
        readers = [ln for ln in e.env.readers().splitlines()[1:] if ln.strip()] if e.lock else []
        sizes = _sizes(e)
        return InspectReport(
            **{f.name: getattr(info, f.name) for f in fields(CacheInfo)},
            current_entries=cur.rows, stale_entries=info.entries - cur.rows,
            live_bytes=live_bytes(e.env), disk_bytes=os.path.getsize(os.path.join(path, "data.mdb")),
            map_used=info.file_bytes / info.map_size if info.map_size else 0.0,
            readers_used=len(readers), max_readers=e.env.max_readers(), leaves=leaves,
            layouts=len(cur.layouts), other_layout_entries=cur.other,
            filesystem=e.fs.describe() if e.fs else None, network=e.fs.network if e.fs else None,
            published=e.published, lockfree=e.lockfree, **sizes,
        )


def _on_disk(key_len: int, nbytes: int, psize: int) -> int:
    """The bytes LMDB gives one record: a node in a shared leaf page, or whole overflow
    pages (a page header, then the value) once the node exceeds the leaf's node maximum."""
    nodemax = (((psize - 16) // 2) & ~1) - 2  # mdb.c: me_nodemax for MDB_MINKEYS = 2
    node = 8 + key_len + nbytes
    if node + 2 <= nodemax:
        return node + 2  # and its slot in the page's index
    return -(-(16 + nbytes) // psize) * psize


def _sizes(e: Any) -> dict[str, Any]:
    """Stored, uncompressed and on-disk bytes of the first SAMPLED records."""
    n = stored = plain = pages = 0
    codecs: dict[str, int] = {}
    psize = e.env.stat()["psize"]
    with e.env.begin(db=e.samples, buffers=True) as txn:
        for k, v in txn.cursor():
            if n >= SAMPLED:
                break
            try:
                s, p = codec.record_sizes(v)
                used = codec.record_codecs(v)
            except codec.CorruptRecordError:
                continue  # verify's business
            n += 1
            stored, plain, pages = stored + s, plain + p, pages + _on_disk(len(k), s, psize)
            for c in used:
                codecs[c] = codecs.get(c, 0) + 1
    if not n:
        return {}
    return dict(sampled_records=n, compression=codecs, payload_bytes=plain / n, stored_bytes=stored / n,
                page_bytes=pages / n, ratio=plain / stored, disk_ratio=plain / pages)


def _short(path: str) -> str:
    """``sample['image']`` -> ``image``; ``sample[0]`` -> ``[0]``; ``sample`` stays."""
    if path == "sample":
        return path
    p = path.removeprefix("sample")
    if p.startswith("['") and p.endswith("']") and p.count("[") == 1:
        return p[2:-2]
    return p

