"""``open_cache(path)``: a read-only view of a cache for tools and scripts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import catalog, codec
from .errors import CorruptRecordError, MissingSampleError
from .store import KEY, META_ROW, Store

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


class CacheView:
    """Read-only access to a cache: ``info()``, ``keys()``, ``get(index)``.

    Records of the current fingerprint are served; ``get`` verifies checksums.
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
        fmt = items.get("format") or {}
        cur = items.get("current")
        fps = catalog.fingerprints(s)
        with s.begin(e.samples) as txn:
            entries = txn.stat(e.samples)["entries"]
        total = 0
        with s.begin(e.meta) as txn:
            for _k, v in txn.cursor():
                if len(v) >= META_ROW.size:
                    total += META_ROW.unpack_from(v, 0)[2]
        envinfo = e.env.info()
        fp = None
        if cur:
            fp = {"id": cur["id"], "digest": cur["digest"], "parts": fps.get(cur["id"], {}).get("parts")}
        return CacheInfo(
            path=self.path, format_version=fmt.get("version"), codec_version=fmt.get("codec"),
            fingerprint=fp, fingerprints=fps, entries=entries, total_bytes=total,
            file_bytes=(envinfo["last_pgno"] + 1) * e.env.stat()["psize"], map_size=max(envinfo["map_size"], int(items.get("map_size") or 0)),
            source_length=cur.get("length") if cur else None, created=fmt.get("created"),
            last_written=items.get("last_written"),
        )

    def keys(self) -> list[int]:
        """Cached indices of the current fingerprint, ascending."""
        fp = self._fp()
        e = self.store.handle()
        out = []
        with self.store.begin(e.meta) as txn:
            for k, v in txn.cursor():
                if len(v) >= META_ROW.size and META_ROW.unpack_from(v, 0)[0] == fp:
                    out.append(KEY.unpack(k)[0])
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        if not 0 <= index < 1 << 64:
            return False
        fp, e = self._fp(), self.store.handle()
        with self.store.begin(e.meta) as txn:
            row = txn.get(KEY.pack(index))
            return row is not None and len(row) >= META_ROW.size and META_ROW.unpack_from(row, 0)[0] == fp

    def get(self, index: int) -> Any:
        """The sample at ``index``.

        Raises:
            MissingSampleError: not cached (or cached by another fingerprint).
            CorruptRecordError: the record fails its checksum.
        """
        raw = self.record(index)
        try:
            return codec.decode(raw, self.verify, self._fp())
        except codec.StaleRecord:
            raise MissingSampleError(f"{self.path}: index {index} was cached by another source") from None
        except CorruptRecordError as exc:
            raise CorruptRecordError(
                f"{self.path}: record {index} is corrupt ({exc}); run `kvcache verify --repair {self.path}`"
            ) from None

    def record(self, index: int) -> bytes:
        """The raw record bytes at ``index``."""
        with self.store.begin() as txn:
            raw = txn.get(KEY.pack(index))
            if raw is None:
                raise MissingSampleError(f"{self.path}: index {index} is not in the cache")
            return bytes(raw)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "CacheView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(path: str | os.PathLike, *, verify: bool = True) -> CacheView:
    """Open the cache at ``path`` read-only.

    Raises:
        NotACacheError: nothing there, or not a kvcache cache.
        IncompatibleCacheError: another format version.
    """
    return CacheView(path, verify=verify)
