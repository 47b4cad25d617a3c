"""Helpers for the fault suite: deterministic sources, child-process runs, a page walker.

Every read of a deliberately damaged cache happens in a child process (``run_child``),
and ``check_child`` fails the test with the signal's name when the child died of one.
The page walker reads LMDB 0.9 pages directly (16-byte page header, meta pages 0 and 1)
to find where a cached record's bytes live, so a test can damage exactly that record.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import torch.utils.data

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
PSIZE = 4096
P_BRANCH, P_LEAF, P_OVERFLOW = 1, 2, 4
F_BIGDATA, F_SUBDATA = 1, 2


# --------------------------------------------------------------------------- sources


def sample_for(i: int, size: int = 64) -> tuple:
    """The deterministic sample at index ``i``: ``(float32 array of `size`, i)``."""
    rng = np.random.default_rng(i)
    return (rng.standard_normal(size).astype(np.float32), i)


class ArraySource(torch.utils.data.Dataset):
    """``n`` samples of ``size`` float32 values each (``size`` 16384 -> 64 KiB overflow)."""

    def __init__(self, n: int = 100, size: int = 64) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return sample_for(i, self.size)


class ShiftedSource(ArraySource):
    """Same class code path as ArraySource's output but different values (another source)."""

    def __getitem__(self, i: int) -> tuple:
        a, j = sample_for(i, self.size)
        return (a + 1000.0, j)


class DriftingSource(torch.utils.data.Dataset):
    """Its output depends on a file on disk, which its code does not show (spot check)."""

    def __init__(self, n: int, cfg_path: str) -> None:
        self.n, self.cfg_path = n, cfg_path

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        with open(self.cfg_path) as f:
            offset = float(f.read())
        a, j = sample_for(i)
        return (a + offset, j)


class KillAt(ArraySource):
    """Kills its own process with SIGKILL when index ``at`` is computed (in a worker)."""

    def __init__(self, n: int, at: int, size: int = 64) -> None:
        super().__init__(n, size)
        self.at = at

    def __getitem__(self, i: int) -> tuple:
        if i == self.at and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


class MixedSource(ArraySource):
    """``ArraySource`` where every 8th sample holds 16384 float32 (64 KiB: an overflow run)."""

    def __getitem__(self, i: int) -> tuple:
        return sample_for(i, 16384 if i % 8 == 0 else self.size)


class BigSource(torch.utils.data.Dataset):
    """Sample ``i`` holds ``sizes[i]`` bytes (uint8)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> Any:
        return np.full(self.sizes[i], i % 251, dtype=np.uint8)


def same(a: Any, b: Any) -> bool:
    """Exact equality of two samples of the shape ``sample_for`` makes."""
    return (type(a) is type(b) and len(a) == len(b) and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
            and a[1] == b[1])


# --------------------------------------------------------------------------- child processes


def sig_name(rc: int | None) -> str | None:
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"SIG{-rc}"
    return None


def run_child(code: str, *args: Any, timeout: float = 120, preexec: Any = None,
              user: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a fresh interpreter with this folder importable."""
    e = dict(os.environ)
    e["PYTHONPATH"] = HERE + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("PYTEST_CURRENT_TEST", None)
    if env:
        e.update(env)
    cmd = [PY, "-X", "faulthandler", "-c", textwrap.dedent(code), *map(str, args)]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e,
                          preexec_fn=preexec)


def check_child(proc: subprocess.CompletedProcess, expect_rc: int = 0) -> dict:
    """Fail on a signal (naming it) or an unexpected exit code; return the child's last
    stdout line parsed as JSON (``{}`` when there is none)."""
    sig = sig_name(proc.returncode)
    assert sig is None, f"child killed by {sig}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == expect_rc, (
        f"child exited {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def spawn_child(code: str, *args: Any, user: str | None = None) -> subprocess.Popen:
    """Start a long-lived child; it talks line by line on stdin/stdout."""
    e = dict(os.environ)
    e["PYTHONPATH"] = HERE + os.pathsep + e.get("PYTHONPATH", "")
    cmd = [PY, "-X", "faulthandler", "-c", textwrap.dedent(code), *map(str, args)]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, bufsize=1)


# A holder process: builds nothing, opens a dataset or view on a path and obeys commands
# read from stdin, one per line, answering one JSON line each.
HOLDER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from _fault_helpers import *
import kvcache
path = sys.argv[1]
ns = {"kvcache": kvcache, "path": path, "np": np}
for k, v in list(globals().items()):
    if not k.startswith("__"):
        ns.setdefault(k, v)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    code = json.loads(line)
    ns["res"] = None
    try:
        exec(code, ns)
        out = {"ok": True, "res": ns.get("res")}
    except BaseException as exc:
        out = {"ok": False, "exc": type(exc).__name__, "msg": str(exc)}
    print(json.dumps(out, default=str), flush=True)
