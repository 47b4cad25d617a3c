"""Keys that survive change: ``LmdbCachedDataset(source, path, key=fn)``.

``fn(i)`` returns a stable identity of sample ``i`` (``str`` or ``bytes``: a file path
with its mtime and size, a content hash, a database id). A keyed cache stores each
sample under its key rather than its index, so appending, removing or reordering source
items keeps every sample whose key is unchanged, and an index never gets another key's
sample.

How a key is stored:

* the key is normalised to bytes with a type tag (:func:`key_bytes`: ``b"s"`` + UTF-8
  for ``str``, ``b"b"`` + the bytes for ``bytes``), so ``"a"`` and ``b"a"`` differ;
* its LMDB key is the 16-byte xxh3-128 digest of those bytes (:func:`digest`), so every
  key costs the same to look up however long it is; an index-keyed record's LMDB key is 8
  bytes, so the two kinds never meet;
* the record's checksum is seeded with the digest's last 8 bytes
  (:func:`kvcache.codec.seed_of`), binding the record to its key as an index-keyed
  record is bound to its index;
* the metadata row keeps the normalised key itself (:func:`kvcache.codec.meta_key`),
  so ``open_cache(path).keys()``, ``kvcache inspect`` and ``gc`` can list keys.

Two different keys with the same 128-bit digest would share a record; at 10^9 keys the
chance is about 10^-21.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import xxhash

from .errors import DuplicateKeyError, KeyFunctionError

__all__ = ["MAX_KEY_BYTES", "KeyFunction", "all_keys", "digest", "duplicate", "key_bytes", "key_function",
           "key_value", "missing_keys"]

MAX_KEY_BYTES = 0xFFFF  # the metadata row stores the key's length in 16 bits
_xxh128_digest = xxhash.xxh3_128_digest  # big-endian: the bytes of xxh3_128_intdigest
_SEED = struct.Struct(">Q")  # the seed: the digest's last 8 bytes (codec.seed_of)


def key_bytes(key: Any) -> bytes:
    """``key`` (``str`` or ``bytes``) normalised with its type tag.

    Raises:
        TypeError: another type. ValueError: longer than ``MAX_KEY_BYTES`` encoded.
    """
    if isinstance(key, str):
        kb = b"s" + key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        kb = b"b" + bytes(key)
    else:
        raise TypeError(f"a key must be str or bytes, not {type(key).__module__}.{type(key).__qualname__}")
    if len(kb) > MAX_KEY_BYTES:
        raise ValueError(f"a key must encode to at most {MAX_KEY_BYTES - 1} bytes, not {len(kb) - 1}")
    return kb


def key_value(kb: bytes) -> str | bytes:
    """The user's key back from its normalised bytes."""
    if kb[:1] == b"s":
        return kb[1:].decode("utf-8", "surrogatepass")
    return bytes(kb[1:])


def digest(kb: bytes) -> tuple[bytes, int]:
    """``(LMDB key, checksum seed)`` of a normalised key: one xxh3-128 hash."""
    lk = _xxh128_digest(kb)
    return lk, _SEED.unpack_from(lk, 8)[0]


KeyFunction = Callable[[int], "tuple[bytes, int, bytes]"]


def key_function(fn: Callable[[int], Any], path: str) -> KeyFunction:
    """The user's ``key=`` function, checked: ``kf(i)`` -> ``(LMDB key, checksum seed,
    normalised key)``. A closure rather than a class: it runs on every access (a call
    through ``__call__`` measured ~100 ns more).

    ``kf(i)`` raises :class:`KeyFunctionError` when ``fn(i)`` raised (chained), or returned
    a wrong type or an over-long key; the message names the index.
    """
    h128, seed_at = _xxh128_digest, _SEED.unpack_from

    def kf(i: int) -> tuple[bytes, int, bytes]:
        try:
            k = fn(i)
        except Exception as exc:
            raise KeyFunctionError(
                f"{path}: the key function {_name(fn)} raised {type(exc).__name__} for index {i}: "
                f"{exc}") from exc
        # the common types inline; anything else (and an over-long key) through key_bytes
        t = type(k)
        if t is str:
            kb = b"s" + k.encode("utf-8", "surrogatepass")
        elif t is bytes:
            kb = b"b" + k
        else:
            kb = _checked(fn, path, i, k)
        if len(kb) > MAX_KEY_BYTES:
            kb = _checked(fn, path, i, k)
        lk = h128(kb)
        return lk, seed_at(lk, 8)[0], kb

    kf.path = path  # type: ignore[attr-defined]
    return kf


def _checked(fn: Any, path: str, i: int, k: Any) -> bytes:
    try:
        return key_bytes(k)
    except (TypeError, ValueError) as exc:
        raise KeyFunctionError(
            f"{path}: the key function {_name(fn)} returned {k!r:.80} for index {i}: {exc}; return "
            "a stable str or bytes identity of the sample (e.g. its file path with mtime and size, "
            "or a content hash)") from None


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def all_keys(kf: KeyFunction, n: int, path: str) -> tuple[list[bytes], list[int], list[bytes]]:
    """Every key of ``range(n)``: ``(LMDB keys, seeds, key bytes)``, by index.

    Raises:
        DuplicateKeyError: two indices have the same key (both are named).
        KeyFunctionError: as :class:`KeyFunction`.
    """
    lks: list[bytes] = []
    seeds: list[int] = []
    kbs: list[bytes] = []
    first: dict[bytes, int] = {}
    for i in range(n):
        lk, seed, kb = kf(i)
        j = first.setdefault(lk, i)
        if j != i:
            raise duplicate(path, j, i, kb)
        lks.append(lk)
        seeds.append(seed)
        kbs.append(kb)
    return lks, seeds, kbs


def missing_keys(store: Any, fp_id: int | None, kf: KeyFunction, n: int,
                 path: str) -> list[tuple[int, bytes, int, bytes]]:
    """What a keyed build computes: ``(index, LMDB key, seed, key bytes)`` of every index
    of ``range(n)`` whose key holds no record of ``fp_id`` in ``store`` (a
    :class:`kvcache.store.Store`), in index order. Every key is computed first (``kf`` is
    called ``n`` times, here, in the building process) and checked for duplicates; then
    one metadata row is read per key, in one read transaction.

    Raises:
        DuplicateKeyError, KeyFunctionError: as :func:`all_keys` (nothing is built).
    """
    from . import codec  # kvcache.keys is imported by the scan child: codec only where needed

    lks, seeds, kbs = all_keys(kf, n, path)
    out = []
    meta_fp = codec.meta_fp
    with store.begin(store.handle().meta) as txn:
        get = txn.get
        for i, lk in enumerate(lks):
            row = get(lk)
            if row is None or meta_fp(row) != fp_id:
                out.append((i, lk, seeds[i], kbs[i]))
    return out


def duplicate(path: str, first: int, second: int, kb: bytes) -> DuplicateKeyError:
    """The error for two indices with one key."""
    return DuplicateKeyError(
        f"{path}: the key function returned the same key {key_value(kb)!r:.80} for indices {first} "
        f"and {second}; keys must identify samples uniquely (nothing was stored for index {second})")
