"""Damage fuzzer: seeded random damage to ``data.mdb``, then everything a user or tool does.

    .venv/bin/python tools/fuzz.py 1000                    # every kind, seeds 0..999
    .venv/bin/python tools/fuzz.py 200 --kind span,bitflip --start 5000
    .venv/bin/python tools/fuzz.py 50 --quick              # skip the DataLoader and CLI steps
    .venv/bin/python tools/fuzz.py 0 --merge a.json b.json # one table from several --json runs
    .venv/bin/python tools/fuzz.py 100 --with-source --start 0 --json ws_0.json  # self-repair mode
    .venv/bin/python tools/fuzz.py 200 --compression zstd  # compressed caches (and samples that compress)

A base cache is built once (200 samples: a uint8 3x32x32 tensor and an int label; every
16th sample is a 3x48x48 tensor, so the file has overflow pages too). Each seed copies it,
damages the copy with one kind of damage (chosen by the seed, or from ``--kind``; the kind
``published`` damages a *published* copy of it past its meta pages, keeping its size, so
that its publish record still matches and readers skip the structural walk), and
runs the steps below in a forked child process (this process imported torch and kvcache
once; a fork costs milliseconds, a fresh interpreter seconds):

1. ``open_cache(path)``: ``info()``, ``keys()``, ``get(i)`` of every key;
2. ``LmdbCachedDataset(None, path)``: ``ds[i]`` for every index, ``__getitems__`` of all;
3. ``readonly=True`` with the source: every index;
4. ``kvcache inspect`` and ``kvcache verify`` (the click CLI, in the child);
5. with the source: ``ds[i]`` for every index, ``__getitems__`` of all, one DataLoader
   epoch with 2 workers, ``close()``;
6. ``kvcache verify --repair``, then ``kvcache verify``, which must find the cache clean.

With ``--keyed`` the base cache is a keyed one (``key=fuzz_key``: ``"item-0042"``) and every
step passes the key function (the view reads its stored keys back as indices).

``--with-source`` runs only what a training job does, on every damaged file: the dataset
opened WITH its source (it must never raise: it repairs the file or serves from the
source), ``ds[i]`` of every index, ``__getitems__`` of all, one 2-worker DataLoader epoch,
``close()``, then ``kvcache verify``. There any exception, even a ``KvCacheError``, counts as
``foreign``; the table adds ``intact`` (records whose pages the damage did not touch),
``kept`` (of those, how many the first pass read back from the cache, i.e. survived
self-repair) and the share kept, and the actions the dataset took (``self_repair``).

``--compression zstd|lz4`` builds the base cache compressed, opens every dataset with
that compression (recomputed samples are stored compressed too), and makes the samples
compressible (a gradient plus 2 bits of noise; every 16th is 3x64x64, over a page even
compressed), so the damage lands on segment tables and compressed frames.

Each seed is classified by the worst thing that happened: ``signal`` (the child or a
DataLoader worker died of one), ``hang`` (past ``--timeout``), ``foreign`` (an exception
that is not a ``KvCacheError``, or a CLI exit that calls a damaged cache "not a cache"),
``wrong`` (a sample differing from the source, or verify still failing after a repair),
``refused`` (a ``KvCacheError``: the right answer for a damaged file), ``ok``. The table
is kinds x outcomes; ``--json`` writes every seed's details.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import torch
import torch.utils.data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import kvcache  # noqa: E402

PSIZE = 4096
N = 200
KINDS = ("span", "bitflip", "zero_page", "copy_page", "truncate", "append", "published")
# "published": damage to a published copy after publishing, where readers trust the publish
# record and skip the structural walk: one of these kinds, past the two meta pages and
# without changing the size, so the record (size + meta pages) still matches
INNER = ("span", "bitflip", "zero_page", "copy_page")
DAMAGED: list[int] = []  # the pages the last damage() touched (for the intact-record share)
OUTCOMES = ("ok", "refused", "wrong", "foreign", "signal", "hang")
# The documented limit (docs/reliability.md, "Published caches: the trust model"): a published
# copy damaged after publishing, whose record still matches, is not walked at open, so LMDB
# can take a signal on a damaged page (measured: 3 of 400 seeds, 2 in whole-tree cursor walks,
# 1 in a point read). Such a signal is counted and shown, but does not fail the run; a signal
# of any other kind does, and so does a wrong sample, a foreign exception or a hang of any kind.
ACCEPTED_SIGNAL_KINDS = {"published"}
_RANK = {o: r for r, o in enumerate(OUTCOMES)}
COMPRESSION: str | None = None  # --compression: the base cache and every dataset compress


class FuzzSource(torch.utils.data.Dataset):
    """Deterministic samples: ``(uint8 tensor, label)``; every 16th one spills to overflow pages."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple:
        side = 48 if i % 16 == 0 else 32
        g = np.random.default_rng(i)
        if COMPRESSION:
            side = 64 if i % 16 == 0 else 32
            img = (np.arange(side, dtype=np.uint8) * 3 + g.integers(0, 4, (3, side, side), dtype=np.uint8))
            return (torch.from_numpy(img.astype(np.uint8)), i)
        return (torch.from_numpy(g.integers(0, 256, (3, side, side), dtype=np.uint8)), i)


