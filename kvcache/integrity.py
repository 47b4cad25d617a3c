"""Spot checks: recompute a few cached samples from the source and compare.

The fingerprint catches a source whose class, length or ``version=`` changed. It cannot
see a source whose code stayed the same while its output changed (new files on disk, a
changed transform config read at run time). A spot check recomputes ``n`` random cached
samples, encodes them exactly as write-back would, and compares the encoded checksum
with the cached record's: any difference means the cache no longer holds what the
source produces.

What happens to a mismatched row is the caller's choice (``repair``):
``LmdbCachedDataset(spot_check=N)`` repairs, replacing each mismatched record with the
freshly computed one (and warns once, suggesting a ``version=`` bump, since the rest of
the cache is probably stale too); ``kvcache verify --spot-check`` only reports unless
``--repair`` is given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .errors import KvCacheError

__all__ = ["SpotCheckReport", "spot_check"]


@dataclass(frozen=True)
class SpotCheckReport:
    """What a spot check found.

    ``checked`` cached samples were recomputed; ``mismatched`` lists (ascending) the
    indices whose cached record differs from what the source produces now, including
    records that could not be read at all. ``repaired`` counts the records replaced.
    """

    checked: int
    mismatched: list[int] = field(default_factory=list)
    repaired: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatched


def spot_check(dataset: Any, n: int, rng: random.Random | None = None, *,
               repair: bool = False) -> SpotCheckReport:
    """Recompute ``n`` random cached samples of ``dataset`` and compare checksums.

    Args:
        dataset: an ``LmdbCachedDataset`` with a source.
        n: how many cached samples to recompute (fewer when fewer are cached).
        rng: the random generator choosing the indices (``random.Random(seed)`` for a
            reproducible choice).
        repair: replace each mismatched record with the recomputed one (needs a
            writable cache; on a read-only one nothing is replaced).

    Raises:
        ValueError: the dataset has no source to recompute from.
    """
    if dataset.source is None:
        raise ValueError(f"{dataset.path}: a spot check needs the source dataset")
    fp_id = dataset.fingerprint_id  # opens the cache in this process if needed
    if fp_id is None or n <= 0:
        return SpotCheckReport(0, [])
    store = dataset.store
    chosen = dataset.random_cached(n, rng)
    fresh: dict[bytes, tuple[bytes, bytes]] = {}
    mismatched: list[int] = []
    for i in chosen:
        lk, seed, kb = dataset.storage_key(i)  # the index, or a keyed cache's key of it
        record, meta = codec.encode_with_meta(dataset.source[i], fp_id, seed, key=kb)
        with store.begin() as txn:
            raw = txn.get(lk)
            # the same fingerprint, layout and payload (a record written before records were
            # KEYED differs only in its flags and checksum)
            same = raw is not None and codec.checksum_ok(raw, seed) and raw[16:] == record[16:]
        if same:
            continue
        mismatched.append(i)
        fresh[lk] = (record, meta)
    repaired = 0
    if repair and fresh and store.writable:
        try:
            store.delete_keys(fresh)  # write_records keeps a valid record of the same fp
            repaired = store.write_records(((k, r, m) for k, (r, m) in fresh.items()), fp_id)
        except KvCacheError:
            repaired = 0  # a cache that cannot be written still gets its report
    return SpotCheckReport(len(chosen), sorted(mismatched), repaired)
