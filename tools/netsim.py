"""A simulated network filesystem: a FUSE passthrough that adds a fixed latency to every
round trip and counts operations by kind.

Run it from the command line (foreground; Ctrl-C or ``fusermount3 -u MOUNT`` stops it)::

    python tools/netsim.py BACKING MOUNT --latency-us 200 --bandwidth-mbps 1250 --stats stats.json

or around one command, optionally in a memory cgroup (root), then unmount::

    python tools/netsim.py BACKING MOUNT --latency-us 200 --memory-mb 1200 -- python train.py

or from Python (tests, benchmarks), where it runs in a child process::

    from netsim import NetSim
    with NetSim(backing, mount, latency_us=200) as fs:
        ...                       # read files under `mount`
        fs.counts()               # {"getattr": 12, "open": 3, "read": 40, ...} so far

Each operation a network filesystem would send to its server (lookup/getattr, open,
read, write, create, readdir, rename, fsync, ...) waits ``latency_us`` (the daemon is
multi-threaded, so concurrent requests wait concurrently, like a real server). The
kernel's own caches stay in front of it, as they do for NFS: attributes for a second
(libfuse's default), and file pages until the file is opened again (FUSE drops a
file's cached pages on open unless the daemon says otherwise; this one doesn't, like
NFS's close-to-open consistency after a change). Counts are served on a UNIX socket
(``MOUNT``'s control socket, see :class:`NetSim`) and written to ``--stats`` at exit; besides
the operations they hold ``read_bytes`` and ``max_inflight``, the most requests ever waiting
at once (concurrent page faults show as more than 1).

``--bandwidth-mbps`` adds a link of that many MB/s (10^6 bytes/s) shared by all reads and
writes: transfers queue behind each other after their latency (:class:`Link`).
:class:`MemoryLimit` runs processes in a memory cgroup (v2 ``memory.max`` or v1
``memory.limit_in_bytes``; root), so that the pages they read through the mount cannot all
stay in their page cache, as on a node whose dataset is larger than its memory. Without
root (or without a writable cgroup tree) it does nothing and says why: the processes then
run unlimited and the kernel may keep the whole file cached.

Needs Linux, ``/dev/fuse``, ``fusermount3`` (Debian: ``apt-get install fuse3``) and the
``mfusepy`` package (``pip install -e '.[netsim]'``). :func:`unavailable` says which is
missing, so tests can skip.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

__all__ = ["Link", "MemoryLimit", "NetSim", "NetSimUnavailable", "unavailable"]

UNTIMED = {"release", "releasedir", "flush", "destroy", "init"}  # not a round trip
# counted, but not round trips: bytes read, and the most requests that were ever waiting at
# once (a high-water mark: concurrent page faults show up here as > 1)
NOT_OPS = UNTIMED | {"read_bytes", "max_inflight"}
MAX_THREADS = 64  # requests served at once (libfuse's max_threads option; its default is 10)


class NetSimUnavailable(RuntimeError):
    """FUSE cannot be used here (no /dev/fuse, fusermount3 or mfusepy, or mounting failed)."""


def unavailable() -> str | None:
    """Why the simulator cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy not usable ({exc}; pip install mfusepy)"
    return None


def _wait(seconds: float) -> None:
    # sleep most of it (cheap on a shared CPU), then spin the rest (sleep overshoots ~60 µs),
    # giving the GIL away on every turn: concurrent requests (one thread each) must wait
    # concurrently, as on a real server, not take turns on the GIL
    end = time.perf_counter() + seconds
    if seconds > 150e-6:
        time.sleep(seconds - 100e-6)
    while time.perf_counter() < end:
        time.sleep(0)


_LOG = bool(os.environ.get("NETSIM_LOG_READS"))  # debugging: print every read (path, offset, size)


