"""A least-recently-used map bounded by bytes, not by item count.

It holds encoded records (immutable ``bytes``), so nothing handed to a caller can alias
it: every hit is decoded into fresh arrays.

Only small records enter (``max_item``, 16 KiB by default): a hit saves a read
transaction, an LMDB ``get`` and the checksum (about 1.5 µs whatever the size), while
every record put in costs a copy of it. Past ~16 KiB the copy costs more than a hit
saves unless nearly every read hits (measured in docs/performance.md).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["MAX_ITEM", "BytesLRU"]

MAX_ITEM = 16 << 10


class BytesLRU:
    """Index -> record bytes, evicting the least recently used past ``max_bytes``."""

    __slots__ = ("_d", "max_bytes", "max_item", "nbytes")

    def __init__(self, max_bytes: int, max_item: int = MAX_ITEM) -> None:
        self.max_bytes = max_bytes
        # Larger records never enter (callers check before copying a record out); one
        # item must not flush most of the cache either.
        self.max_item = min(max_item, max_bytes // 4)
        self.nbytes = 0
        self._d: OrderedDict[int, bytes] = OrderedDict()

    def get(self, key: int) -> bytes | None:
        d = self._d
        rec = d.get(key)
        if rec is not None:
            d.move_to_end(key)
        return rec

    def put(self, key: int, rec: bytes) -> None:
        n = len(rec)
        if n > self.max_item:
            return
        d = self._d
        old = d.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)
        d[key] = rec
        self.nbytes += n
        while self.nbytes > self.max_bytes:
            _, ev = d.popitem(last=False)
            self.nbytes -= len(ev)

    def discard(self, key: int) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)

    def clear(self) -> None:
        self._d.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._d)