"""


class Holder:
    """A helper process that keeps objects alive between commands."""

    def __init__(self, path: str, user: str | None = None) -> None:
        self.p = spawn_child(HOLDER, path, user=user)
        first = self.p.stdout.readline()
        assert first, f"holder died: {self.p.stderr.read()[-3000:]}"

    @property
    def pid(self) -> int:
        return self.p.pid

    def do(self, code: str) -> dict:
        self.p.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait()
            raise AssertionError(f"holder died ({sig_name(rc) or rc}): {self.p.stderr.read()[-3000:]}")
        return json.loads(line)

    def ok(self, code: str) -> Any:
        out = self.do(code)
        assert out["ok"], out
        return out["res"]

    def _release(self) -> None:
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                f.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self._release()

    def close(self) -> int:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            rc = self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        self._release()
        return rc


# --------------------------------------------------------------------------- building caches


def build(path: str, n: int = 100, size: int = 64, **kw: Any) -> None:
    """Fill a cache with ``ArraySource(n, size)`` and close it."""
    import kvcache

    with kvcache.LmdbCachedDataset(ArraySource(n, size), path, **kw) as ds:
        ds.build()


def file_bytes(path: str) -> bytes:
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        return f.read()


def snapshot(path: str) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to prove a failed open changed nothing)."""
    out = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p) and name != "lock.mdb":  # lock.mdb is LMDB's shared memory
            with open(p, "rb") as f:
                out[name] = f.read()
        else:
            out[name] = b"<dir or lock>"
    return out


# --------------------------------------------------------------------------- page walker


def _meta(buf: bytes, pgno: int) -> dict:
    off = pgno * PSIZE + 16
    magic, version = struct.unpack_from("<II", buf, off)
    main = off + 24 + 48  # mm_dbs[MAIN_DBI]
    root = struct.unpack_from("<Q", buf, main + 40)[0]
    last_pg, txnid = struct.unpack_from("<QQ", buf, off + 24 + 96)
    return {"pgno": pgno, "magic": magic, "root": root, "last_pg": last_pg, "txnid": txnid,
            "off": off, "off_magic": off, "off_txnid": off + 24 + 96 + 8}


def metas(path: str) -> list[dict]:
    buf = file_bytes(path)
    return [_meta(buf, 0), _meta(buf, 1)]


def walk(path: str) -> dict:
    """Map the current tree of ``path``: named databases, pages and every record's place.

    Returns ``{"dbs": {name: root}, "pages": {db: {"branch": [...], "leaf": [...]}},
    "records": {db: {key: {"leaf", "node_off", "key_off", "data_off", "dsize",
    "overflow"}}}}`` where ``data_off`` is the file offset of the value's first byte.
    """
    buf = file_bytes(path)
    ms = [_meta(buf, 0), _meta(buf, 1)]
    cur = max(ms, key=lambda m: m["txnid"])
    out: dict = {"meta": cur, "dbs": {}, "pages": {}, "records": {}}

    def tree(db: str, root: int) -> None:
        pages = out["pages"].setdefault(db, {"branch": [], "leaf": []})
        recs = out["records"].setdefault(db, {})

        def page(pgno: int) -> None:
            base = pgno * PSIZE
            flags = struct.unpack_from("<H", buf, base + 10)[0]
            lower, _upper = struct.unpack_from("<HH", buf, base + 12)
            ptrs = struct.unpack_from("<%dH" % ((lower - 16) // 2), buf, base + 16)
            if flags & P_BRANCH:
                pages["branch"].append(pgno)
                for p in ptrs:
                    lo, hi, fl, _ks = struct.unpack_from("<HHHH", buf, base + p)
                    page(lo | (hi << 16) | (fl << 32))
            elif flags & P_LEAF:
                pages["leaf"].append(pgno)
                for p in ptrs:
                    lo, hi, fl, ks = struct.unpack_from("<HHHH", buf, base + p)
                    key = bytes(buf[base + p + 8: base + p + 8 + ks])
                    data_off = base + p + 8 + ks
                    rec = {"leaf": pgno, "node_off": base + p, "key_off": base + p + 8,
                           "data_off": data_off, "dsize": lo | (hi << 16), "overflow": None}
                    if fl & F_BIGDATA:
                        opg = struct.unpack_from("<Q", buf, data_off)[0]
                        rec["overflow"] = opg
                        rec["data_off"] = opg * PSIZE + 16
                    if fl & F_SUBDATA and db == "main":
                        out["dbs"][key.decode()] = struct.unpack_from("<Q", buf, data_off + 40)[0]
                    recs[key] = rec
            else:
                raise RuntimeError(f"page {pgno}: unexpected flags {flags:#x}")

        page(root)

    tree("main", cur["root"])
    for name, root in list(out["dbs"].items()):
        if root != 0xFFFFFFFFFFFFFFFF:  # P_INVALID: an empty database
            tree(name, root)
    return out


def record_place(path: str, index: int, db: str = "samples") -> dict:
    """Where the value of ``index`` lives in ``db`` (see ``walk``)."""
    return walk(path)["records"][db][struct.pack(">Q", index)]


def patch(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of ``data.mdb`` at ``offset`` (no environment may be open)."""
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.seek(offset)
        f.write(data)
