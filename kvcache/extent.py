"""Truncation guard: never touch a page of ``data.mdb`` that lies past the end of the file.

Reading a page past EOF kills the process with SIGBUS (every truncated file that crashed
in fault-injection runs did so on its first access to a missing page). The cheap guard
compares the file size with ``(last_pgno + 1) * page size`` from the meta page; it can
trip on healthy files right after a commit (seen 6-8 pages short), so when it trips the
precise check runs in a child process: walk every database with a cursor, touching every
branch and leaf page and the first and last page of every overflow value. A signal in
the child means a reachable page lies past EOF.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from .errors import CacheCorruptError

__all__ = ["check_extent_in_child", "size_guard_ok", "used_bytes"]

_WALK = r"""
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=8, subdir=True, create=False)
names = []
with env.begin() as txn:
    for k, _ in txn.cursor():
        names.append(bytes(k))
dbs = [None]
for n in names:
    try:
        dbs.append(env.open_db(n, create=False))
    except lmdb.Error:
        pass
for db in dbs:
    with env.begin(db=db, buffers=True) as txn:
        for k, v in txn.cursor():
            if len(v):
                v[0]; v[-1]
print("ok")
"""


def used_bytes(env: Any) -> int:
    """What an open LMDB environment uses: ``(last_pgno + 1) * page size`` from its meta
    page (the file may be longer: LMDB reuses the tail a killed writer left behind)."""
    return (env.info()["last_pgno"] + 1) * env.stat()["psize"]


def size_guard_ok(env: Any, path: str) -> bool:
    """True when ``data.mdb`` is at least as long as the meta page says it must be."""
    return os.path.getsize(os.path.join(path, "data.mdb")) >= used_bytes(env)


def check_extent_in_child(path: str, timeout: float = 600.0) -> None:
    """Walk the cache in a child process; raise CacheCorruptError if the walk dies.

    Raises:
        CacheCorruptError: "truncated ..." when the child is killed by a signal, or
            "damaged ..." when LMDB reports an error during the walk.
    """
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    proc = subprocess.run([sys.executable, "-c", _WALK, path], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise CacheCorruptError(
            f"{path}: truncated: data.mdb is {size} bytes but pages reachable from its root "
            f"lie past the end (reading them raised {name} in a child process); "
            f"recover what is readable with `kvcache verify --repair {path}` or rebuild"
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise CacheCorruptError(f"{path}: damaged: walking the file failed ({last})")
