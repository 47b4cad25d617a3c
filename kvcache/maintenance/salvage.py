"""Salvage: copy every readable good record of a damaged cache into a fresh file, in a
child process (LMDB may abort or take SIGBUS reading a damaged file: the child may die,
the caller cannot), restarted past whatever kills it; and the runner of that child, which
``verify``'s scan shares."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

import lmdb

from ..errors import CacheCorruptError, KvCacheError
from ._common import open_raw, sibling_dir, swap_in, used_bytes

__all__ = ["MAX_SALVAGE_RESTARTS", "run_child", "salvage"]

MAX_SALVAGE_RESTARTS = 64


# Run the scan child (maintenance/_scan.py) without executing kvcache/__init__ (which
# imports torch: seconds per child).
_BOOT = """
import sys, types
d = sys.argv.pop(1)
for name, p in (("kvcache", d), ("kvcache.maintenance", d + "/maintenance")):
    m = types.ModuleType(name)
    m.__path__ = [p]
    sys.modules[name] = m
from kvcache.maintenance._scan import main
sys.exit(main(sys.argv[1:]))
"""
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(args: list[str], on_line: Callable[[dict], None]) -> tuple[int, str]:
    """Run ``maintenance/_scan.py`` with ``args``; feed its JSON lines to ``on_line``;
    return (rc, stderr)."""
    with tempfile.TemporaryFile(mode="w+") as err, subprocess.Popen(
            [sys.executable, "-c", _BOOT, _PKG, *args],
            stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            on_line(msg)
        rc = proc.wait()
        err.seek(0)
        return rc, err.read()[-4000:]


def salvage(path: str, start_empty: bool = False) -> int:
    """Copy every readable good record into a fresh environment and swap it in (the
    caller holds ``kvcache.lock`` exclusively); return how many records were kept.

    The copy runs in a child process, restarted past any key or walk that kills it.
    With ``start_empty``, a file nothing can be read from (damaged meta pages) is replaced
    by an empty cache instead of raising (a dataset with a source recomputes it all).

    Raises:
        CacheCorruptError: nothing could be salvaged (without ``start_empty``).
    """
    try:
        return _salvage(path)
    except CacheCorruptError:
        if not start_empty:
            raise
    tmp = sibling_dir(path, "empty")
    src = sibling_dir(path, "nothing")
    try:
        env = lmdb.open(src, subdir=True, create=True, max_dbs=4, map_size=1 << 20)
        for name in (b"samples", b"meta", b"info"):
            env.open_db(name)
        env.close()
        run_child([src, "--salvage", tmp, "[]", "[]"], lambda msg: None)
        swap_in(path, tmp)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)


def _salvage(path: str) -> int:
    tmp = sibling_dir(path, "repair")
    # Read from a copy padded to the length its meta page claims: a page past the end of
    # a truncated file then reads as zeros (an LMDB error or abort, handled per key below)
    # instead of SIGBUS on every walk.
    src = sibling_dir(path, "salvage")
    shutil.copyfile(os.path.join(path, "data.mdb"), os.path.join(src, "data.mdb"))
    try:
        env = open_raw(src)
        need = used_bytes(env)
        env.close()
        if os.path.getsize(os.path.join(src, "data.mdb")) < need:
            os.truncate(os.path.join(src, "data.mdb"), need)
    except KvCacheError:
        pass  # the salvage child reports what it can
    skip: set[int | str] = set()
    skip_walks: set[str] = set()
    state: dict[str, Any] = {}
    try:
        for _ in range(MAX_SALVAGE_RESTARTS):
            state.clear()

            def on_line(msg: dict) -> None:
                if "try" in msg:
                    state["last"] = msg["try"]
                elif "walk" in msg:
                    state["walk"] = msg["walk"]
                elif "result" in msg:
                    state["result"] = msg["result"]

            rc, err = run_child([src, "--salvage", tmp, json.dumps(sorted(skip, key=str)),
                                  json.dumps(sorted(skip_walks))], on_line)
            if "result" in state:
                break
            if rc < 0 and "walk" in state and "last" not in state:
                skip_walks.add(state["walk"])  # walking this database kills the reader
                continue
            if rc < 0 and "last" in state:
                skip.add(state["last"])  # this key's pages kill the reader: leave it behind
                continue
            last = (err.strip().splitlines() or [f"exit status {rc}"])[-1]
            raise CacheCorruptError(f"{path}: cannot salvage the cache ({last}); rebuild it")
        else:
            raise CacheCorruptError(
                f"{path}: salvage gave up after {MAX_SALVAGE_RESTARTS} crashes; rebuild the cache")
        swap_in(path, tmp)
        return state["result"]["copied"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)


