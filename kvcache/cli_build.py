"""The commands that make caches: build, merge, publish, stage.

``build`` fills a cache from a SPEC, ``merge`` combines caches of one source,
``publish`` makes the immutable copy for shared storage and ``stage`` copies a
published cache to node-local disk. Each formats the report of :mod:`kvcache.maintenance`
(or :mod:`kvcache.stage`); errors and exit codes come from :mod:`kvcache.cli_common`.
Importing this module registers the commands on the group.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

import click

from . import maintenance as m
from .cli_common import (EXIT_OK, EXIT_PROBLEMS, KEY_HELP, Bar, cli, human_size, print_json, reporting,
                         short_list)

__all__ = ["build_cmd", "merge_cmd", "publish_cmd", "stage_cmd"]


# --------------------------------------------------------------------------- build, merge


def _compression_options(help_text: str) -> Callable:
    """``--compression zstd|lz4|none`` and ``--compression-level N``."""
    def deco(f: Callable) -> Callable:
        f = click.option("--compression-level", type=int, default=None,
                         help="The codec's level (zstd -7..22, default 3; lz4 0 fast (default) or 1..16).")(f)
        return click.option("--compression", type=click.Choice(["zstd", "lz4", "none"]), default=None,
                            help=help_text)(f)
    return deco


@cli.command("build")
@click.argument("spec")
@click.argument("path", type=click.Path())
@click.option("--workers", "-w", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes computing samples (1: this one; N > 1: N workers, this one writes).")
@click.option("--version", "version", default=None, help="The fingerprint's version= salt.")
@click.option("--key", "key", metavar="NAME", help="Build a keyed cache (key=). " + KEY_HELP)
@click.option("--distributed", is_flag=True,
              help="Share the work among the ranks of a torch.distributed job (run under torchrun; "
                   "gloo on CPU): rank 0 writes PATH on its machine; the other ranks only compute.")
@click.option("--skip-errors", is_flag=True,
              help="Store every sample the source can compute and list the indices where it raised "
                   "(exit 1; a later build tries them again). Without it the first error stops the "
                   "build, naming the index.")
@_compression_options("Compress the array leaves of the records written (pip install 'kvcache[zstd]' / "
                      "'kvcache[lz4]'); a leaf that does not shrink by 10% is stored as it is.")
@reporting
def build_cmd(spec: str, path: str, workers: int, version: str | None, key: str | None,
              distributed: bool, skip_errors: bool,
              compression: str | None, compression_level: int | None, as_json: bool) -> None:
    """Fill every missing index of the cache at PATH from SPEC.

    SPEC is module:callable (looked up from the current directory, as `python -m` does)
    or path/to/file.py:callable (imported under its own module name, as a training script
    importing it would), returning the source dataset: the cache is then the one training
    with that source uses. Resumable: an interrupted build (Ctrl-C) keeps what it wrote;
    run it again.
    """
    bar = Bar("build", not as_json)
    try:
        r = m.build(spec, path, workers=workers, version=version, progress=bar.arg(),
                    distributed=distributed, key=key, errors="skip" if skip_errors else "raise",
                    compression=None if compression == "none" else compression,
                    compression_level=compression_level)
    finally:
        bar.close()
    if r.rank == 0:
        if as_json:
            print_json(r, items_per_s=r.items_per_s)
        else:
            how = f"{r.workers} worker(s)" + (f" on each of {r.ranks} ranks" if r.ranks > 1 else "")
            if 0 <= r.written < r.computed:
                how += (f"; {r.computed - r.written:,} of the computed samples were written first by "
                        "another build of this cache running at the same time")
            click.echo(f"{'interrupted' if r.interrupted else 'built'} {r.path}: computed {r.computed:,}, "
                       f"already cached {r.already_cached:,}, of {r.total:,}\n"
                       f"{r.seconds:.2f} s, {r.items_per_s:,.0f} items/s with {how}")
            if r.failed:
                click.echo(f"the source raised for {len(r.failed):,} indices (not stored; a later build "
                           f"tries them again): {short_list(r.failed)}\nfirst error: {r.first_error}")
    if r.interrupted:
        sys.exit(130)
    if r.failed:
        sys.exit(EXIT_PROBLEMS)


@cli.command("merge")
@click.argument("dest", type=click.Path())
@click.argument("srcs", nargs=-1, required=True, type=click.Path())
@reporting
def merge_cmd(dest: str, srcs: tuple[str, ...], as_json: bool) -> None:
    """Copy the records of caches SRCS (one source, same fingerprint) into DEST."""
    r = m.merge(dest, list(srcs))
    if as_json:
        print_json(r, ok=r.ok)
    else:
        lines = [(f"merged {len(r.sources)} cache(s) into {r.dest}: copied {r.copied:,}, "
                  f"already present {r.already_present:,}; {r.entries:,} records now")]
        for s, bad in r.bad.items():
            if bad:
                lines.append(f"skipped {len(bad)} bad records of {s}: {short_list(bad)}")
        click.echo("\n".join(lines))
    sys.exit(EXIT_OK if r.ok else EXIT_PROBLEMS)


# --------------------------------------------------------------------------- publish


@cli.command("publish")
@click.argument("src", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Replace an existing cache at DEST (atomically).")
@click.option("--partial", is_flag=True, help="Publish even if SRC lacks samples of its source (refused "
              "otherwise: every reader would compute them).")
@_compression_options("Recompress every record of the copy (none: store them uncompressed); without it the "
                      "records are published as they are. SRC is not changed.")
@reporting
def publish_cmd(src: str, dest: str, force: bool, partial: bool,
                compression: str | None, compression_level: int | None, as_json: bool) -> None:
    """Publish the cache SRC as an immutable, compacted, verified copy at DEST.

    For shared or network storage: readers open DEST read-only without any lock, from
    any number of hosts, and never write under it. DEST appears complete or not at all.
    """
    bar = Bar("publish", not as_json)
    try:
        r = m.publish(src, dest, force=force, progress=bar.arg(), partial=partial,
                      compression="keep" if compression is None else compression,
                      compression_level=compression_level)
    finally:
        bar.close()
    if as_json:
        return print_json(r)
    click.echo(f"published {r.src} -> {r.dest}: {r.entries:,} records verified"
               + (f" ({r.missing:,} samples of the source missing: --partial)" if r.missing else "") + "\n"
               f"size: {human_size(r.bytes)} (source data.mdb {human_size(r.src_bytes)})\n"
               + (f"replaced the previous cache ({r.exchange})\n" if r.replaced else "")
               + f"{r.seconds:.2f} s")


# --------------------------------------------------------------------------- stage


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class _Bytes(click.ParamType):
    """A size in bytes: ``1000000``, ``500M``, ``20G``, ``1.5TiB`` (powers of 1024)."""

    name = "bytes"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        mt = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
        if not mt:
            self.fail(f"{value!r} is not a size (e.g. 500000000, 500M, 20G)", param, ctx)
        return int(float(mt.group(1)) * _UNITS[mt.group(2).lower()])


@cli.command("stage")
@click.argument("src", type=click.Path())
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--max-bytes", type=_Bytes(), default=None, metavar="N",
              help="Keep the staged copies in DIR under N bytes (500M, 20G...): the least recently used "
                   "copies not in use are evicted first.")
@reporting
def stage_cmd(src: str, dir: str, max_bytes: int | None, as_json: bool) -> None:
    """Copy the published cache SRC to node-local DIR (or reuse the copy there) and print its path.

    Every process and job on this node finds the same copy; it is copied again when SRC
    was published again (--force) or the local copy is damaged. Without space for it, a
    warning says so and SRC itself is printed: read it in place.
    """
    import warnings

    from .errors import KvCacheWarning
    from .stage import stage_report

    bar = Bar("stage", not as_json, unit="MiB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KvCacheWarning)
        try:
            r, _ = stage_report(src, dir, max_bytes=max_bytes, progress=bar.arg())
        finally:
            bar.close()
    for w in caught:
        click.echo(f"kvcache: warning: {str(w.message).removeprefix('kvcache: ')}", err=True)
    if as_json:
        return print_json(r, warnings=[str(w.message) for w in caught])
    click.echo(r.path)
