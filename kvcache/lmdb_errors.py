"""``lmdb.Error`` -> the kvcache error that says what happened and what to do.

The one place that reads py-lmdb's errors: errno values (LMDB reports a full disk as EIO
on commit), read-only locations, and the damage classes.
"""

from __future__ import annotations

import errno
import os
import shutil

import lmdb

from .errors import CacheBusyError, CacheCorruptError, CacheFullError, CacheReadOnlyError, CacheWriteError, KvCacheError

__all__ = ["errno_of", "is_readonly_error", "translate"]


def errno_of(exc: BaseException) -> int | None:
    code = getattr(exc, "errno", None) or getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def is_readonly_error(exc: BaseException) -> bool:
    if isinstance(exc, (lmdb.ReadonlyError, PermissionError)):
        return True
    return errno_of(exc) in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in str(exc)


def _near_fsize_limit(path: str) -> bool:
    """Whether this process's RLIMIT_FSIZE is what stopped a write to ``data.mdb``
    (LMDB reports that as EIO on commit, like a full disk)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft == resource.RLIM_INFINITY:
            return False
        return os.path.getsize(os.path.join(path, "data.mdb")) + (64 << 20) >= soft
    except (OSError, ImportError, ValueError):
        return False


def translate(exc: lmdb.Error, path: str) -> KvCacheError:
    """The kvcache error for an ``lmdb.Error`` met at ``path``."""
    if isinstance(exc, lmdb.MapFullError):
        return CacheFullError(f"{path}: map full ({exc})")
    if is_readonly_error(exc):
        return CacheReadOnlyError(f"{path}: not writable ({exc})")
    code = errno_of(exc)
    if code == errno.EFBIG:
        return CacheWriteError(code, f"{path}: file size limit reached while writing the cache ({exc}; "
                                     "RLIMIT_FSIZE / `ulimit -f`, or the filesystem's largest file)")
    if code in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            free = -1
        cause = "disk full" if code in (errno.ENOSPC, errno.EDQUOT) or 0 <= free < (64 << 20) else "I/O error"
        if cause == "I/O error" and _near_fsize_limit(path):
            cause = "file size limit (RLIMIT_FSIZE / `ulimit -f`)"
        return CacheWriteError(code, f"{path}: {cause} while writing the cache ({exc}; {free} bytes free)")
    if isinstance(exc, lmdb.ReadersFullError):
        return CacheBusyError(f"{path}: LMDB reader table full ({exc})")
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                        lmdb.CursorFullError, lmdb.PanicError, lmdb.BadRslotError)):
        return CacheCorruptError(
            f"{path}: the LMDB file is damaged ({type(exc).__name__}: {exc}); "
            f"run `kvcache verify --repair {path}`"
        )
    return CacheWriteError(code or 0, f"{path}: LMDB error {type(exc).__name__}: {exc}")
