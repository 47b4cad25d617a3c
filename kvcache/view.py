"""``open_cache(path)``: a read-only view of a cache for tools and scripts."""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import lmdb

from . import catalog, codec
from .errors import CorruptRecordError, KeyedCacheError, KeyFunctionError, MissingSampleError
from .keys import digest, key_bytes, key_function, key_value
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
    keyed: bool = False  # filled with key=: records are found by key, not index


class CacheView(Mapping):
    """Read-only access to a cache: a ``Mapping`` from index to sample, plus ``info()``.

    Only records of the current fingerprint count: ``view[i]`` decodes (and, with
    ``verify``, checks) the sample at ``i``, and raises :class:`MissingSampleError` (a
    ``KeyError``) where there is none; ``view.get(i, default)``, ``i in view``,
    ``len(view)`` (read from the cache's tally, not by walking it), ``keys()``,
    ``items()`` and ``values()`` behave as they do on a ``dict``. Iteration is in
    ascending index order, over the indices cached when it starts. The raw record bytes
    are :meth:`record`.

    A keyed cache (filled with ``key=``) is a ``Mapping`` from the user's keys (``str``
    or ``bytes``) to samples: ``view[k]``, ``k in view``, :meth:`by_key`, and iteration
    over the stored keys (in no useful order). ``view[i]`` with an int needs the key
    function (``open_cache(path, key=fn)``: ``view[i]`` is ``view.by_key(fn(i))``);
    without it, it raises :class:`KeyedCacheError`.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True,
                 key: Callable[[int], str | bytes] | None = None) -> None:
        self.store = Store(path, readonly=True, create=False)
        self.path = self.store.path
        self.verify = verify
        self.store.handle()
        self._keyfn = key_function(key, self.path) if key is not None else None
        self._keyed: dict[int, bool] = {}

    def _fp(self) -> int | None:
        cur = catalog.current(self.store)
        return cur["id"] if cur else None

    @property
    def keyed(self) -> bool:
        """Whether the cache's current source stored its samples by key (``key=``)."""
        cur = catalog.current(self.store)
        if cur is None:
            return False
        known = self._keyed.get(cur["id"])
        if known is None:  # a fingerprint's parts never change: look them up once
            parts = (catalog.fingerprints(self.store).get(cur["id"]) or {}).get("parts")
            known = self._keyed[cur["id"]] = isinstance(parts, dict) and parts.get("keyed") is True
        return known

    def _where(self, x: object) -> tuple[bytes, int, str]:
        """``(LMDB key, checksum seed, what to call it in a message)`` of an index or key.

        Raises:
            MissingSampleError: ``x`` is neither an index nor a key of this cache.
            KeyedCacheError: an index of a keyed cache without ``key=``, or a key of an
                index-keyed cache.
            KeyFunctionError: the key function failed.
        """
        if isinstance(x, (str, bytes)):
            if not self.keyed:  # as a dict would: a key it does not have
                raise MissingSampleError(f"{self.path}: {x!r:.80} is not an index of the cache "
                                         "(an index-keyed cache)")
            try:
                lk, seed = digest(key_bytes(x))
            except ValueError as exc:
                raise MissingSampleError(f"{self.path}: {x!r:.80} is not a key of the cache ({exc})") from None
            return lk, seed, f"key {x!r:.80}"
        i = _as_index(x)
        if i is None:
            raise MissingSampleError(f"{self.path}: {x!r:.80} is not an index or key of the cache")
        if self.keyed:
            if self._keyfn is None:
                raise KeyedCacheError(
                    f"{self.path} is a keyed cache (filled with key=): read it by key (`kvcache get PATH "
                    "--key K`, open_cache(path).by_key(k)), or by index with open_cache(path, key=fn)")
            lk, seed, kb = self._keyfn(i)
            return lk, seed, f"index {i} (key {key_value(kb)!r:.80})"
        return KEY.pack(i), i, f"index {i}"

    def by_key(self, key: str | bytes) -> Any:
        """The sample stored under ``key`` in a keyed cache (what ``key=`` returned for it).

        Raises:
            MissingSampleError: no sample of the current source under that key.
            KeyedCacheError: an index-keyed cache. CorruptRecordError: as ``view[i]``.
        """
        if not isinstance(key, (str, bytes)):
            raise KeyFunctionError(f"{self.path}: a key is str or bytes, not {type(key).__name__}")
        if not self.keyed:
            raise KeyedCacheError(f"{self.path} is an index-keyed cache (filled without key=): "
                                  "read it by index")
        return self[key]

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
            keyed=bool(fp and isinstance(fp["parts"], dict) and fp["parts"].get("keyed") is True),
        )

    def _indices(self) -> list[int]:
        """Cached indices of the current fingerprint, ascending (one walk of the rows)."""
        return self.store.indices_of(self._fp())

    def __iter__(self) -> Iterator[Any]:
        if self.keyed:  # the stored keys (a row whose key was lost or damaged is left out)
            return iter([key_value(kb) for lk, kb in self.store.keys_of(self._fp())
                         if kb is not None and digest(kb)[0] == lk])
        return iter(self._indices())

    def __len__(self) -> int:
        return self.store.count(self._fp())

    def __contains__(self, index: object) -> bool:
        try:
            lk = self._where(index)[0]
        except (MissingSampleError, KeyedCacheError, KeyFunctionError):
            return False
        fp, e = self._fp(), self.store.handle()
        with self.store.begin(e.meta) as txn:
            try:
                row = txn.get(lk)
            except lmdb.Error as exc:
                raise translate(exc, self.path) from None
            return row is not None and codec.meta_fp(row) == fp

    def __getitem__(self, index: int) -> Any:
        """The sample at ``index`` (or under a key, in a keyed cache).

        Raises:
            MissingSampleError: not cached (or cached by another fingerprint); a KeyError.
            CorruptRecordError: the record fails its checksum.
            KeyedCacheError: an index of a keyed cache opened without ``key=``.
        """
        lk, seed, what = self._where(index)
        fp = self._fp()
        try:
            with self.store.begin() as txn:
                # decoded from LMDB's memory, so a damaged size is caught by the length
                # check before any byte past the record is touched (see kvcache.codec)
                raw = self._get(txn, lk, what)
                return codec.decode(raw, self.verify, fp, seed)
        except codec.StaleRecord:
            raise MissingSampleError(f"{self.path}: {what} was cached by another source") from None
        except CorruptRecordError as exc:
            raise CorruptRecordError(
                f"{self.path}: the record of {what} is corrupt ({exc}); run `kvcache verify --repair "
                f"{self.path}`") from None

    def record(self, index: int) -> bytes:
        """The raw record bytes at ``index`` (of whichever fingerprint wrote it, unchecked
        but for its length).

        Raises:
            MissingSampleError: no record there.
            CorruptRecordError: the record's length does not match its own header and
                layout (it is not copied: a damaged size could run past the file).
        """
        lk, _seed, what = self._where(index)
        with self.store.begin() as txn:
            raw = self._get(txn, lk, what)
            codec.decode(raw, False)  # the length check: never copy past the record's end
            return bytes(raw)

    def _get(self, txn: object, lk: bytes, what: str) -> object:
        try:
            raw = txn.get(lk)  # type: ignore[attr-defined]
        except lmdb.Error as exc:
            raise translate(exc, self.path) from None
        if raw is None:
            raise MissingSampleError(f"{self.path}: {what} is not in the cache")
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


def open_cache(path: str | os.PathLike, *, verify: bool = True,
               key: Callable[[int], str | bytes] | None = None) -> CacheView:
    """Open the cache at ``path`` read-only.

    Args:
        verify: check every record's checksum as it is read.
        key: a keyed cache's key function (the ``key=`` it was filled with), so that
            ``view[i]`` reads index ``i`` by its key; without it a keyed cache is read
            by key only (``view.by_key(k)``, ``view[k]``).

    Raises:
        NotACacheError: nothing there, or not a kvcache cache.
        IncompatibleCacheError: another format version.
    """
    return CacheView(path, verify=verify, key=key)