class Link:
    """A link of ``bandwidth`` bytes/s shared by every request: transfers queue behind each
    other (one at a time on the wire, in the order they arrive), so N concurrent 1 MiB reads
    take N times as long as one, as on a real network link."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self.free_at = 0.0
        self.lock = threading.Lock()
        self.bytes = 0

    def transfer(self, nbytes: int) -> None:
        if self.bandwidth <= 0 or nbytes <= 0:
            return
        with self.lock:
            now = time.perf_counter()
            start = max(now, self.free_at)
            self.free_at = end = start + nbytes / self.bandwidth
            self.bytes += nbytes
        _wait(end - time.perf_counter())


def _make_ops(root: str, latency: float, bandwidth: float = 0.0) -> Any:
    import mfusepy as fuse

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    link = Link(bandwidth)

    inflight = [0]

    def timed(name: str, fn: Any) -> Any:
        def op(self: Any, *args: Any) -> Any:
            timed_op = name not in UNTIMED
            with lock:
                counts[name] += 1
                if timed_op:
                    inflight[0] += 1
                    if inflight[0] > counts["max_inflight"]:
                        counts["max_inflight"] = inflight[0]
            try:
                if timed_op and latency > 0:
                    _wait(latency)
                out = fn(self, *args)
            except OSError as exc:
                raise fuse.FuseOSError(exc.errno or errno.EIO) from None
            finally:
                if timed_op:
                    with lock:
                        inflight[0] -= 1
            if name == "read":
                if _LOG:
                    print(f"read {args[0]} {args[2]} {len(out)}", file=sys.stderr, flush=True)
                link.transfer(len(out))
                with lock:
                    counts["read_bytes"] += len(out)
            elif name == "write":
                link.transfer(len(args[1]))
            return out
        op.__name__ = name
        return op

    def p(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    def getattr_(self: Any, path: str, fh: Any = None) -> dict:
        st = os.lstat(p(path))
        return {k: getattr(st, k) for k in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                            "st_nlink", "st_size", "st_uid", "st_ino", "st_blocks")}

    def statfs(self: Any, path: str) -> dict:
        s = os.statvfs(p(path))
        return {k: getattr(s, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                           "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    impl = {
        "getattr": getattr_,
        "statfs": statfs,
        "access": lambda self, path, mode: 0 if os.access(p(path), mode) else (_ for _ in ()).throw(
            OSError(errno.EACCES, "access")),
        "readdir": lambda self, path, fh: [".", ".."] + os.listdir(p(path)),
        "opendir": lambda self, path: 0,
        "releasedir": lambda self, path, fh: 0,
        "open": lambda self, path, flags: os.open(p(path), flags),
        "create": lambda self, path, mode, fi=None: os.open(p(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode),
        "read": lambda self, path, size, offset, fh: os.pread(fh, size, offset),
        "write": lambda self, path, data, offset, fh: os.pwrite(fh, data, offset),
        "truncate": lambda self, path, length, fh=None: os.truncate(p(path), length),
        "flush": lambda self, path, fh: 0,
        "release": lambda self, path, fh: os.close(fh),
        "fsync": lambda self, path, datasync, fh: os.fsync(fh),
        "fsyncdir": lambda self, path, datasync, fh: 0,
        "mkdir": lambda self, path, mode: os.mkdir(p(path), mode),
        "rmdir": lambda self, path: os.rmdir(p(path)),
        "unlink": lambda self, path: os.unlink(p(path)),
        "rename": lambda self, old, new: os.rename(p(old), p(new)),
        "link": lambda self, target, source: os.link(p(source), p(target)),
        "symlink": lambda self, target, source: os.symlink(source, p(target)),
        "readlink": lambda self, path: os.readlink(p(path)),
        "chmod": lambda self, path, mode: os.chmod(p(path), mode),
        "chown": lambda self, path, uid, gid: os.chown(p(path), uid, gid),
        "utimens": lambda self, path, times=None: os.utime(p(path), times),
    }
    cls = type("NetSimOps", (fuse.Operations,), {k: timed(k, v) for k, v in impl.items()})
    ops = cls()
    return ops, counts, lock


def _serve_counts(sock_path: str, counts: Any, lock: threading.Lock) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                cmd = conn.recv(1)  # b"c": the counts; b"r": also restart the high-water mark
                with lock:
                    data = json.dumps(dict(counts)).encode()
                    if cmd == b"r":
                        counts["max_inflight"] = 0
                conn.sendall(data)

    threading.Thread(target=loop, daemon=True).start()


def serve(backing: str, mount: str, latency_us: float, stats: str | None = None,
          control: str | None = None, allow_other: bool | None = None, bandwidth_mbps: float = 0.0) -> None:
    """Mount ``backing`` on ``mount`` and serve until unmounted (foreground)."""
    import mfusepy as fuse

    ops, counts, lock = _make_ops(os.path.abspath(backing), latency_us / 1e6, bandwidth_mbps * 1e6)
    if control:
        _serve_counts(control, counts, lock)
    if allow_other is None:
        allow_other = os.geteuid() == 0  # root mounts it; let other users (tests as nobody) in
    kw = {"allow_other": True} if allow_other else {}
    try:
        # libfuse serves at most max_threads requests at once; its default, 10, capped
        # concurrent page faults at 10-13, where an NFS client keeps many more RPCs in flight
        fuse.FUSE(ops, mount, foreground=True, nothreads=False, default_permissions=True,
                  fsname="netsim", max_threads=MAX_THREADS, **kw)
    finally:
        if stats:
            with lock:
                data = dict(counts)
            with open(stats, "w") as f:
                json.dump(data, f)


class MemoryLimit:
    """Run processes under a memory limit (a context manager): a cgroup v2 (``memory.max``)
    or v1 (``memory.limit_in_bytes``) memory cgroup made for the purpose and removed after.
    Pages a process reads through the mount are charged to its cgroup, so a file larger
    than the limit cannot sit in its page cache, as on a node whose dataset is larger
    than its memory.

    ``enter`` moves the calling process in (use it as ``subprocess``'s ``preexec_fn``; its
    children inherit the cgroup). Needs root (or a delegated cgroup); elsewhere ``active``
    is False, ``why`` says why, and ``enter`` does nothing: the processes then run
    unlimited and the page cache can hold the whole file (results are then those of a
    node with enough memory). ``limit_bytes=0``: no limit, nothing made.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.dir: str | None = None
        self.why = "no limit asked for"

    @property
    def active(self) -> bool:
        return self.dir is not None

    def __enter__(self) -> "MemoryLimit":
        if self.limit <= 0:
            return self
        name = f"kvcache-netsim-{os.getpid()}-{time.monotonic_ns()}"
        v2 = "/sys/fs/cgroup/cgroup.controllers"
        tries = []
        if os.path.exists(v2):
            tries.append(("/sys/fs/cgroup", "memory.max", "memory.swap.max"))
        if os.path.isdir("/sys/fs/cgroup/memory"):
            tries.append(("/sys/fs/cgroup/memory", "memory.limit_in_bytes", None))
        if not tries:
            self.why = "no cgroup memory controller mounted"
        for root, knob, swap in tries:
            d = os.path.join(root, name)
            try:
                if knob == "memory.max":  # v2: the parent must delegate the memory controller
                    with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                        f.write("+memory")
                os.mkdir(d)
                with open(os.path.join(d, knob), "w") as f:
                    f.write(str(self.limit))
                if swap:
                    with contextlib.suppress(OSError), open(os.path.join(d, swap), "w") as f:
                        f.write("0")
                self.dir = d
                return self
            except OSError as exc:
                self.why = f"cannot make a memory cgroup under {root} ({exc}; needs root)"
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        return self

    def enter(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``)."""
        if self.dir is not None:
            with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """The most memory the cgroup's processes held (page cache included), if known."""
        for knob in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                with open(os.path.join(self.dir or "", knob)) as f:
                    return int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None

    def __exit__(self, *exc: object) -> None:
        if self.dir is None:
            return
        for _ in range(100):  # the processes have exited; the kernel may lag a little
            try:
                os.rmdir(self.dir)
                break
            except OSError:
                time.sleep(0.05)
        self.dir = None


