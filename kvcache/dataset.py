"""``LmdbCachedDataset``: a map-style Dataset that computes each sample once.

The first access to an index computes it from the source and stores it; every later
access, in any process or run, reads it back from the cache. The read path is one LMDB
``get`` in a short read transaction, a checksum, and one copy out of LMDB memory (see
:mod:`kvcache.codec`); a bytes-bounded LRU sits in front of it in each process.

This module holds the class, its construction, pickling and lifecycle; its other halves
are base classes, one concept each: the read path (:mod:`kvcache.reader`), opening the
cache and the questions asked of it (:mod:`kvcache.attach`), the miss path
(:mod:`kvcache.misses`) and damage (:mod:`kvcache.selfrepair`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch.utils.data

from . import builder, codec
from .attach import Attaching
from .errors import KvCacheWarning
from .keys import key_function
from .lru import BytesLRU
from .misses import Computing
from .stats import BuildReport, CacheStats
from .reader import CachedReader
from .selfrepair import Recovering
from .stage import open_staged, release
from .store import Store
from .writeback import Writer

__all__ = ["BuildReport", "CacheStats", "LmdbCachedDataset"]

_ON_STALE = ("recompute", "reset", "error")


class LmdbCachedDataset(CachedReader, Computing, Attaching, Recovering, torch.utils.data.Dataset):
    """Wrap a map-style dataset so every sample is computed once and read from LMDB after.

    Args:
        source: any map-style dataset (``__len__`` and ``__getitem__``), or ``None`` to
            open an existing cache read-only and serve the indices it holds.
        path: the cache directory (created if missing; must be empty or a kvcache cache).
        version: a salt mixed into the default fingerprint; bump it when the source's
            output changes in a way its class code does not show.
        fingerprint: replaces the default fingerprint (class, length, class source).
        on_stale: when the cache was filled by a different fingerprint: ``"recompute"``
            (old records are never served; they are recomputed as read), ``"reset"``
            (start empty) or ``"error"`` (raise StaleCacheError naming what changed).
        lru_bytes: the per-process LRU's size in bytes (0, the default, turns it off).
            A hit saves ~1.5 µs of a ~3-5 µs read, a miss costs a copy: it pays only
            when at least ~40-60% of a process's reads hit, i.e. when the samples each
            process re-reads fit in it. Records over 16 KiB never enter it.
        verify: check every record's checksum on read.
        readonly: never write (misses are computed and returned, not stored).
        map_size: the initial LMDB map size; it grows by doubling on demand.
        max_map_size: the cap on growth; past it write-back stops with one warning.
        readahead: OS readahead on the map. None (the default): on for a published
            cache or one on a network filesystem (each page fault there is a round trip;
            docs/network.md measures it), off otherwise (random reads on local disk).
        max_sample_bytes: records above this are served uncached (SampleTooLargeError
            is warned once).
        write_batch: records per write transaction (a batch is also written once it
            holds 64 MiB or its oldest record is 2 s old). A commit costs an fsync
            (~2-10 ms here): at 256 records it was 5-20% of a first epoch over a
            200 µs/item source and half of a build's time.
        spot_check: recompute this many random cached samples at open and compare.
        allow_network_writes: write the cache even on a network or FUSE filesystem. By
            default kvcache refuses (LMDB is not safe there across hosts): a cache found
            there is read lock-free like a published one, a new one is not created, and
            misses are computed, not stored, with one warning naming the fix (build on
            local disk, then ``kvcache publish``). ``KVCACHE_ALLOW_NETWORK_WRITES=1``
            does the same as True.
        transform: a callable applied to every sample as it leaves the dataset (a hit or
            a miss alike, in ``__getitem__`` and ``__getitems__``), as torchvision
            datasets take one: the place for random augmentation, which must not be
            cached. It is never part of the fingerprint or the stored record, and it is
            pickled with the other arguments for spawn and forkserver workers (so it
            must be picklable there: a module-level function or class, not a lambda).
        key: a callable ``key(i)`` returning a stable identity of sample ``i`` (``str`` or
            ``bytes``: its file path with mtime and size, a content hash, a database id).
            Each sample is then stored under its key, not its index: appending, removing
            or reordering source items keeps every sample whose key is unchanged (the
            source is not called for them), a changed key is recomputed, and no index
            ever gets another key's sample. The source's length leaves the fingerprint
            (its class code and ``version=`` stay). ``key(i)`` is called on every access
            (``ds[i]`` and each index of ``__getitems__``; in a build, once per index), so
            it should be cheap (a list lookup, not a file hash: compute those once in the
            source's ``__init__``). A key function that raises, returns another type, or
            returns one key for two indices raises :class:`KeyFunctionError` /
            :class:`DuplicateKeyError` naming the indices, and nothing is stored for them.
            Like ``transform``, it must be picklable for spawn workers. A cache is either
            keyed or index-keyed: opening one the other way is a changed fingerprint
            (``on_stale`` decides), and reading a keyed cache without a source needs
            ``key=`` too (or ``open_cache(path).by_key(k)``).
        stage: a directory on node-local disk: read a verified local copy of the
            published cache at ``path`` made there (:func:`kvcache.stage`) instead of
            ``path`` itself. The first opener on the node copies it (the constructing
            process, before DataLoader workers start); every other process and later job
            reuses it after one ``stat`` of ``path``; a republished ``path`` is copied
            again. While this dataset is open the copy is never evicted. Without space for
            it, a ``KvCacheWarning`` says so and ``path`` is read in place.
        compression: ``None`` (the default), ``"zstd"`` or ``"lz4"``: compress the array
            leaves of the records this dataset writes, each leaf on its own (a leaf that
            does not shrink by 10 % is stored as it is; records already in the cache are
            read whatever their codec). Needs the extra: ``pip install 'kvcache[zstd]'``
            or ``'kvcache[lz4]'``. docs/performance.md measures ratio and read cost:
            worth it for compressible data (token ids, low-entropy images) and on network
            storage, where bytes are time.
        compression_level: the codec's level (zstd: -7..22, default 3; lz4: 0 fast,
            default, or 1..16 high compression).

    A *published* cache (``kvcache publish``) and any cache on a network filesystem are
    opened read-only and lock-free (no ``lock.mdb``, no flock, no byte written): many
    processes on many hosts can read one at once.

    A damaged cache never stops a dataset that has a source (:mod:`kvcache.selfrepair`):
    a damaged overflow page is repaired in place and its record recomputed; a damaged tree
    is salvaged (the intact records kept, in a child process, by one process under the
    writer lock) where the cache can be written, and otherwise samples are served from the
    source without the cache; one ``KvCacheWarning`` says which, and ``self_repair`` holds
    the details. The same happens when damage appears while the file is open (an LMDB
    error, a run of bad checksums, ``data.mdb`` replaced or truncated).

    Raises:
        NotACacheError, IncompatibleCacheError, StaleCacheError, CacheBusyError: at
        construction, for a path that cannot be used. CacheCorruptError: a damaged cache
        and no source.
        MissingCodecError: ``compression=`` names a codec whose package is not
            installed (also raised by a read of a record compressed with one).
        ValueError: an unknown ``compression`` or a level out of range.
    """

    def __init__(self, source: Any, path: str | os.PathLike, *, version: str | int | None = None,
                 fingerprint: str | None = None, on_stale: str = "recompute",
                 lru_bytes: int = 0, verify: bool = True, readonly: bool = False,
                 map_size: int | None = None, max_map_size: int | None = None,
                 readahead: bool | None = None, max_sample_bytes: int = 1 << 30,
                 write_batch: int = 4096, spot_check: int = 0,
                 allow_network_writes: bool = False,
                 transform: Callable[[Any], Any] | None = None,
                 key: Callable[[int], str | bytes] | None = None,
                 stage: str | os.PathLike | None = None,
                 compression: str | None = None, compression_level: int | None = None) -> None:
        if on_stale not in _ON_STALE:
            raise ValueError(f"on_stale must be one of {_ON_STALE}, not {on_stale!r}")
        self._args = dict(
            source=source, path=os.fspath(path), version=version, fingerprint=fingerprint,
            on_stale=on_stale, lru_bytes=lru_bytes, verify=verify, readonly=readonly,
            map_size=map_size, max_map_size=max_map_size, readahead=readahead,
            max_sample_bytes=max_sample_bytes, write_batch=write_batch, spot_check=spot_check,
            allow_network_writes=allow_network_writes,
            transform=transform, key=key, stage=None if stage is None else os.fspath(stage),
            compression=compression, compression_level=compression_level,
        )
        self._setup()
        try:
            self._prepare(wait=True)  # validate the path now, in the constructing process
        except BaseException:
            self._store.close()  # e.g. StaleCacheError: keep no environment (nor its lock) open
            raise
        self.spot_check_report = None  # an integrity.SpotCheckReport when spot_check > 0
        if spot_check:
            from .integrity import spot_check as _spot_check

            self.spot_check_report = _spot_check(self, spot_check, repair=True)
            if self.spot_check_report.mismatched:
                bad = self.spot_check_report.mismatched
                self._warn_once("spot_check", (
                    f"kvcache: {self.path}: spot check found {len(bad)} of "
                    f"{self.spot_check_report.checked} cached samples differing from the source "
                    f"(indices {bad[:10]}); they were replaced, but the source changed without its "
                    "fingerprint changing: pass a new version= (or on_stale='reset') to rebuild"))

    def _setup(self) -> None:
        a = self._args
        self.source = a["source"]
        self.path = os.path.abspath(a["path"])
        self._stage_fd: int | None = None  # the shared lock that keeps a staged copy (stage=)
        if a.get("stage") is not None:
            self.path, self._stage_fd = open_staged(self.path, a["stage"])
        self.verify = a["verify"]
        self.max_sample_bytes = a["max_sample_bytes"]
        self._transform = a.get("transform")
        self._keyfn = key_function(a["key"], self.path) if a.get("key") is not None else None
        self.compression = codec.compression_of(a.get("compression"), a.get("compression_level"))
        self._store = Store(self.path, readonly=a["readonly"] or self.source is None,
                            create=self.source is not None, map_size=a["map_size"],
                            max_map_size=a["max_map_size"], readahead=a["readahead"],
                            allow_network_writes=a.get("allow_network_writes", False),
                            degrade=self.source is not None)
        self._stats = CacheStats()
        self._lru = BytesLRU(a["lru_bytes"]) if a["lru_bytes"] > 0 else None
        self._writer = Writer(self._store, self._stats, batch_items=a["write_batch"])
        self._fp_id: int | None = None
        self._fp_read = -1
        self._len: int | None = None
        self._env: Any = None  # this process's open environment (an env.Env)
        self._warned: set[str] = set()
        self._unstored: str | None = None  # why misses are not stored (published/network cache)
        self._closed = False
        self.self_repair: Any = None  # a selfrepair.SelfRepair when the cache was found damaged
        self._suspect = False  # damage seen while open: walk the file again before going on
        self._corrupt_base = 0
        self._next_check = 0.0
        self._file_id: tuple | None = None  # (dev, ino, size) of data.mdb when last looked at
        self._parts: dict[str, Any] | None = None  # the source's fingerprint parts, once computed

    @property
    def transform(self) -> Callable[[Any], Any] | None:
        """The callable applied to every sample served (``transform=``); settable, and
        kept with the constructor's arguments, so workers get the new one too."""
        return self._transform

    @transform.setter
    def transform(self, fn: Callable[[Any], Any] | None) -> None:
        self._args["transform"] = self._transform = fn

    # -- pickling: the constructor's arguments only, nothing live

    def __getstate__(self) -> dict:
        # and the fingerprint's parts (plain JSON data), so that workers do not hash the
        # source's attributes again (a list of 10^6 paths: tens of milliseconds each)
        return {"_args": self._args, "_parts": self._parts}

    def __setstate__(self, state: dict) -> None:
        self._args = state["_args"]
        self._setup()  # opens lazily, in the process that uses it
        self._parts = state.get("_parts")

    # -- the Dataset protocol (the read path is kvcache.reader.CachedReader, a miss
    # kvcache.misses.Computing, opening kvcache.attach.Attaching)

    def __len__(self) -> int:
        if self._len is None:
            self._handle()
        return self._len  # type: ignore[return-value]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, KvCacheWarning, stacklevel=3)

    # -- the rest of the public API

    def stats(self) -> CacheStats:
        """This process's counts (a copy).

        Computed samples are written back in batches, so ``writes`` and ``write_errors``
        change when a batch is written (``write_batch`` records, 64 MiB, 2 s old, or at the
        latest on ``flush()`` / ``close()``), not when the sample is returned: call
        ``flush()`` first for exact numbers. A batch that does not fit (map at
        ``max_map_size``, disk full) commits the parts that fit; ``write_errors`` counts
        exactly the records that were not written.
        """
        return CacheStats(**self._stats.as_dict())

    def flush(self) -> int:
        """Write buffered samples now; return how many records were committed."""
        return self._writer.flush()

    def build(self, progress: Any = False, *, num_workers: int = 0, distributed: bool = False,
              start_method: str | None = None, source_factory: Any = None,
              errors: str = "raise") -> BuildReport:
        """Compute and store every index that is not cached yet (resumable).

        Workers compute and encode samples; this process alone writes them, one
        transaction per batch. A Ctrl-C keeps every batch written so far (and every
        sample already computed), then raises KeyboardInterrupt; a later ``build()``
        resumes where it stopped.

        Args:
            progress: True draws a progress line on stderr; a callable is called with
                ``(done, total)``; False keeps quiet.
            num_workers: worker processes computing samples (0: in this process), as
                for a DataLoader. About N times faster on a CPU-bound source with N cores.
            distributed: share the work among the ranks of the initialised
                ``torch.distributed`` process group: every rank must call ``build`` with
                the same source and path; rank 0 writes (see :mod:`kvcache.distributed`).
            start_method: for the workers: ``"fork"`` (the default where available:
                nothing is pickled), ``"spawn"`` or ``"forkserver"`` (the source is
                pickled to each worker once).
            source_factory: a picklable callable that returns the source, called once in
                each worker instead of pickling the source.
            errors: what an exception from the source does: ``"raise"`` stops the build
                with a :class:`SourceError` naming the index (what was committed stays);
                ``"skip"`` stores every other sample and lists the failing indices in
                the report's ``failed`` (a later build tries them again). Not with
                ``distributed=True``.

        Returns:
            a :class:`BuildReport` (``items_per_s``, ``failed``).

        Raises:
            MissingSampleError: no source. CacheReadOnlyError: the cache cannot be
            written. BuildError: a worker or rank died (committed batches are kept).
            SourceError: the source raised (``errors="raise"``).
            KeyboardInterrupt: after Ctrl-C, once what was computed is written.
        """
        if distributed and errors != "raise":
            raise ValueError("errors='skip' is not supported with distributed=True")
        if distributed:
            from .distributed import build as run  # torch.distributed: only when asked
        else:
            run = builder.build
        kw = {} if distributed else {"errors": errors}
        rep = run(self.build_job(), num_workers=num_workers, progress=progress,
                  start_method=start_method, source_factory=source_factory, **kw)
        if rep.interrupted:
            raise KeyboardInterrupt
        return rep

    def build_job(self) -> builder.BuildJob:
        """This dataset as a build sees it: its source, fingerprint parts and path, and a
        callable that opens it for the build (for kvcache's build code; not a stable API)."""
        return builder.BuildJob(self.source, self.path, self.fingerprint_parts, self._build_target,
                                self._args.get("key"))

    def _build_target(self) -> builder.Target:
        fp_id = self.fingerprint_id  # opens this process's environment
        self.flush()  # what __getitem__ buffered is cached before the build looks
        return builder.Target(self.path, self._store, fp_id, len(self), self.max_sample_bytes,
                              self.compression)

    def close(self) -> None:
        """Flush buffered writes and release this process's environment (idempotent)."""
        if self._closed:
            return
        try:
            self._writer.flush()
        finally:
            self._closed = True
            self._env = None
            self._store.close()
            release(self._stage_fd)
            self._stage_fd = None

    def __enter__(self) -> "LmdbCachedDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        src = type(self.source).__name__ if self.source is not None else None
        return f"LmdbCachedDataset(source={src}, path={self.path!r}, len={self._len})"