KEY: Any = None  # --keyed: the key function every step passes (key=)


def fuzz_key(i: int) -> str:
    return f"item-{i:04d}"


def _kw(view: bool = False) -> dict:
    kw: dict = {} if KEY is None else {"key": KEY}
    if COMPRESSION and not view:  # what a dataset writes (a view never writes)
        kw["compression"] = COMPRESSION
    return kw


def expected(i: int) -> tuple:
    return FuzzSource()[i]


def same(a: Any, b: Any) -> bool:
    return (type(a) is tuple and len(a) == 2 and isinstance(a[0], torch.Tensor) and a[0].dtype == b[0].dtype
            and a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and a[1] == b[1] and type(a[1]) is int)


# --------------------------------------------------------------------------- damage


def damage(path: str, kind: str, rng: random.Random, lo: int = 0) -> str:
    """Damage ``path/data.mdb`` in place, at byte ``lo`` or later; return a one-line description."""
    f = os.path.join(path, "data.mdb")
    size = os.path.getsize(f)
    pages = size // PSIZE
    DAMAGED.clear()
    if kind == "published":
        for name in os.listdir(path):
            os.chmod(os.path.join(path, name), 0o644)
        inner = rng.choice(INNER)
        return "published copy: " + damage(path, inner, rng, lo=2 * PSIZE)
    with open(f, "r+b") as fh:
        if kind == "span":
            places = []
            for _ in range(rng.randint(1, 16)):
                n = rng.choice((rng.randint(1, 64), rng.randint(1, 4096)))
                off = rng.randrange(lo, max(lo + 1, size - n))
                fh.seek(off)
                fh.write(rng.randbytes(n))
                DAMAGED.extend(range(off // PSIZE, (off + n - 1) // PSIZE + 1))
                places.append(f"{n}@{off}")
            return "spans " + ",".join(places)
        if kind == "bitflip":
            places = []
            for _ in range(rng.randint(1, 16)):
                off = rng.randrange(lo, size)
                fh.seek(off)
                b = fh.read(1)[0] ^ (1 << rng.randrange(8))
                fh.seek(off)
                fh.write(bytes([b]))
                DAMAGED.append(off // PSIZE)
                places.append(str(off))
            return "bits " + ",".join(places)
        if kind == "zero_page":
            p = rng.randrange(lo // PSIZE, pages)
            fh.seek(p * PSIZE)
            fh.write(bytes(PSIZE))
            DAMAGED.append(p)
            return f"page {p} zeroed"
        if kind == "copy_page":
            a, b = rng.randrange(pages), rng.randrange(lo // PSIZE, pages)
            fh.seek(a * PSIZE)
            data = fh.read(PSIZE)
            fh.seek(b * PSIZE)
            fh.write(data)
            DAMAGED.append(b)
            return f"page {a} copied over {b}"
        if kind == "truncate":
            n = rng.randrange(size)
            fh.truncate(n)
            DAMAGED.extend(range(n // PSIZE, pages + 1))
            return f"truncated to {n}"
        if kind == "append":
            n = rng.choice((rng.randint(1, 4096), rng.randint(1, 1 << 20)))
            fh.seek(0, 2)
            fh.write(rng.randbytes(n))
            return f"{n} bytes appended"
    raise ValueError(kind)


# --------------------------------------------------------------------------- the child's steps


class Seed:
    """What one child saw: per step, the worst outcome and a note."""

    def __init__(self) -> None:
        self.steps: dict[str, tuple[str, str]] = {}

    def note(self, step: str, outcome: str, what: str = "") -> None:
        old = self.steps.get(step)
        if old is None or _RANK[outcome] > _RANK[old[0]]:
            self.steps[step] = (outcome, what[:300])

    def run(self, step: str, fn: Any) -> Any:
        _mark(step, self.steps)
        try:
            out = fn()
        except kvcache.KvCacheError as exc:
            self.note(step, "refused", f"{type(exc).__name__}: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
            what = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
            sig = "killed by signal" in str(exc) or "exited unexpectedly" in str(exc)
            self.note(step, "signal" if sig else "foreign", what + " | " + traceback.format_exc()[-600:])
            return None
        self.note(step, "ok")
        return out


def _items(s: Seed, step: str, get: Any, indices: Any) -> None:
    for i in indices:
        try:
            v = get(i)
        except kvcache.KvCacheError as exc:
            s.note(step, "refused", f"{i}: {type(exc).__name__}: {exc}")
            continue
        if not same(v, expected(i)):
            s.note(step, "wrong", f"index {i}")
    s.note(step, "ok")


def _check_batch(s: Seed, step: str, got: list | None, indices: list) -> None:
    if got is None:
        return
    for i, v in zip(indices, got):
        if not same(v, expected(i)):
            s.note(step, "wrong", f"index {i}")
    if len(got) != len(indices):
        s.note(step, "wrong", "batch length")


_PROGRESS_FD: int | None = None  # the child's pipe: each step is announced before it runs


def _mark(step: str, done: dict) -> None:
    """Tell the driver which step runs now and what the finished ones gave, so that a
    signal can be pinned on a step without losing the steps before it."""
    if _PROGRESS_FD is not None:
        os.write(_PROGRESS_FD, f"#{json.dumps(done)}\n@{step}\n".encode())


def _cli(s: Seed, step: str, args: list[str]) -> int | None:
    _mark(step, s.steps)
    from click.testing import CliRunner

    from kvcache.cli import cli

    r = CliRunner().invoke(cli, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        exc = r.exception
        s.note(step, "foreign", f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
        return None
    if r.exit_code == 0:
        s.note(step, "ok")
    elif r.exit_code == 1:
        s.note(step, "refused", (r.output or "")[-200:])
    else:  # 2 says "not a cache / usage": wrong for a damaged kvcache cache
        s.note(step, "foreign", f"exit {r.exit_code}: {(r.output or '')[-200:]}")
    return r.exit_code


def child_steps(path: str, quick: bool) -> dict:
    warnings.simplefilter("ignore")
    s = Seed()
    src = FuzzSource()
    idx = list(range(N))

    def nosource() -> None:
        ds = kvcache.LmdbCachedDataset(None, path, **_kw())
        try:
            n = min(len(ds), N)
            _items(s, "source=None", ds.__getitem__, range(n))
            s.run("source=None", lambda: _check_batch(s, "source=None", ds.__getitems__(list(range(n))),
                                                       list(range(n))))
        finally:
            ds.close()

    s.run("source=None", nosource)

    def readonly() -> None:
        with kvcache.LmdbCachedDataset(src, path, readonly=True, **_kw()) as ds:
            _items(s, "readonly", ds.__getitem__, idx)

    s.run("readonly", readonly)
    if not quick:
        _cli(s, "inspect", ["inspect", path])
        _cli(s, "verify", ["verify", path])

    def with_source() -> None:
        with kvcache.LmdbCachedDataset(src, path, **_kw()) as ds:
            _items(s, "source", ds.__getitem__, idx)
            _check_batch(s, "source", s.run("source", lambda: ds.__getitems__(idx)), idx)
            if not quick:
                dl = torch.utils.data.DataLoader(ds, batch_size=25, num_workers=2,
                                                 collate_fn=lambda b: b, multiprocessing_context="fork")
                got = [x for batch in dl for x in batch]
                _check_batch(s, "dataloader", got, idx)

    s.run("source", with_source)

    # the view last: its keys() walks whole trees with a cursor (where LMDB asserts on a
    # damaged page of a published copy that was not walked at open)
    def view() -> None:
        with kvcache.open_cache(path, **_kw(view=True)) as v:
            v.info()
            keys = list(v.keys())
            if KEY is not None:  # the stored keys, as the indices they were made from (v[i] reads by key)
                bad = [k for k in keys if not (isinstance(k, str) and k[:5] == "item-" and k[5:].isdigit())]
                if bad:
                    s.note("view", "wrong", f"keys {bad[:3]!r}")
                keys = [int(k[5:]) for k in keys if k not in bad]
            _items(s, "view", v.__getitem__, keys)  # MissingSampleError / CorruptRecordError: refused

            def get(i: int) -> Any:  # Mapping.get: the default (None) for a missing index
                got = v.get(i)
                if got is None:
                    raise kvcache.MissingSampleError(f"{i}: get() gave the default")
                return got

            _items(s, "view", get, keys)

    s.run("view", view)
    if not quick:
        _cli(s, "verify --repair", ["verify", "--repair", path])
        rc = _cli(s, "verify after repair", ["verify", path])
        if rc not in (0, None) and "verify --repair" in s.steps and s.steps["verify --repair"][0] == "ok":
            s.note("verify after repair", "wrong", "verify still fails after a repair that succeeded")
    return {k: list(v) for k, v in s.steps.items()}


def child_with_source(path: str) -> dict:
    """What a training job does with a damaged cache and its source (``--with-source``)."""
    warnings.simplefilter("ignore")
    s = Seed()
    src = FuzzSource()
    idx = list(range(N))
    hits: list[int] = []
    info: dict[str, Any] = {}

    def train() -> None:
        ds = kvcache.LmdbCachedDataset(src, path)
        rep = ds.self_repair
        info["self_repair"] = rep.action if rep is not None else "none"
        for i in idx:
            before = ds.stats().hits
            if not same(ds[i], expected(i)):
                s.note("source", "wrong", f"index {i}")
            if ds.stats().hits > before:
                hits.append(i)
        _check_batch(s, "source", ds.__getitems__(idx), idx)
        dl = torch.utils.data.DataLoader(ds, batch_size=25, num_workers=2,
                                         collate_fn=lambda b: b, multiprocessing_context="fork")
        _check_batch(s, "dataloader", [x for batch in dl for x in batch], idx)
        ds.close()

    try:
        train()
        s.note("source", "ok")
    except Exception as exc:  # noqa: BLE001 - with a source, nothing may escape, not even a KvCacheError
        s.note("source", "signal" if "exited unexpectedly" in str(exc) or "killed by signal" in str(exc)
               else "foreign", f"{type(exc).__module__}.{type(exc).__name__}: {exc} | "
               + traceback.format_exc()[-600:])
    _cli(s, "verify", ["verify", path])
    steps = {k: list(v) for k, v in s.steps.items()}
    return {"steps": steps, "hits": hits, **info}


def record_pages(base: str) -> dict[int, set[int]]:
    """The pages each sample record of ``base`` lives on (its leaf, its overflow run)."""
    import struct

    with open(os.path.join(base, "data.mdb"), "rb") as f:
        buf = f.read()
    metas = [struct.unpack_from("<QQ", buf, p * PSIZE + 16 + 120) for p in (0, 1)]
    off = (0, 1)[max((0, 1), key=lambda k: metas[k][1])] * PSIZE + 16 + 24 + 48
    out: dict[int, set[int]] = {}

    def walk(pgno: int, db: str) -> None:
        b = pgno * PSIZE
        flags, lower = struct.unpack_from("<HH", buf, b + 10)
        for ptr in struct.unpack_from(f"<{(lower - 16) // 2}H", buf, b + 16):
            lo, hi, nfl, ks = struct.unpack_from("<HHHH", buf, b + ptr)
            if flags & 1:
                walk(lo | hi << 16 | nfl << 32, db)
                continue
            key = buf[b + ptr + 8:b + ptr + 8 + ks]
            if db == "main" and nfl & 2 and key == b"samples":
                walk(struct.unpack_from("<Q", buf, b + ptr + 8 + ks + 40)[0], "samples")
            elif db == "samples":
                pages = {pgno}
                if nfl & 1:
                    first = struct.unpack_from("<Q", buf, b + ptr + 8 + ks)[0]
                    pages.update(range(first, first + (lo | hi << 16) // PSIZE + 1))
                out[int.from_bytes(key, "big")] = pages

    walk(struct.unpack_from("<Q", buf, off + 40)[0], "main")
    return out


# --------------------------------------------------------------------------- driver


def build_base(root: str) -> str:
    path = os.path.join(root, "base")
    with kvcache.LmdbCachedDataset(FuzzSource(), path, **_kw()) as ds:
        ds.build()
    kvcache.publish(path, os.path.join(root, "published"))  # the base of the "published" kind
    return path


def run_seed(base: str, work: str, seed: int, kind: str, quick: bool, timeout: float,
             with_source: bool = False, places: dict | None = None) -> dict:
    path = os.path.join(work, f"s{seed}")
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(os.path.join(os.path.dirname(base), "published") if kind == "published" else base, path)
    what = damage(path, kind, random.Random(seed))
    touched = set(DAMAGED)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the driver
        code = 0
        try:
            os.close(rfd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            global _PROGRESS_FD
            _PROGRESS_FD = wfd
            out = json.dumps(child_with_source(path) if with_source else child_steps(path, quick)).encode()
            with os.fdopen(wfd, "wb") as w:
                w.write(b"\n" + out)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    os.close(wfd)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.02)
    rec: dict[str, Any] = {"seed": seed, "kind": kind, "damage": what}
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rec.update(outcome="hang", steps={})
    else:
        with os.fdopen(rfd, "rb") as r:
            lines = r.read().split(b"\n")
        rfd = -1
        marks = [x[1:].decode() for x in lines if x.startswith(b"@")]
        before = next((json.loads(x[1:]) for x in reversed(lines) if x.startswith(b"#")), {})
        raw = next((x for x in reversed(lines) if x.startswith(b"{")), b"")
        if os.WIFSIGNALED(status):
            rec.update(outcome="signal", steps=before, signal=signal.Signals(os.WTERMSIG(status)).name,
                       died_in=marks[-1] if marks else "opening")
        elif not raw:
            rec.update(outcome="foreign", steps={}, note=f"child exited {os.WEXITSTATUS(status)} without a report")
        else:
            steps = json.loads(raw)
            if with_source:
                intact = {i for i, pages in (places or {}).items() if not pages & touched} if kind != "published" else set()
                rec.update(intact=len(intact), kept=len(intact & set(steps["hits"])),
                           self_repair=steps["self_repair"])
                steps = steps["steps"]
            rec["steps"] = steps
            rec["outcome"] = max((o for o, _ in steps.values()), key=_RANK.__getitem__, default="ok")
    if rfd >= 0:
        os.close(rfd)
    shutil.rmtree(path, ignore_errors=True)
    return rec


def table(recs: list[dict]) -> str:
    """Kinds x outcomes; ``served`` counts seeds where the dataset with its source returned
    every sample (not refused at open), ``repaired`` those where verify was clean after
    ``verify --repair`` (both of the seeds that ran those steps)."""
    if recs and "intact" in recs[0]:
        return table_with_source(recs)
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        c = counts[r["kind"]]
        c[r["outcome"]] += 1
        steps = r.get("steps", {})
        c["served"] += steps.get("source", ["?"])[0] == "ok"
        c["repaired"] += steps.get("verify after repair", ["?"])[0] == "ok"
    kinds = [k for k in KINDS if k in counts]
    cols = [*OUTCOMES, "served", "repaired"]
    lines = ["| kind | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    total: Counter = Counter()
    for k in kinds:
        c = counts[k]
        total.update(c)
        lines.append(f"| {k} | {sum(c[o] for o in OUTCOMES)} | " + " | ".join(str(c[o]) for o in cols) + " |")
    lines.append(f"| **all** | {sum(total[o] for o in OUTCOMES)} | " + " | ".join(str(total[o]) for o in cols) + " |")
    died = Counter((r["kind"], r.get("died_in", "?"), r.get("signal", "?")) for r in recs if r["outcome"] == "signal")
    if died:
        lines += ["", "Signals, by the step that took them: " + "; ".join(
            f"{k} in {step}: {n} ({sig})" for (k, step, sig), n in sorted(died.items()))]
    return "\n".join(lines)


def table_with_source(recs: list[dict]) -> str:
    """``--with-source``: kinds x outcomes, the intact records kept, the repairs done."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        c = counts[r["kind"]]
        c[r["outcome"]] += 1
        c["intact"] += r.get("intact", 0)
        c["kept"] += r.get("kept", 0)
        c["act:" + r.get("self_repair", "?")] += 1
    acts = ("none", "patched", "salvaged", "repaired_by_another", "unstored")
    cols = ["ok", "refused", "foreign", "wrong", "signal", "hang"]
    lines = ["| kind | seeds | " + " | ".join(cols) + " | intact | kept | share | "
             + " | ".join(acts) + " |", "|---" * (len(cols) + len(acts) + 5) + "|"]
    total: Counter = Counter()
    for k in [k for k in KINDS if k in counts] + ["**all**"]:
        c = total if k == "**all**" else counts[k]
        if k != "**all**":
            total.update(c)
        share = f"{100 * c['kept'] / c['intact']:.1f}%" if c["intact"] else "-"
        lines.append(f"| {k} | {sum(c[o] for o in OUTCOMES)} | " + " | ".join(str(c[o]) for o in cols)
                     + f" | {c['intact']} | {c['kept']} | {share} | " + " | ".join(str(c['act:' + a]) for a in acts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, help="how many seeds")
    p.add_argument("--start", type=int, default=0, help="the first seed")
    p.add_argument("--kind", default=",".join(KINDS), help="comma list of " + ",".join(KINDS))
    p.add_argument("--quick", action="store_true", help="skip the DataLoader and CLI steps")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a seed counts as a hang")
    p.add_argument("--json", default=None, help="write every seed's record here")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--merge", nargs="+", default=None, help="print one table from these --json files")
    p.add_argument("--keyed", action="store_true", help="a keyed cache (key=), every step with its key function")
    p.add_argument("--with-source", action="store_true",
                   help="open every damaged file with its source (self-repair): nothing may raise")
    p.add_argument("--compression", choices=["zstd", "lz4"], default=None,
                   help="build and fill the caches compressed (compressible samples)")
    a = p.parse_args(argv)
    global KEY, COMPRESSION
    COMPRESSION = a.compression
    KEY = fuzz_key if a.keyed else None
    if a.merge:
        recs = [r for f in a.merge for r in json.load(open(f))]
        seeds = sorted(r["seed"] for r in recs)
        print(f"{len(recs)} seeds ({seeds[0]}..{seeds[-1]}) from {len(a.merge)} runs\n")
        print(table(recs))
        return 1 if any(_fails(r) for r in recs) else 0
    kinds = [k for k in a.kind.split(",") if k]
    bad = set(kinds) - set(KINDS)
    if bad:
        p.error(f"unknown kind(s) {sorted(bad)}; choose from {','.join(KINDS)}")
    root = tempfile.mkdtemp(prefix="kvfuzz-", dir=a.dir)
    recs = []
    t0 = time.monotonic()
    try:
        base = build_base(root)
        places = record_pages(base) if a.with_source else None
        for seed in range(a.start, a.start + a.n):
            kind = kinds[seed % len(kinds)]
            rec = run_seed(base, root, seed, kind, a.quick, a.timeout, a.with_source, places)
            recs.append(rec)
            if rec["outcome"] not in ("ok", "refused"):
                detail = (f"{rec['signal']} in step {rec['died_in']}" if rec.get("signal") else None) or {
                    k: v for k, v in rec.get("steps", {}).items()
                                                if v[0] not in ("ok", "refused")}
                print(f"seed {seed} {kind}: {rec['outcome']} ({rec['damage'][:80]}) {detail}", flush=True)
            done = len(recs)
            if done % 50 == 0:
                print(f"[{done}/{a.n} seeds, {time.monotonic() - t0:.0f}s]", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    mode = ("with source" if a.with_source else "quick (no DataLoader/CLI steps)" if a.quick
            else "all steps") + (", keyed" if a.keyed else "")
    if a.compression:
        mode += f", {a.compression}-compressed"
    print(f"\n{len(recs)} seeds ({a.start}..{a.start + a.n - 1}), {mode}, {time.monotonic() - t0:.0f}s\n")
    print(table(recs))
    return 1 if any(_fails(r) for r in recs) else 0


def _fails(r: dict) -> bool:
    if r["outcome"] in ("ok", "refused"):
        return False
    return not (r["outcome"] == "signal" and r["kind"] in ACCEPTED_SIGNAL_KINDS)


if __name__ == "__main__":
    sys.exit(main())
