"""The exceptions kvcache raises: one base, :class:`KvCacheError`, and a subclass per situation.

Every message names the path or index involved and says what to do about it. Where a
caller would naturally catch a builtin (``TypeError`` for a bad sample, ``KeyError`` for
a missing one, ``PermissionError`` for a read-only location), the error derives from it
too.
"""

from __future__ import annotations

__all__ = [
    "BuildError",
    "CacheBusyError",
    "CacheCorruptError",
    "CacheExistsError",
    "CacheFullError",
    "CacheReadOnlyError",
    "CacheWriteError",
    "CorruptRecordError",
    "IncompatibleCacheError",
    "KvCacheError",
    "KvCacheWarning",
    "MissingCodecError",
    "MissingSampleError",
    "NetworkFilesystemError",
    "NotACacheError",
    "SampleTooLargeError",
    "StaleCacheError",
    "UnsupportedSampleError",
]


class KvCacheError(Exception):
    """Base class of every error kvcache raises."""


class KvCacheWarning(RuntimeWarning):
    """The category of every warning kvcache emits (a degraded write-back, a damaged
    record recomputed, a reset cache...): filter kvcache's warnings by this class, e.g.
    ``warnings.simplefilter("ignore", kvcache.KvCacheWarning)``."""


class UnsupportedSampleError(KvCacheError, TypeError):
    """A sample holds a value the codec cannot store without pickle.

    The message names the place inside the sample, e.g. ``sample[1]['meta']: Foo``.
    """


class NotACacheError(KvCacheError):
    """The path is not a kvcache cache: a plain file, a directory holding other things,
    an LMDB environment that kvcache did not create, or a missing path opened read-only."""


class IncompatibleCacheError(KvCacheError):
    """The cache was written by another format or codec version of kvcache."""


class StaleCacheError(KvCacheError):
    """The cache was filled by a different source (fingerprint mismatch) and
    ``on_stale="error"`` was asked for. The message names the parts that differ."""


class CorruptRecordError(KvCacheError):
    """One record failed its checksum or could not be decoded, and there is no source
    to recompute it from. ``kvcache verify --repair PATH`` removes such records."""


class CacheCorruptError(KvCacheError):
    """The environment itself is damaged (truncated file, broken pages or meta pages)."""


class CacheWriteError(KvCacheError, OSError):
    """Writing to the cache failed (disk full, I/O error). Samples keep coming from the
    source; the dataset warns once and counts ``write_errors``."""


class CacheFullError(CacheWriteError):
    """The LMDB map reached ``max_map_size``. Raise the cap or compact the cache."""


class CacheReadOnlyError(CacheWriteError, PermissionError):
    """The cache cannot be written here (read-only filesystem, permissions, or a
    read-only view)."""


class NetworkFilesystemError(CacheReadOnlyError):
    """kvcache will not create or write a cache on a network or FUSE filesystem (NFS,
    SMB, Lustre, GPFS, CephFS, ...): build it on local disk and ``kvcache publish`` it
    there. ``allow_network_writes=True`` (or ``KVCACHE_ALLOW_NETWORK_WRITES=1``) overrides."""


class CacheExistsError(KvCacheError, FileExistsError):
    """The destination already holds a cache (``kvcache publish --force`` replaces it)."""


class CacheBusyError(KvCacheError):
    """The cache is in use and the operation needs it alone (compact, repair), or the
    LMDB reader table is full of live readers."""


class BuildError(KvCacheError, RuntimeError):
    """A build lost a worker process or a rank (killed, out of memory, a broken process
    group). Every batch committed before is kept; running the build again resumes it."""


class PartialCacheError(KvCacheError, ValueError):
    """``publish`` of a cache that does not hold every index of its source: the message
    says how many are missing and which; ``kvcache build`` fills them, ``--partial``
    (``partial=True``) publishes it as it is."""


class SourceError(KvCacheError, RuntimeError):
    """The source raised while a build computed an index. The message names the index
    and the source's own error (its ``__cause__`` in the building process); every batch
    committed before is kept. ``build(errors="skip")`` / ``kvcache build --skip-errors``
    store every other sample and list the failing indices instead."""


class SampleTooLargeError(KvCacheError, ValueError):
    """A sample's record exceeds the configured size cap; it is served uncached."""


class MissingCodecError(KvCacheError, ImportError):
    """The cache holds records compressed with a codec whose Python package is not
    installed here; the message names the extra (``pip install 'kvcache[zstd]'``)."""


class MissingSampleError(KvCacheError, KeyError):
    """The index is not in the cache and there is no source to compute it from."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class KeyFunctionError(KvCacheError, ValueError):
    """A ``key=`` function raised, or returned something that is not ``str`` or ``bytes``
    (or a key longer than 65,535 bytes encoded). The message names the index; nothing
    was stored for it."""


class DuplicateKeyError(KeyFunctionError):
    """The ``key=`` function returned the same key for two different indices (named in
    the message): their samples would share one record. Nothing was stored for the
    second index."""


class KeyedCacheError(KvCacheError, TypeError):
    """A keyed cache (filled with ``key=``) was read by index without its key function,
    or an index-keyed one by key. Pass ``key=`` (``open_cache(path, key=fn)``), or read
    by key with ``open_cache(path).by_key(k)`` / ``kvcache get PATH --key K``."""
