"""Regenerate docs/cli.md by running every ``kvcache`` command on a real demo cache.

    python tools/gen_cli_docs.py [--n 2000] [--out docs/cli.md]

The demo source (``demo`` below) makes CIFAR-sized samples and spends about 1 ms of CPU
per item, like a decode or augmentation would; ``build`` is run with 1 and 2 workers.
Every block in the output is what the command printed, so the docs cannot drift.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import torch

COST_S = 0.001
N = int(os.environ.get("KVDEMO_N", "2000"))


class Demo(torch.utils.data.Dataset):
    """CIFAR-like samples: ``{'image': uint8[3,32,32], 'label': int}``, ~1 ms each."""

    # seed stands for the contents of the image files, which the fingerprint does not see
    kvcache_fingerprint_exclude = ("seed",)

    def __init__(self, n: int = N, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        end = time.perf_counter() + COST_S
        while time.perf_counter() < end:  # stands in for decoding and augmenting
            pass
        rng = np.random.default_rng(i + self.seed)
        return {"image": torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)),
                "label": int(rng.integers(10))}

    def key(self, i: int) -> str:
        """A stable identity of sample ``i`` (``--key key``): its file name, say."""
        return f"img/{i + self.seed:06d}.png"


def demo() -> Demo:
    return Demo()


class Flaky(Demo):
    """Two of the "image files" are truncated: the source raises for them."""

    def __getitem__(self, i: int) -> dict:
        if i in (13, 1207 % self.n):
            raise OSError(f"image {i}.jpg: truncated file")
        return super().__getitem__(i)


def flaky() -> Demo:
    return Flaky()


def changed() -> Demo:
    """The same class and length, other samples: what a changed data file looks like."""
    return Demo(seed=1)


def grown() -> Demo:
    """The demo with 200 items appended."""
    return Demo(N + 200)


def shrunk() -> Demo:
    """The demo with its last 500 items removed."""
    return Demo(N - 500)


HERE = os.path.abspath(__file__)
SPEC = f"{HERE}:demo"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "..", "docs", "cli.md"))
    args = ap.parse_args()
    os.environ["KVDEMO_N"] = str(args.n)
    work = tempfile.mkdtemp(prefix="kvcache-docs-")
    sections: list[str] = []

    def run(*cmd: str, note: str = "", n: int | None = None) -> subprocess.CompletedProcess:
        shown = " ".join(c.replace(HERE, "tools/gen_cli_docs.py") for c in cmd)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "kvcache", *cmd], cwd=work, capture_output=True,
                           text=True, env=dict(os.environ, KVDEMO_N=str(n or args.n)), check=False)
        dt = time.perf_counter() - t0
        out = (p.stdout + p.stderr).replace(work + "/", "").replace(work, ".").rstrip()
        block = f"```console\n$ kvcache {shown}\n{out}\n$ echo $?\n{p.returncode}\n```"
        sections.append((note + "\n\n" if note else "") + block)
        print(f"[{dt:5.1f}s] kvcache {shown} -> {p.returncode}", file=sys.stderr)
        return p

    def h(title: str, text: str = "") -> None:
        sections.append(f"## {title}\n\n{textwrap.dedent(text).strip()}".rstrip())

    try:
        h("Usage")
        run("--help")
        h("build", """
            `kvcache build SPEC PATH [--workers N] [--version V]` fills every missing index.
            SPEC is `module:callable` (looked up from the current directory, as `python -m`
            does) or `path/to/file.py:callable` (imported under the module name a training
            script importing it gets: `myds.py` is module `myds`), returning the source
            dataset, so the cache built is the one training with that source uses. Workers compute and encode samples; one writer (the command itself)
            commits them in batches, so Ctrl-C (exit 130) keeps every written batch and a
            second run resumes. A progress bar with items/s and ETA is drawn on a terminal.
            `--distributed` shares the work among the ranks of a `torchrun` job
            (`docs/scale.md`). The demo source costs about 1 ms per item:""")
        load = os.getloadavg()[0]
        run("build", SPEC, "cache", "--workers", "1")
        run("build", SPEC, "cache2", "--workers", "2")
        load = max(load, os.getloadavg()[0])
        sections.append(f"(Generated on {os.cpu_count()} CPUs with a load average of {load:.1f}: "
                        "2 workers gain only as far as a core is free; `tools/bench_build.py` "
                        "measures the ratios.)")
        run("build", SPEC, "cache", note="Run again, it has nothing left to do:")
        run("build", SPEC.replace(":demo", ":flaky"), "flaky", note="A source that raises for an index "
            "stops the build with one line naming it (what was computed is kept):")
        run("build", SPEC.replace(":demo", ":flaky"), "flaky", "--skip-errors", note="`--skip-errors` "
            "stores every other sample and lists the indices whose source raised (exit 1); a later "
            "build tries them again:")
        h("inspect", """
            `kvcache inspect PATH [--json]` reads the info rows only: counts, sizes and layouts
            come from the tally of metadata rows that every writer keeps in the cache (one
            written before the tally existed has its metadata rows walked instead; no record
            is decoded either way). File bytes come from the environment's last page, not the
            file length. Past 16 distinct layouts, further ones are counted together.""")
        run("inspect", "cache")
        h("verify", """
            `kvcache verify PATH [--repair] [--spot-check N --source SPEC] [--json]` checks
            every record (checksum, decoding, metadata row) in a child process: a damaged
            file that makes LMDB abort or raise SIGBUS is reported with the signal.""")
        run("verify", "cache")
        run("verify", "cache", "--spot-check", "20", "--source", SPEC,
            note="A spot check recomputes random samples from the source and compares:")
        run("verify", "cache", "--spot-check", "20", "--source", SPEC.replace(":demo", ":changed"),
            note="The fingerprint cannot see a source whose code is unchanged while its output "
            "changed; a spot check can (`--repair` would replace the mismatched records):")
        _corrupt(os.path.join(work, "cache"))
        run("verify", "cache", note="After overwriting 8 bytes inside one record of `data.mdb`:")
        run("verify", "--json", "cache")
        run("verify", "--repair", "cache", note="`--repair` removes bad records and orphan rows "
            "(or, for a broken file, copies every readable good record into a fresh one), "
            "then verifies again:")
        h("get", "`kvcache get PATH INDEX [--out DIR] [--json]` prints a sample's structure; "
                 "`--out` writes each array leaf as a plain `.npy` file.")
        run("get", "cache", "3", "--out", "sample3")
        h("compact", """
            `kvcache compact PATH [--json]`: `copy(compact=True)` into a sibling directory,
            verify the copy, swap `data.mdb` in. Every kvcache opener holds `kvcache.lock`
            shared; compact takes it exclusively without waiting and refuses while the
            cache is in use.""")
        holder = subprocess.Popen(
            [sys.executable, "-c", ("import sys, kvcache; sys.path.insert(0, sys.argv[2]);"
             "import gen_cli_docs as g; ds = kvcache.LmdbCachedDataset(g.demo(), sys.argv[1]); ds[0];"
             "print('ready', flush=True); sys.stdin.read()"), os.path.join(work, "cache"),
             os.path.dirname(HERE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, KVDEMO_N=str(args.n)))
        assert holder.stdout.readline().strip() == "ready"
        run("compact", "cache", note="While a training process has the cache open:")
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()
        run("build", SPEC, "cache", "--version", "2", n=args.n * 3 // 4, note="A new version "
            "of the source (`--version 2`, and shorter) fills the cache again; the old rows are "
            "never served, and those it did not overwrite stay behind:")
        h("gc", "`kvcache gc PATH [--json]` drops rows written by sources other than the "
                "current one and says what a compact would give back.")
        run("gc", "cache")
        run("compact", "cache", note="Once nobody has it open:")
        h("merge", """
            `kvcache merge DEST SRC... [--json]` combines caches of the same source (built on
            several machines or ranks). Checksums are verified on the way; a key DEST
            already holds is kept. Here two halves were filled separately:""")
        _halves(work, args.n)
        run("merge", "merged", "half-a", "half-b")
        run("merge", "merged", "cache", note="Caches of a different source are refused, "
            "naming what differs:")
        h("publish", """
            `kvcache publish SRC DEST [--force] [--partial] [--json]` makes an immutable copy of a cache
            for shared or network storage: compacted, verified record by record, marked
            published, fsynced, and renamed into place (DEST appears complete or not at all).
            Readers open it read-only without any lock file, from any number of hosts
            (docs/network.md). An existing DEST is replaced only with `--force`, atomically.""")
        run("publish", "half-a", "shared/half", note="A cache lacking samples of its source is "
            "refused (a published cache is immutable: every reader would compute them); "
            "`--partial` publishes it anyway:")
        run("publish", "cache", "shared/cache")
        run("inspect", "shared/cache", note="Inspect says it is published (and on which filesystem):")
        run("publish", "cache", "shared/cache", note="Publishing over an existing cache needs `--force`:")
        run("publish", "--force", "cache", "shared/cache")
        run("compact", "shared/cache", note="A published cache is never changed in place:")
        h("Keyed caches (`--key`)", """
            `kvcache build SPEC PATH --key NAME` builds a keyed cache (`key=` in Python): each
            sample is stored under the key the source's method NAME returns for it (or a
            `module:callable` returning the key function), so appending, removing or
            reordering items keeps every sample whose key is unchanged.""")
        run("build", SPEC, "keyed", "--key", "key")
        run("build", SPEC.replace(":demo", ":grown"), "keyed", "--key", "key",
            note="200 items appended: only they are computed.")
        run("inspect", "keyed", note="Inspect says the cache is keyed (its fingerprint has no length):")
        run("get", "keyed", "--key", "img/000003.png", note="`kvcache get PATH --key K` reads by key:")
        run("get", "keyed", "3", note="A keyed cache has no index without its key function:")
        run("gc", "keyed", "--source", SPEC.replace(":demo", ":shrunk"), "--key", "key",
            note="With the current source (here 500 items removed, the 200 appended gone too), "
                 "`gc` drops the records whose keys the source no longer has:")
        h("stage", """
            `kvcache stage SRC DIR [--max-bytes N] [--json]` copies the published cache SRC
            (usually on shared storage) to node-local DIR and prints the local copy's path; run
            again, by any process or job on the node, it reuses the copy (one `stat` of SRC).
            It copies again when SRC was published again (`--force`) or the local copy is
            damaged. `--max-bytes` (`500M`, `20G`) bounds all copies in DIR: the least recently
            used ones, not in use, are evicted first. Without room, a warning says so and SRC
            itself is printed (read it in place). A progress bar (MiB/s) is drawn on a
            terminal (docs/network.md, "Staging to node-local disk").""")
        run("stage", "shared/cache", "local")
        run("stage", "shared/cache", "local", "--json", note="Again: the copy is reused:")
        run("stage", "shared/cache", "local2", "--max-bytes", "1M",
            note="A bound it cannot fit under: read in place:")
        _write(args.out, sections)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _corrupt(path: str) -> None:
    from kvcache import open_cache

    with open_cache(path) as v:
        rec = v.record(5)
    data = os.path.join(path, "data.mdb")
    with open(data, "r+b") as f:
        raw = f.read()
        pos = raw.find(rec[-64:])
        f.seek(pos + 10)
        f.write(b"\xff" * 8)


def _halves(work: str, n: int) -> None:
    from kvcache import LmdbCachedDataset
    from kvcache.maintenance import load_spec

    for name, idx in (("half-a", range(n // 2)), ("half-b", range(n // 2, n))):
        with LmdbCachedDataset(load_spec(SPEC), os.path.join(work, name)) as ds:
            for i in idx:
                ds[i]


def _write(out: str, sections: list[str]) -> None:
    head = textwrap.dedent("""\
        # The `kvcache` command

        Generated by `python tools/gen_cli_docs.py`: every block below is the real output
        of the command, run on a demo cache (paths are relative to a scratch directory).
        `python -m kvcache` is the same command.

        Exit codes: **0** ok; **1** problems found (bad records, a busy or damaged cache,
        a source that raised, a permission or other OS error, any other error); **2** usage
        error, or a path that is not a cache (or a cache of another format, a publish
        destination that exists without `--force`, a partial cache without `--partial`);
        **130** a build stopped by Ctrl-C (run it again to resume). Errors are one line on
        stderr, never a traceback (`KVCACHE_DEBUG=1` shows the traceback of an unexpected
        one); warnings are one line each (`kvcache: warning: ...`).
        Every reporting command takes `--json`. Progress bars appear only on a terminal,
        never with `--json`.
        """)
    with open(out, "w") as f:
        f.write(head + "\n" + "\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
