"""The miss path: a sample that is not in the cache is computed and buffered for writing.

:class:`Computing` owns ``_compute``, what the read path (:mod:`kvcache.reader`) calls for
a miss: a record computed earlier and not committed yet is served from the write buffer;
otherwise the source computes the sample, which is encoded (:mod:`kvcache.codec`) and
handed to the dataset's :class:`kvcache.writeback.Writer`, unless misses are not stored
(a read-only, published or network cache; write-back stopped after a failure) or the
record is over ``max_sample_bytes``: the sample is then served uncached.
"""

from __future__ import annotations

import time
from typing import Any

from . import codec
from .errors import KvCacheError, MissingSampleError, SampleTooLargeError
from .keys import duplicate

__all__ = ["Computing"]

_decode = codec.decode
_monotonic = time.monotonic


class Computing:
    """The miss half of :class:`kvcache.LmdbCachedDataset` (a base class, not used alone).

    It uses the dataset's ``path``, ``source``, ``compression``, ``max_sample_bytes``,
    ``_writer``, ``_stats``, ``_store``, ``_fp_id``, ``_unstored``, ``_next_check``, and
    calls ``_check_file()`` and ``_warn_once()``.
    """

    __slots__ = ()

    def _compute(self, i: int, wkey: Any = None, seed: int | None = None, kb: bytes | None = None) -> Any:
        """A miss: compute from the source (or a pending write) and buffer the record.
        ``wkey``, ``seed``, ``kb``: a keyed record's LMDB key, checksum seed and key."""
        w = self._writer
        if wkey is None:
            wkey = seed = i
        pending = w.pending(wkey)
        if pending is not None:  # computed earlier, not committed yet: a hit all the same
            owner = w.owner(wkey)
            if owner is not None and owner != i:
                raise duplicate(self.path, owner, i, kb or b"b")
            self._stats.hits += 1
            return _decode(pending, False)
        if self.source is None:
            raise MissingSampleError(
                f"{self.path}: index {i} is not in the cache and there is no source to compute it "
                "(open with the source dataset to fill it)"
            )
        if self._next_check <= _monotonic():
            self._check_file()
        sample = self.source[i]
        self._stats.misses += 1
        if w.disabled or self._fp_id is None or self._store.readonly:
            if self._unstored is not None:
                self._warn_once("unstored", f"kvcache: {self._unstored}")
            elif w.failed:  # write-back stopped for good after a write failure: count it
                self._stats.write_errors += 1
            return sample
        try:
            record, meta = codec.encode_with_meta(sample, self._fp_id, seed, self.compression,
                                                  key=kb)  # type: ignore[arg-type]
        except KvCacheError as exc:
            raise type(exc)(f"index {i}: {exc}") from None
        if len(record) > self.max_sample_bytes:
            self._stats.too_large += 1
            self._warn_once("too_large", str(SampleTooLargeError(
                f"kvcache: sample {i} encodes to {len(record)} bytes, over max_sample_bytes="
                f"{self.max_sample_bytes}; such samples are served uncached")))
            return sample
        w.add(wkey, record, meta, None if kb is None else i)
        return sample
