"""``build``: fill every missing index of a cache from a ``module:callable`` spec.

The work is :func:`kvcache.builder.build`'s (worker processes compute, one writer
commits in batches), shared with ``LmdbCachedDataset.build``; this adds the spec, which
also makes the source in each worker under spawn (nothing is pickled).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING, Any

from ..fingerprint import compute_parts
from ..stats import BuildReport
from .spec import load_key, load_spec

if TYPE_CHECKING:
    from ..builder import Target

__all__ = ["BuildReport", "build"]


def build(spec: str, path: str | os.PathLike, *, workers: int = 1, version: str | int | None = None,
          progress: Any = False, distributed: bool = False, start_method: str | None = None,
          key: str | None = None, errors: str = "raise",
          compression: str | None = None, compression_level: int | None = None) -> BuildReport:
    """Compute and store every index of the source that the cache does not hold yet.

    ``spec`` (``module:callable`` or ``path/to/file.py:callable``) returns the source
    dataset; it is called once here (to fingerprint the source) and, under spawn, once in
    each worker. A Ctrl-C or kill leaves every written batch in place and nothing
    half-written; running it again resumes.

    Args:
        workers: processes computing samples (1 computes in this process).
        version: the ``version=`` salt of the fingerprint (as for LmdbCachedDataset).
        progress: True for a progress line on stderr, or a callable ``(done, total)``.
        distributed: share the work among the ranks of the ``torch.distributed`` process
            group (initialised from torchrun's environment if it is not yet); only rank 0
            opens ``path`` and writes (see :mod:`kvcache.distributed`).
        start_method: the workers' start method (fork where available, else spawn).
        key: build a keyed cache (``key=``): the key function is the source's attribute
            of that name (e.g. ``"key"`` for ``source.key``) or a ``module:callable``
            returning it (:func:`kvcache.maintenance.load_key`).
        errors: ``"raise"`` (a source error stops the build, naming the index) or
            ``"skip"`` (store every other sample; the report lists ``failed`` indices,
            which a later build tries again). Not with ``distributed``.
        compression, compression_level: compress the records written (``"zstd"`` or
            ``"lz4"``, as for LmdbCachedDataset); records already cached stay as they are.

    Returns:
        a report with ``items_per_s``; ``interrupted`` is True after Ctrl-C.

    Raises:
        ValueError: a bad spec. NotACacheError, StaleCacheError, ...: as for opening
        an LmdbCachedDataset on ``path``. BuildError: a worker or rank died.
        SourceError: the source raised for an index (``errors="raise"``).
    """
    from ..builder import BuildJob, build as run  # torch lives behind it; keep maintenance light
    from ..dataset import LmdbCachedDataset

    if distributed and errors != "raise":
        raise ValueError("--skip-errors is not supported with --distributed")
    source = load_spec(spec)
    keyfn = None if key is None else load_key(key, source)
    factory = functools.partial(load_spec, spec)
    num_workers = workers if workers > 1 else 0
    kw = dict(num_workers=num_workers, progress=progress, start_method=start_method, source_factory=factory)
    with contextlib.ExitStack() as opened:
        if not distributed:
            ds = opened.enter_context(LmdbCachedDataset(source, path, version=version, key=keyfn,
                                                        compression=compression,
                                                        compression_level=compression_level))
            return run(ds.build_job(), errors=errors, **kw)
        from ..distributed import build_source

        def open_target() -> Target:  # rank 0 alone opens (and creates) the cache
            ds = opened.enter_context(LmdbCachedDataset(source, path, version=version, key=keyfn,
                                                        compression=compression,
                                                        compression_level=compression_level))
            return ds.build_job().open()

        job = BuildJob(source, os.path.abspath(os.fspath(path)),
                       compute_parts(source, version, None, keyfn is not None), open_target, keyfn)
        return build_source(job, **kw)
