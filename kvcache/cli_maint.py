"""The commands that read and look after an existing cache: inspect, get, verify, compact, gc.

Each is a thin click layer over :mod:`kvcache.maintenance` that formats the report it
returns (or prints it with ``--json``); errors and exit codes come from
:mod:`kvcache.cli_common`. Importing this module registers the commands on the group.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from . import maintenance as m
from .cli_common import (EXIT_OK, EXIT_PROBLEMS, KEY_HELP, Bar, cli, human_size, print_json, reporting,
                         short_list)

__all__ = ["compact_cmd", "gc_cmd", "get_cmd", "inspect_cmd", "verify_cmd"]


def _path_command(name: str) -> Callable[[Callable], Any]:
    """A reporting command whose one argument is the cache's PATH."""
    return lambda fn: cli.command(name)(click.argument("path", type=click.Path())(reporting(fn)))


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# --------------------------------------------------------------------------- inspect


@_path_command("inspect")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show what the cache at PATH holds (reads metadata only)."""
    r = m.inspect_cache(path)
    if as_json:
        return print_json(r)
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
        f"logical bytes: {human_size(r.total_bytes)}",
        (f"file bytes:    {human_size(r.file_bytes)} (compacted about {human_size(r.live_bytes)}; "
         f"data.mdb on disk {human_size(r.disk_bytes)})"),
        f"map:           {human_size(r.map_size)}, {100 * r.map_used:.1f}% used",
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
            (f"per sample:    payload {human_size(round(r.payload_bytes))}, "
             f"stored {human_size(round(r.stored_bytes))}, "
             f"in LMDB pages {human_size(round(r.page_bytes))} ({r.disk_ratio:.2f}x smaller than the payload"
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
@click.option("--key", "key", metavar="NAME", help=KEY_HELP)
@reporting
def verify_cmd(path: str, repair: bool, spot_check: int, source: str | None, key: str | None,
               as_json: bool) -> None:
    """Check every record of the cache at PATH (in a child process). Exit 1 on problems."""
    if spot_check and not source:
        raise click.UsageError("--spot-check needs --source SPEC")
    bar = Bar("verify", not as_json)
    try:
        r = m.verify(path, repair=repair, spot_check=spot_check, source=source, key=key, progress=bar.arg())
    finally:
        bar.close()
    if as_json:
        print_json(r)
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
        lines.append(f"bad records ({len(r.bad)}): {short_list(r.bad)}")
        for i in r.bad[:10]:
            lines.append(f"  {i}: {r.reasons.get(str(i), '?')}")
    if r.orphans:
        lines.append(f"orphan rows ({len(r.orphans)}): {short_list(r.orphans)}")
    if not r.tally_ok:
        lines.append("the stored count of records per source disagrees with the metadata rows "
                     f"(len(open_cache) and inspect are off); `kvcache verify --repair {r.path}` recounts it")
    if r.published_record == "matches":
        lines.append("published: data.mdb is byte for byte the version `kvcache publish` validated")
    if r.spot_checked:
        lines.append(f"spot check: {r.spot_checked} recomputed, {len(r.spot_mismatches)} differ"
                     + (f": {short_list(r.spot_mismatches)}" if r.spot_mismatches else "")
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


# --------------------------------------------------------------------------- compact, gc


@_path_command("compact")
def compact_cmd(path: str, as_json: bool) -> None:
    """Rewrite the cache at PATH without free pages (needs it to itself)."""
    r = m.compact(path)
    if as_json:
        return print_json(r, reclaimed=r.reclaimed)
    click.echo(f"compacted {r.path}: {r.entries:,} records\n"
               f"before: {human_size(r.bytes_before)}\n"
               f"after:  {human_size(r.bytes_after)}\n"
               f"reclaimed: {human_size(r.reclaimed)}")


@cli.command("gc")
@click.argument("path", type=click.Path())
@click.option("--source", "source", metavar="SPEC",
              help="module:callable returning the current source: with --key, also drop records of "
                   "a keyed cache whose keys the source no longer has.")
@click.option("--key", "key", metavar="NAME", help=KEY_HELP)
@click.option("--version", "version", default=None, help="The fingerprint's version= salt.")
@reporting
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
        return print_json(r)
    if source is not None:
        what = (f"removed {r.removed:,} records: {r.removed - r.unkeyed:,} of other sources, {r.unkeyed:,} "
                "whose keys the source no longer has")
    else:
        what = f"removed {r.removed:,} records of other sources"
    click.echo(f"{what}; kept {r.kept:,}\n"
               f"file bytes: {human_size(r.file_bytes)}; `kvcache compact` would reclaim about "
               f"{human_size(r.compact_would_reclaim)}")


# --------------------------------------------------------------------------- get


@cli.command("get")
@click.argument("path", type=click.Path())
@click.argument("index", type=int, required=False)
@click.option("--key", "key", metavar="K", help="Read the sample stored under key K (a keyed cache, "
              "filled with key=; K is the str the key function returned).")
@click.option("--key-hex", "key_hex", metavar="HEX", help="As --key, for a bytes key (given in hex).")
@click.option("--out", type=click.Path(file_okay=False), help="Write each array leaf as DIR/<leaf>.npy.")
@reporting
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
        return print_json(r)
    lines = [f"sample {r.index if r.key is None else f'key {r.key!r}'}: {r.structure}"]
    for leaf in r.leaves:
        if leaf.shape is not None:
            desc = f"{leaf.kind} {leaf.dtype}[{','.join(map(str, leaf.shape))}]"
        else:
            desc = f"{leaf.kind} = {leaf.value!r}"
        lines.append(f"  {leaf.path}: {desc}" + (f" -> {leaf.file}" if leaf.file else ""))
    click.echo("\n".join(lines))
