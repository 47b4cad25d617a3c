"""The ``kvcache`` command: a thin click layer over :mod:`kvcache.maintenance`.

Exit codes: 0 ok; 1 problems found (bad records, a busy or damaged cache, a source that
raised, a permission or other OS error, any other error); 2 usage error or a path that
is not a cache (or of another format, a publish destination that exists without
--force, a partial cache published without --partial); 130 a build interrupted by Ctrl-C.
Every reporting command takes ``--json``. Every error is one line on stderr, never a
traceback (``KVCACHE_DEBUG=1`` shows the traceback of an unexpected one).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import time
from typing import Any, Callable

import click

from . import maintenance as m
from .errors import CacheExistsError, IncompatibleCacheError, KvCacheError, NotACacheError, PartialCacheError

__all__ = ["cli", "main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _fail(exc: BaseException | str, code: int) -> None:
    line = " ".join(str(exc).split())  # one line, whatever the message held
    click.echo(f"kvcache: error: {line}", err=True)
    sys.exit(code)


def _guard(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (NotACacheError, IncompatibleCacheError, CacheExistsError, PartialCacheError) as exc:
            _fail(exc, EXIT_USAGE)
        except KvCacheError as exc:
            _fail(exc, EXIT_PROBLEMS)
        except ValueError as exc:  # a malformed SPEC and the like
            _fail(exc, EXIT_USAGE)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: usage errors and the like, already one line
        except OSError as exc:  # permissions, a read-only filesystem, a full disk
            _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
                  + f" ({type(exc).__name__})", EXIT_PROBLEMS)
        except Exception as exc:  # noqa: BLE001 - e.g. the SPEC's own code: one line, no traceback
            if os.environ.get("KVCACHE_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {exc} (KVCACHE_DEBUG=1 shows the traceback)", EXIT_PROBLEMS)

    return wrapper


def _reporting(fn: Callable) -> Callable:
    """``--json`` and the error guard: what every reporting command has."""
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(_guard(fn))


def _path_command(name: str) -> Callable[[Callable], Any]:
    """A reporting command whose one argument is the cache's PATH."""
    return lambda fn: cli.command(name)(click.argument("path", type=click.Path())(_reporting(fn)))


def _json(report: Any, **extra: Any) -> None:
    d = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)
    d.update(extra)
    click.echo(json.dumps(d, indent=2, default=str))


class _Bar:
    """A click progress bar on a terminal; nothing otherwise (or with --json)."""

    def __init__(self, label: str, enabled: bool, unit: str = "items") -> None:
        self.label, self.unit = label, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.bar: Any = None
        self.shown = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr,
                                         show_eta=True, show_pos=True,
                                         item_show_func=lambda _x: self._rate())
            self.bar.__enter__()
            self.t0 = time.perf_counter()
        step, self.shown = done - self.shown, done  # the rate shown below reads self.shown
        self.bar.update(step)

    def _rate(self) -> str:
        dt = time.perf_counter() - getattr(self, "t0", time.perf_counter())
        return f"{self.shown / dt:,.0f} {self.unit}/s" if dt > 0 else ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def arg(self) -> Any:
        return self if self.enabled else False


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:,} B"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        x /= 1024
        if abs(x) < 1024 or unit == "TiB":
            break
    return f"{x:,.1f} {unit} ({n:,} B)"


_KEY_HELP = ("The key function of a keyed cache (key=): the source's attribute NAME (e.g. `key` "
             "for source.key), or a module:callable returning the key function.")


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvcache", prog_name="kvcache")
def cli() -> None:
    """Inspect and maintain kvcache caches (LMDB caches of PyTorch datasets).

    Exit codes: 0 ok, 1 problems found, 2 usage error or not a cache, 130 a build
    interrupted by Ctrl-C (run it again to resume).
    """


# --------------------------------------------------------------------------- inspect