def _mounted(mount: str) -> bool:
    mount = os.path.realpath(mount)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split(" ")[4] == mount and " fuse" in line for line in f)
    except OSError:
        return False


class NetSim:
    """Mount a latency-injecting passthrough of ``backing`` on ``mount`` in a child
    process (a context manager; ``start()``/``stop()`` also work).

    Raises:
        NetSimUnavailable: FUSE is missing here or the mount did not appear.
    """

    def __init__(self, backing: str | os.PathLike, mount: str | os.PathLike, latency_us: float = 200.0,
                 allow_other: bool | None = None, bandwidth_mbps: float = 0.0) -> None:
        self.backing, self.mount = os.path.abspath(backing), os.path.abspath(mount)
        self.latency_us = latency_us
        self.bandwidth_mbps = bandwidth_mbps
        self.allow_other = allow_other
        self.proc: subprocess.Popen | None = None
        self._tmp = tempfile.mkdtemp(prefix="netsim-")
        self.control = os.path.join(self._tmp, "control.sock")
        self.stats_path = os.path.join(self._tmp, "stats.json")

    def start(self) -> "NetSim":
        why = unavailable()
        if why:
            raise NetSimUnavailable(why)
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mount, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), self.backing, self.mount,
               "--latency-us", str(self.latency_us), "--control", self.control, "--stats", self.stats_path,
               "--bandwidth-mbps", str(self.bandwidth_mbps)]
        if self.allow_other is not None:
            cmd.append("--allow-other" if self.allow_other else "--no-allow-other")
        self._err = open(os.path.join(self._tmp, "stderr"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self._err, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (_mounted(self.mount) and os.path.exists(self.control)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self._err.seek(0)
                raise NetSimUnavailable(f"the FUSE mount did not come up: {self._err.read()[-500:]}")
            time.sleep(0.02)
        return self

    def counts(self, reset_max: bool = False) -> dict[str, int]:
        """Operations served so far, by kind (the daemon's running totals), with
        ``read_bytes`` and ``max_inflight``, the most requests ever waiting at once
        (``reset_max``: restart that high-water mark after reading it)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.control)
            s.sendall(b"r" if reset_max else b"c")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data)

    def stop(self) -> dict[str, int]:
        """Unmount (waits for the daemon) and return the final counts."""
        if self.proc is not None:
            if _mounted(self.mount):
                r = subprocess.run(["fusermount3", "-u", self.mount], capture_output=True, check=False)
                if r.returncode:
                    subprocess.run(["fusermount3", "-uz", self.mount], capture_output=True, check=False)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self._err.close()
        final = {}
        if os.path.exists(self.stats_path):
            with open(self.stats_path) as f:
                final = json.load(f)
        shutil.rmtree(self._tmp, ignore_errors=True)
        return final

    def __enter__(self) -> "NetSim":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ops_total(counts: dict[str, int]) -> int:
    """Round trips in a count: every operation but those that are not one."""
    return sum(n for k, n in counts.items() if k not in NOT_OPS)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backing", help="the directory to serve")
    ap.add_argument("mount", help="where to mount it (an empty directory)")
    ap.add_argument("--latency-us", type=float, default=200.0,
                    help="added to every round trip (default 200: a LAN; 1000 a busy server)")
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0,
                    help="the link's bandwidth in MB/s (10^6 bytes/s), shared by all reads and writes "
                         "(default 0: unlimited; 1250 = 1.25 GB/s, about a 10 GbE link)")
    ap.add_argument("--memory-mb", type=float, default=0.0,
                    help="with a command after --: run it in a memory cgroup of this many MiB (root)")
    ap.add_argument("command", nargs="*", help="(after --) run this with the mount up, then unmount")
    ap.add_argument("--stats", help="write the operation counts (JSON) here at unmount")
    ap.add_argument("--control", help="serve the running counts on this UNIX socket")
    ap.add_argument("--allow-other", dest="allow_other", action="store_true", default=None,
                    help="let other users use the mount (default: when run as root)")
    ap.add_argument("--no-allow-other", dest="allow_other", action="store_false")
    a = ap.parse_args(argv)
    why = unavailable()
    if why:
        sys.exit(f"netsim: {why}")
    if a.command:
        with NetSim(a.backing, a.mount, a.latency_us, a.allow_other, a.bandwidth_mbps) as fs:
            with MemoryLimit(int(a.memory_mb * (1 << 20))) as cg:
                if a.memory_mb and not cg.active:
                    print(f"netsim: no memory limit ({cg.why}); the command runs unlimited", file=sys.stderr)
                rc = subprocess.run(a.command, preexec_fn=cg.enter, check=False).returncode
            print(json.dumps(fs.counts()), file=sys.stderr)
        sys.exit(rc)
    serve(a.backing, a.mount, a.latency_us, a.stats, a.control, a.allow_other, a.bandwidth_mbps)


if __name__ == "__main__":
    main()
