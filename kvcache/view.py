"""``open_cache(path)``: a read-only view of a cache for tools and scripts."""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any

import lmdb

from . import catalog, codec
from .errors import CorruptRecordError, MissingSampleError
from .store import KEY, Store, translate

__all__ = ["CacheInfo", "CacheView", "open_cache"]


@dataclass(frozen=True)
class CacheInfo:
    """What a cache says about itself."""

    path: str
    format_version: int
    codec_version: int
    fingerprint: dict[str, Any] | None  # {"id", "digest", "parts"} of the current source
    fingerprints: dict[int, dict[str, Any]] = field(default_factory=dict)
    entries: int = 0
    total_bytes: int = 0  # sum of record sizes
    file_bytes: int = 0  # (last page + 1) * page size: what the environment uses
    map_size: int = 0
    source_length: int | None = None
    created: float | None = None
    last_written: float | None = None


class CacheView(Mapping):
    """Read-only access to a cache: a ``Mapping`` from index to sample, plus ``info()``.

    Only records of the current fingerprint count: ``view[i]`` decodes (and, with
    ``verify``, checks) the sample at ``i``, and raises :class:`MissingSampleError` (a
    ``KeyError``) where there is none; ``view.get(i, default)``, ``i in view``,
    ``len(view)`` (read from the cache's tally, not by walking it), ``keys()``,
    ``items()`` and ``values()`` behave as they do on a ``dict``. Iteration is in
    ascending index order, over the indices cached when it starts. The raw record bytes
    are :meth:`record`.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.store = Store(path, readonly=True, create=False)
        self.path = self.store.path
        self.verify = verify
        self.store.handle()

    def _fp(self) -> int | None:
        cur = catalog.current(self.store)
        return cur["id"] if cur else None

    def info(self) -> CacheInfo:
        s = self.store
        e = s.handle()
        items = s.info_items()
        fmt = items.get("format")
        fmt = fmt if isinstance(fmt, dict) else {}
        cur = catalog.current(s)  # CacheCorruptError when damaged
        fps = catalog.fingerprints(s)
        try:
            with s.begin(e.samples) as txn:
                entries = txn.stat(e.samples)["entries"]
        except lmdb.Error as exc:
            raise translate(exc, self.path) from None
        envinfo = e.env.info()
        fp = None
        if cur:
            fp = {"id": cur["id"], "digest": cur["digest"], "parts": fps.get(cur["id"], {}).get("parts")}
        return CacheInfo(
            path=self.path, format_version=fmt.get("version"), codec_version=fmt.get("codec"),
            fingerprint=fp, fingerprints=fps, entries=entries, total_bytes=s.tally().bytes,
            file_bytes=s.used_bytes(), map_size=max(envinfo["map_size"], int(items.get("map_size") or 0)),
            source_length=cur.get("length") if cur else None, created=fmt.get("created"),
            last_written=items.get("last_written") if isinstance(items.get("last_written"), float) else None,
        )

    def _indices(self) -> list[int]:
        """Cached indices of the current fingerprint, ascending (one walk of the rows)."""
        return self.store.indices_of(self._fp())

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return self.store.count(self._fp())

    def __contains__(self, index: object) -> bool:
        index = _as_index(index)
        if index is None:
            return False
        fp, e = self._fp(), self.store.handle()
        with self.store.begin(e.meta) as txn:
            try:
                row = txn.get(KEY.pack(index))
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None
            return row is not None and codec.meta_fp(row) == fp

    def __getitem__(self, index: int) -> Any:
        """The sample at ``index``.

        Raises:
            MissingSampleError: not cached (or cached by another fingerprint); a KeyError.
            CorruptRecordError: the record fails its checksum.
        """
        i = _as_index(index)
        if i is None:
            raise MissingSampleError(f"{self.path}: {index!r} is not an index of the cache")
        index = i
        fp = self._fp()
        try:
            with self.store.begin() as txn:
                # decoded from LMDB's memory, so a damaged size is caught by the length
                # check before any byte past the record is touched (see kvcache.codec)
                raw = self._get(txn, index)
                return codec.decode(raw, self.verify, fp, index)
        except codec.StaleRecord:
            raise MissingSampleError(f"{self.path}: index {index} was cached by another source") from None
        except CorruptRecordError as exc:
            raise CorruptRecordError(
                f"{self.path}: record {index} is corrupt ({exc}); run `kvcache verify --repair {self.path}`"
            ) from None

    def record(self, index: int) -> bytes:
        """The raw record bytes at ``index`` (of whichever fingerprint wrote it, unchecked
        but for its length).

        Raises:
            MissingSampleError: no record there.
            CorruptRecordError: the record's length does not match its own header and
                layout (it is not copied: a damaged size could run past the file).
        """
        i = _as_index(index)
        if i is None:
            raise MissingSampleError(f"{self.path}: {index!r} is not an index of the cache")
        index = i
        with self.store.begin() as txn:
            raw = self._get(txn, index)
            codec.decode(raw, False)  # the length check: never copy past the record's end
            return bytes(raw)

    def _get(self, txn: object, index: int) -> object:
        try:
            raw = txn.get(KEY.pack(index))  # type: ignore[attr-defined]
        except lmdb.Error as exc:
            raise translate(exc, self.path) from None
        except (OverflowError, TypeError):
            raise MissingSampleError(f"{self.path}: index {index!r} is not in the cache") from None
        if raw is None:
            raise MissingSampleError(f"{self.path}: index {index} is not in the cache")
        return raw

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "CacheView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CacheView({self.path!r})"


def _as_index(x: object) -> int | None:
    """``x`` as a key of the cache (an int in 0..2**64-1, as a dict would take it), or None."""
    try:
        i = operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        return None
    return i if 0 <= i < 1 << 64 else None


def open_cache(path: str | os.PathLike, *, verify: bool = True) -> CacheView:
    """Open the cache at ``path`` read-only.

    Raises:
        NotACacheError: nothing there, or not a kvcache cache.
        IncompatibleCacheError: another format version.
    """
    return CacheView(path, verify=verify)