@_path_command("inspect")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show what the cache at PATH holds (reads metadata only)."""
    r = m.inspect_cache(path)
    if as_json:
        return _json(r)
    fp = r.fingerprint or {}
    out = [
        f"path:          {r.path}",
        f"format:        kvcache format {r.format_version}, codec {r.codec_version}",
        f"fingerprint:   {fp.get('digest', '-')} (id {fp.get('id', '-')}; {len(r.fingerprints)} known)",
        "keyed:         " + ("yes (key=: samples are stored by key; read with `kvcache get PATH --key K`)"
                             if r.keyed else "no (samples are stored by index)"),
    ]
    for k, v in sorted((fp.get("parts") or {}).items()):
        out.append(f"  {k + ':':<13}{v}")
    src = "unknown" if r.source_length is None else f"{r.source_length:,}"
    pct = "" if not r.source_length else f" ({100 * r.current_entries / r.source_length:.1f}%)"
    out += [
        f"entries:       {r.current_entries:,} of {src}{pct}"
        + (f"; {r.stale_entries:,} of other sources (kvcache gc)" if r.stale_entries else ""),
        f"logical bytes: {_size(r.total_bytes)}",
        (f"file bytes:    {_size(r.file_bytes)} (compacted about {_size(r.live_bytes)}; "
         f"data.mdb on disk {_size(r.disk_bytes)})"),
        f"map:           {_size(r.map_size)}, {100 * r.map_used:.1f}% used",
        f"readers:       {r.readers_used} of {r.max_readers} slots in use"
        + (" (opened lock-free: no reader table)" if r.lockfree else ""),
        f"filesystem:    {r.filesystem or 'unknown'}"
        + (f" ({r.network} filesystem: read lock-free, never written)" if r.network else ""),
        "published:     " + (f"yes, {_when(r.published.get('time'))} from {r.published.get('from')} "
                             "(immutable; read lock-free)" if r.published else "no"),
        f"layouts:       {r.layouts}" + (f" (and {r.other_layout_entries:,} records of further layouts)"
                                             if r.other_layout_entries else ""),
    ]
    out += [f"  {leaf}" for leaf in r.leaves]
    if r.sampled_records:
        used = ", ".join(f"{c} in {k:,}" for c, k in sorted(r.compression.items())) or "none"
        waste = 1 - r.stored_bytes / r.page_bytes if r.page_bytes else 0.0
        out += [
            f"compression:   {used} of {r.sampled_records:,} records sampled; ratio {r.ratio:.2f}x",
            (f"per sample:    payload {_size(round(r.payload_bytes))}, stored {_size(round(r.stored_bytes))}, "
             f"in LMDB pages {_size(round(r.page_bytes))} ({r.disk_ratio:.2f}x smaller than the payload"
             + (f"; {100 * waste:.0f}% of the pages is rounding up to whole pages" if waste > 0.05 else "")
             + ")"),
        ]
    out += [f"created:       {_when(r.created)}", f"last written:  {_when(r.last_written)}"]
    click.echo("\n".join(out))


# --------------------------------------------------------------------------- verify


@cli.command("verify")
@click.argument("path", type=click.Path())
@click.option("--repair", is_flag=True, help="Remove bad records and orphan rows (salvage a broken file); with "
              "--spot-check, replace mismatched records with recomputed ones.")
@click.option("--spot-check", type=click.IntRange(min=0), default=0, metavar="N",
              help="Recompute N random cached samples from --source and compare.")
@click.option("--source", "source", metavar="SPEC", help="module:callable returning the source dataset.")
@click.option("--key", "key", metavar="NAME", help=_KEY_HELP)
@_reporting
def verify_cmd(path: str, repair: bool, spot_check: int, source: str | None, key: str | None,
               as_json: bool) -> None:
    """Check every record of the cache at PATH (in a child process). Exit 1 on problems."""
    if spot_check and not source:
        raise click.UsageError("--spot-check needs --source SPEC")
    bar = _Bar("verify", not as_json)
    try:
        r = m.verify(path, repair=repair, spot_check=spot_check, source=source, key=key, progress=bar.arg())
    finally:
        bar.close()
    if as_json:
        _json(r)
    else:
        click.echo(_verify_text(r))
    sys.exit(EXIT_OK if r.ok else EXIT_PROBLEMS)


def _verify_text(r: m.VerifyReport) -> str:
    lines = [f"checked {r.checked:,} of {r.entries:,} records in {r.path}"]
    if r.signal:
        lines.append(f"the scan died with {r.signal}: the file is damaged")
    for e in r.errors:
        lines.append(f"structural: {e}")
    if r.bad:
        lines.append(f"bad records ({len(r.bad)}): {_list(r.bad)}")
        for i in r.bad[:10]:
            lines.append(f"  {i}: {r.reasons.get(str(i), '?')}")
    if r.orphans:
        lines.append(f"orphan rows ({len(r.orphans)}): {_list(r.orphans)}")
    if not r.tally_ok:
        lines.append("the stored count of records per source disagrees with the metadata rows "
                     f"(len(open_cache) and inspect are off); `kvcache verify --repair {r.path}` recounts it")
    if r.published_record == "matches":
        lines.append("published: data.mdb is byte for byte the version `kvcache publish` validated")
    if r.spot_checked:
        lines.append(f"spot check: {r.spot_checked} recomputed, {len(r.spot_mismatches)} differ"
                     + (f": {_list(r.spot_mismatches)}" if r.spot_mismatches else "")
                     + (f"; replaced {r.spot_repaired} with the recomputed samples" if r.spot_repaired else ""))
    if r.repaired:
        how = (f"salvaged {r.salvaged:,} good records into a fresh file" if r.salvaged is not None
               else f"replaced {r.spot_repaired} records" if r.spot_mismatches
               else f"deleted {r.removed} rows (records and their metadata)" if r.removed or r.tally_ok
               else "recounted the records per source")
        lines.append(f"repair: {how}; verified again: {'ok' if r.ok else 'still damaged'}")
        if r.after is not None and not r.ok:
            lines.append(_verify_text(r.after))
    elif r.spot_mismatches and not (r.bad or r.orphans or r.errors or r.signal):
        lines.append("the source no longer produces what the cache holds; add --repair to replace "
                     "the mismatched records (or bump version= and rebuild)")
    elif not r.ok:
        lines.append(f"problems found; `kvcache verify --repair {r.path}` removes them")
    if r.ok and not r.repaired:
        lines.append("ok" if r.tally_ok else "records ok")
    return "\n".join(lines)


def _list(xs: list[int], n: int = 20) -> str:
    s = ", ".join(map(str, xs[:n]))
    return s + (f", ... ({len(xs) - n} more)" if len(xs) > n else "")


# --------------------------------------------------------------------------- compact, gc


@_path_command("compact")
def compact_cmd(path: str, as_json: bool) -> None:
    """Rewrite the cache at PATH without free pages (needs it to itself)."""
    r = m.compact(path)
    if as_json:
        return _json(r, reclaimed=r.reclaimed)
    click.echo(f"compacted {r.path}: {r.entries:,} records\n"
               f"before: {_size(r.bytes_before)}\n"
               f"after:  {_size(r.bytes_after)}\n"
               f"reclaimed: {_size(r.reclaimed)}")


@cli.command("gc")
@click.argument("path", type=click.Path())
@click.option("--source", "source", metavar="SPEC",
              help="module:callable returning the current source: with --key, also drop records of "
                   "a keyed cache whose keys the source no longer has.")
@click.option("--key", "key", metavar="NAME", help=_KEY_HELP)
@click.option("--version", "version", default=None, help="The fingerprint's version= salt.")
@_reporting
def gc_cmd(path: str, source: str | None, key: str | None, version: str | None, as_json: bool) -> None:
    """Drop records written by sources other than the current one (and, with --source and
    --key, records of a keyed cache whose keys the source no longer has)."""
    if (source is None) != (key is None):
        raise click.UsageError("--source and --key go together (gc by the keys of a keyed cache's source)")
    src = keyfn = None
    if source is not None:
        src = m.load_spec(source)
        keyfn = m.load_key(key, src)  # type: ignore[arg-type]
    r = m.gc(path, src, keyfn, version=version)
    if as_json:
        return _json(r)
    if source is not None:
        what = (f"removed {r.removed:,} records: {r.removed - r.unkeyed:,} of other sources, {r.unkeyed:,} "
                "whose keys the source no longer has")
    else:
        what = f"removed {r.removed:,} records of other sources"
    click.echo(f"{what}; kept {r.kept:,}\n"
               f"file bytes: {_size(r.file_bytes)}; `kvcache compact` would reclaim about "
               f"{_size(r.compact_would_reclaim)}")


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
@click.option("--key", "key", metavar="NAME", help="Build a keyed cache (key=). " + _KEY_HELP)
@click.option("--distributed", is_flag=True,
              help="Share the work among the ranks of a torch.distributed job (run under torchrun; "
                   "gloo on CPU): rank 0 writes PATH on its machine; the other ranks only compute.")
@click.option("--skip-errors", is_flag=True,
              help="Store every sample the source can compute and list the indices where it raised "
                   "(exit 1; a later build tries them again). Without it the first error stops the "
                   "build, naming the index.")
@_compression_options("Compress the array leaves of the records written (pip install 'kvcache[zstd]' / "
                      "'kvcache[lz4]'); a leaf that does not shrink by 10% is stored as it is.")
@_reporting
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
    bar = _Bar("build", not as_json)
    try:
        r = m.build(spec, path, workers=workers, version=version, progress=bar.arg(),
                    distributed=distributed, key=key, errors="skip" if skip_errors else "raise",
                    compression=None if compression == "none" else compression,
                    compression_level=compression_level)
    finally:
        bar.close()
    if r.rank == 0:
        if as_json:
            _json(r, items_per_s=r.items_per_s)
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
                           f"tries them again): {_list(r.failed)}\nfirst error: {r.first_error}")
    if r.interrupted:
        sys.exit(130)
    if r.failed:
        sys.exit(EXIT_PROBLEMS)


@cli.command("merge")
@click.argument("dest", type=click.Path())
@click.argument("srcs", nargs=-1, required=True, type=click.Path())
@_reporting
def merge_cmd(dest: str, srcs: tuple[str, ...], as_json: bool) -> None:
    """Copy the records of caches SRCS (one source, same fingerprint) into DEST."""
    r = m.merge(dest, list(srcs))
    if as_json:
        _json(r, ok=r.ok)
    else:
        lines = [(f"merged {len(r.sources)} cache(s) into {r.dest}: copied {r.copied:,}, "
                  f"already present {r.already_present:,}; {r.entries:,} records now")]
        for s, bad in r.bad.items():
            if bad:
                lines.append(f"skipped {len(bad)} bad records of {s}: {_list(bad)}")
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
@_reporting
def publish_cmd(src: str, dest: str, force: bool, partial: bool,
                compression: str | None, compression_level: int | None, as_json: bool) -> None:
    """Publish the cache SRC as an immutable, compacted, verified copy at DEST.

    For shared or network storage: readers open DEST read-only without any lock, from
    any number of hosts, and never write under it. DEST appears complete or not at all.
    """
    bar = _Bar("publish", not as_json)
    try:
        r = m.publish(src, dest, force=force, progress=bar.arg(), partial=partial,
                      compression="keep" if compression is None else compression,
                      compression_level=compression_level)
    finally:
        bar.close()
    if as_json:
        return _json(r)
    click.echo(f"published {r.src} -> {r.dest}: {r.entries:,} records verified"
               + (f" ({r.missing:,} samples of the source missing: --partial)" if r.missing else "") + "\n"
               f"size: {_size(r.bytes)} (source data.mdb {_size(r.src_bytes)})\n"
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
@_reporting
def stage_cmd(src: str, dir: str, max_bytes: int | None, as_json: bool) -> None:
    """Copy the published cache SRC to node-local DIR (or reuse the copy there) and print its path.

    Every process and job on this node finds the same copy; it is copied again when SRC
    was published again (--force) or the local copy is damaged. Without space for it, a
    warning says so and SRC itself is printed: read it in place.
    """
    import warnings

    from .errors import KvCacheWarning
    from .stage import stage_report

    bar = _Bar("stage", not as_json, unit="MiB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KvCacheWarning)
        try:
            r, _ = stage_report(src, dir, max_bytes=max_bytes, progress=bar.arg())
        finally:
            bar.close()
    for w in caught:
        click.echo(f"kvcache: warning: {str(w.message).removeprefix('kvcache: ')}", err=True)
    if as_json:
        return _json(r, warnings=[str(w.message) for w in caught])
    click.echo(r.path)


# --------------------------------------------------------------------------- get


@cli.command("get")
@click.argument("path", type=click.Path())
@click.argument("index", type=int, required=False)
@click.option("--key", "key", metavar="K", help="Read the sample stored under key K (a keyed cache, "
              "filled with key=; K is the str the key function returned).")
@click.option("--key-hex", "key_hex", metavar="HEX", help="As --key, for a bytes key (given in hex).")
@click.option("--out", type=click.Path(file_okay=False), help="Write each array leaf as DIR/<leaf>.npy.")
@_reporting
def get_cmd(path: str, index: int | None, key: str | None, key_hex: str | None, out: str | None,
            as_json: bool) -> None:
    """Show the structure of sample INDEX, or of the sample under --key K in a keyed
    cache (and write its arrays with --out)."""
    if sum(x is not None for x in (index, key, key_hex)) != 1:
        raise click.UsageError("give INDEX, or --key K / --key-hex HEX for a keyed cache (one of them)")
    if key_hex is not None:
        try:
            key_b: str | bytes | None = bytes.fromhex(key_hex)
        except ValueError:
            raise click.UsageError(f"--key-hex {key_hex!r} is not hexadecimal") from None
    else:
        key_b = key
    r = m.get_sample(path, index, out, key=key_b)
    if as_json:
        return _json(r)
    lines = [f"sample {r.index if r.key is None else f'key {r.key!r}'}: {r.structure}"]
    for leaf in r.leaves:
        if leaf.shape is not None:
            desc = f"{leaf.kind} {leaf.dtype}[{','.join(map(str, leaf.shape))}]"
        else:
            desc = f"{leaf.kind} = {leaf.value!r}"
        lines.append(f"  {leaf.path}: {desc}" + (f" -> {leaf.file}" if leaf.file else ""))
    click.echo("\n".join(lines))


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    text = " ".join(str(message).split())
    click.echo(f"kvcache: warning: {text.removeprefix('kvcache: ')}", err=True)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``kvcache`` console script and ``python -m kvcache``."""
    import warnings

    warnings.showwarning = _warning_line  # one line each, like errors (this process is ours)
    return cli.main(args=argv, prog_name="kvcache")


if __name__ == "__main__":
    main()
