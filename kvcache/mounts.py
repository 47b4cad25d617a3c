"""Which filesystem a path lives on, from ``/proc/self/mountinfo``, and whether it is a
network or FUSE filesystem (where LMDB must not be written, nor locked).

LMDB keeps its reader table in a shared-memory ``lock.mdb`` and relies on ``mmap``
coherence and POSIX locks that hold on one host only: on NFS, SMB, Lustre and the rest,
two hosts writing (or one writing while another reads) corrupt the file or take SIGBUS,
and a lock file there means nothing to the other hosts. So kvcache refuses to write an
environment on these filesystems and reads any cache there lock-free and read-only.

The functions taking a table's text are pure (tests feed them crafted tables).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["FUSE_FSTYPES", "NETWORK_FSTYPES", "FsInfo", "Mount", "filesystem_of", "find_mount",
           "network_kind", "parse_mountinfo", "read_mountinfo", "unescape"]

# Filesystems shared between hosts (or with a hypervisor's host), by the type the kernel
# shows in mountinfo. Cluster filesystems on shared block devices (ocfs2, gfs2) are here
# too: their page caches are coherent only through their own lock managers, which LMDB's
# shared-memory reader table knows nothing of.
NETWORK_FSTYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "coda", "9p", "v9fs", "virtiofs",
    "vboxsf", "drvfs", "lustre", "gpfs", "mmfs", "beegfs", "fhgfs", "ceph", "cephfs",
    "glusterfs", "ocfs2", "gfs2", "pvfs2", "orangefs", "panfs", "wekafs", "cvfs", "dvs",
})
# FUSE: the daemon behind it may be anything (sshfs, s3fs, gcsfuse, glusterfs, juicefs,
# a latency simulator); the kernel drops a file's cached pages when it is reopened and
# shared writable mmaps are often unsupported. ``fuse.<name>`` is matched by prefix.
FUSE_FSTYPES = frozenset({"fuse", "fuseblk"})
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of a mountinfo table (``man 5 proc``), paths unescaped."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the directory of the filesystem mounted here (bind mounts: not "/")
    mount_point: str
    options: str
    fstype: str
    source: str
    super_options: str


@dataclass(frozen=True)
class FsInfo:
    """The filesystem holding a path."""

    path: str  # the resolved path
    fstype: str
    mount_point: str
    source: str
    network: str | None  # "network" / "FUSE" when LMDB must not be written there, else None

    def describe(self) -> str:
        """``nfs4: server:/export on /mnt/data``."""
        return f"{self.fstype}: {self.source} on {self.mount_point}"


def unescape(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` space, ``\011`` tab, ``\012`` newline,
    ``\134`` backslash: the kernel escapes only these)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo table, in its order (later lines are mounted later).

    Malformed lines are skipped: a detection that cannot read a line must not stop a
    cache from opening.
    """
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)  # optional fields end at a lone "-"
            out.append(Mount(
                mount_id=int(parts[0]), parent_id=int(parts[1]), device=parts[2],
                root=unescape(parts[3]), mount_point=unescape(parts[4]), options=parts[5],
                fstype=parts[sep + 1], source=unescape(parts[sep + 2]) if len(parts) > sep + 2 else "",
                super_options=parts[sep + 3] if len(parts) > sep + 3 else "",
            ))
        except (ValueError, IndexError):
            continue
    return out


def _under(path: str, mount_point: str) -> bool:
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def find_mount(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds the absolute, resolved ``path``: the longest matching mount
    point; of mounts stacked on the same point, the last one (it hides the others)."""
    best: Mount | None = None
    for m in mounts:
        if _under(path, m.mount_point) and (best is None or len(m.mount_point) >= len(best.mount_point)):
            best = m
    return best


def network_kind(fstype: str) -> str | None:
    """``"network"``, ``"FUSE"`` or None (a local filesystem) for a mountinfo fs type."""
    t = fstype.lower()
    if t in NETWORK_FSTYPES:
        return "network"
    if t in FUSE_FSTYPES or t.startswith("fuse."):
        return "FUSE"
    return None


def read_mountinfo() -> str | None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def filesystem_of(path: str | os.PathLike, table: str | None = None) -> FsInfo | None:
    """The filesystem holding ``path`` (which need not exist yet: its nearest existing
    parent decides), resolved with ``realpath`` first, so symlinks and bind mounts
    count where they lead. ``table`` is a mountinfo text (default: this process's).
    None where no table is readable (not Linux)."""
    real = os.path.realpath(os.fspath(path))
    text = read_mountinfo() if table is None else table
    if text is None:
        return None
    m = find_mount(real, parse_mountinfo(text))
    if m is None:
        return None
    return FsInfo(real, m.fstype, m.mount_point, m.source, network_kind(m.fstype))
