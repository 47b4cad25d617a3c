"""kvcache: a crash-safe LMDB cache for PyTorch datasets, computed once and read fast."""

from .dataset import BuildReport, CacheStats, LmdbCachedDataset
from .errors import (
    BuildError,
    CacheBusyError,
    CacheCorruptError,
    CacheExistsError,
    CacheFullError,
    CacheReadOnlyError,
    CacheWriteError,
    CorruptRecordError,
    DuplicateKeyError,
    IncompatibleCacheError,
    KeyFunctionError,
    KeyedCacheError,
    KvCacheError,
    KvCacheWarning,
    MissingCodecError,
    MissingSampleError,
    NetworkFilesystemError,
    NotACacheError,
    PartialCacheError,
    SampleTooLargeError,
    SourceError,
    StaleCacheError,
    UnsupportedSampleError,
)
from .maintenance.publish import PublishReport, publish
from .pubrecord import matches_record, publish_record
from .stage import StageReport, stage
from .view import CacheInfo, CacheView, open_cache

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "BuildReport",
    "CacheBusyError",
    "CacheCorruptError",
    "CacheExistsError",
    "CacheFullError",
    "CacheInfo",
    "CacheReadOnlyError",
    "CacheStats",
    "CacheView",
    "CacheWriteError",
    "CorruptRecordError",
    "DuplicateKeyError",
    "IncompatibleCacheError",
    "KeyFunctionError",
    "KeyedCacheError",
    "KvCacheError",
    "KvCacheWarning",
    "LmdbCachedDataset",
    "MissingCodecError",
    "MissingSampleError",
    "NetworkFilesystemError",
    "NotACacheError",
    "PartialCacheError",
    "PublishReport",
    "SampleTooLargeError",
    "SourceError",
    "StageReport",
    "StaleCacheError",
    "UnsupportedSampleError",
    "__version__",
    "matches_record",
    "open_cache",
    "publish",
    "publish_record",
    "stage",
]
