"""``recompress``: rewrite every record of a private copy with another compression
(``kvcache publish --compression``), then compact it.

Each record is decoded (its checksum checked) and encoded again with the new codec, under
its own key: the seed of a KEYED record's checksum is its key's last 8 bytes, as when it
was written (an index for an index key). The metadata row keeps everything but the
checksum and the record size, and :class:`kvcache.store.Rows` keeps the tally.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import lmdb

from .. import codec
from ..compression import Compression
from ..store import Rows, translate
from ._common import sibling_dir

__all__ = ["recompress"]

_BATCH = 1024
_SIZE_BIT = 1 << 63  # the metadata row's record size may carry a flag (keyed rows): kept


def _seed(key: bytes) -> int:
    return int.from_bytes(key[-8:], "big")


def recompress(path: str, compression: Compression | None, progress: Any = None) -> int:
    """Rewrite every record of the cache at ``path`` (a private copy nothing else has
    open) compressed with ``compression`` (None: uncompressed), then compact the file.
    Returns the number of records rewritten.

    Raises:
        CorruptRecordError: a record does not verify (the copy is not published).
        MissingCodecError: a record's codec is not installed here.
    """
    data = os.path.join(path, "data.mdb")
    env = lmdb.open(path, subdir=True, lock=False, max_dbs=4, create=False,
                    map_size=2 * os.path.getsize(data) + (64 << 20))
    done = 0
    try:
        samples = env.open_db(b"samples", create=False)
        meta = env.open_db(b"meta", create=False)
        info = env.open_db(b"info", create=False)
        with env.begin(db=samples) as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        if progress is not None:
            progress.start(len(keys))
        for at in range(0, len(keys), _BATCH):
            with env.begin(write=True) as txn:
                rows = Rows(txn, samples, meta, info)
                for key in keys[at:at + _BATCH]:
                    old = txn.get(key, db=samples)
                    row = txn.get(key, db=meta)
                    if old is None or row is None:
                        continue  # an orphan: verify's business, the scan reports it
                    seed = _seed(key)
                    sample = codec.decode(old, True, None, seed)
                    fp_id = codec.read_header(old)[0]
                    new, _layout, checksum = codec.encode(sample, fp_id, seed, compression)
                    fp, _cs, nbytes = codec.META_ROW.unpack_from(row, 0)
                    new_row = codec.META_ROW.pack(fp, checksum, (nbytes & _SIZE_BIT) | len(new)) + \
                        bytes(row[codec.META_ROW.size:])
                    rows.put(key, bytes(new), new_row)
                    done += 1
                rows.save()
            if progress is not None:
                progress.update(min(_BATCH, len(keys) - at))
        if progress is not None:
            progress.finish()
        compact = sibling_dir(path, "recompress")
        try:
            env.copy(compact, compact=True)
        except lmdb.Error as exc:
            shutil.rmtree(compact, ignore_errors=True)
            raise translate(exc, compact) from None
    finally:
        env.close()
    os.replace(os.path.join(compact, "data.mdb"), data)
    shutil.rmtree(compact, ignore_errors=True)
    return done
