"""kvcache.mounts: mountinfo parsing and network/FUSE detection, on crafted tables."""

import os

import pytest

from kvcache import mounts

TABLE = "\n".join([
    "22 27 0:21 / /proc rw,relatime - proc proc rw",
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard",
    "40 27 0:50 / /mnt/nfs rw,relatime shared:7 - nfs4 server:/export rw,vers=4.2",
    "41 40 254:0 /srv/local /mnt/nfs/scratch rw,relatime - ext4 /dev/vda rw",  # a bind mount inside nfs
    r"42 27 0:51 / /mnt/my\040share rw - cifs //host/share\040name rw",
    r"43 27 0:52 / /data/back\134slash\011tab rw master:3 unbindable - lustre 10.0.0.1@tcp:/fs rw",
    "44 27 0:53 / /mnt/fuse rw,nosuid,nodev - fuse.sshfs user@host:/home rw,user_id=0",
    "45 27 0:54 / /mnt/fuse2 rw - fuse /dev/fuse rw",
    "46 27 0:55 / /mnt/stack rw - nfs srv:/a rw",
    "47 27 0:56 / /mnt/stack rw - tmpfs tmpfs rw",  # mounted over the nfs one: it hides it
    "48 27 0:57 / /mnt/nfsish rw - tmpfs tmpfs rw",
    "not a mountinfo line at all",
    "49 27 0:58 / /mnt/gpfs rw - gpfs gpfs0 rw",
])


def at(path):
    return mounts.filesystem_of(path, TABLE)


def test_parse_fields_and_escapes():
    ms = mounts.parse_mountinfo(TABLE)
    assert len(ms) == 12  # the malformed line is skipped
    nfs = ms[2]
    assert (nfs.mount_id, nfs.parent_id, nfs.device) == (40, 27, "0:50")
    assert (nfs.fstype, nfs.source, nfs.mount_point, nfs.root) == ("nfs4", "server:/export", "/mnt/nfs", "/")
    assert ms[4].mount_point == "/mnt/my share" and ms[4].source == "//host/share name"
    assert ms[5].mount_point == "/data/back\\slash\ttab"  # two optional fields before "-"
    assert ms[3].root == "/srv/local"
    assert mounts.unescape(r"a\012b\040c") == "a\nb c"


def test_longest_mount_point_wins():
    assert at("/mnt/nfs/x/y").fstype == "nfs4"
    assert at("/mnt/nfs/x/y").network == "network"
    assert at("/mnt/nfs/scratch/cache").fstype == "ext4"  # nested local mount inside nfs
    assert at("/mnt/nfs/scratch/cache").network is None
    assert at("/mnt/nfs/scratchy").fstype == "nfs4"  # a prefix of the name is not a parent
    assert at("/mnt/nfsish/c").fstype == "tmpfs"  # neither is "/mnt/nfs" of "/mnt/nfsish"
    assert at("/home/user/cache").fstype == "ext4"
    assert at("/mnt/nfs").mount_point == "/mnt/nfs"


def test_stacked_mounts_last_wins():
    assert at("/mnt/stack/c").fstype == "tmpfs"


def test_escaped_paths_match():
    assert at("/mnt/my share/cache").network == "network"
    assert at("/mnt/my share/cache").fstype == "cifs"
    assert at("/data/back\\slash\ttab/c").fstype == "lustre"


@pytest.mark.parametrize("fstype,kind", [
    ("nfs", "network"), ("nfs4", "network"), ("cifs", "network"), ("smb3", "network"),
    ("smbfs", "network"), ("lustre", "network"), ("gpfs", "network"), ("beegfs", "network"),
    ("ceph", "network"), ("9p", "network"), ("glusterfs", "network"), ("afs", "network"),
    ("virtiofs", "network"), ("ocfs2", "network"), ("orangefs", "network"),
    ("fuse", "FUSE"), ("fuseblk", "FUSE"), ("fuse.sshfs", "FUSE"), ("fuse.glusterfs", "FUSE"),
    ("fuse.juicefs", "FUSE"), ("ext4", None), ("xfs", None), ("btrfs", None), ("tmpfs", None),
    ("overlay", None), ("zfs", None), ("nfsd", None), ("fusectl", None),
])
def test_classification(fstype, kind):
    assert mounts.network_kind(fstype) == kind


def test_fuse_and_gpfs_paths():
    assert at("/mnt/fuse/a").network == "FUSE" and at("/mnt/fuse/a").fstype == "fuse.sshfs"
    assert at("/mnt/fuse2/a").network == "FUSE"
    assert at("/mnt/gpfs/a").network == "network"
    assert at("/mnt/nfs/c").describe() == "nfs4: server:/export on /mnt/nfs"


def test_symlink_resolved_first(tmp_path):
    # a symlink on a local fs pointing into the "nfs" mount counts where it leads
    table = TABLE + f"\n60 27 0:60 / {tmp_path}/remote rw - nfs srv:/r rw"
    (tmp_path / "remote").mkdir()
    os.symlink(tmp_path / "remote", tmp_path / "link")
    assert mounts.filesystem_of(tmp_path / "link" / "cache", table).fstype == "nfs"
    assert mounts.filesystem_of(tmp_path / "local" / "cache", table).fstype != "nfs"


def test_this_process_table():
    info = mounts.filesystem_of(os.getcwd())
    if info is None:
        pytest.skip("no /proc/self/mountinfo")
    assert info.mount_point and info.fstype
    assert mounts.filesystem_of("/definitely/not/there/x") is not None  # the root mount holds it


def test_network_write_override_and_prefetch_settings(monkeypatch, tmp_path):
    from kvcache import lockfree

    monkeypatch.delenv(lockfree.ALLOW_NETWORK_WRITES_ENV, raising=False)
    assert not lockfree.network_writes_allowed(False) and lockfree.network_writes_allowed(True)
    monkeypatch.setenv(lockfree.ALLOW_NETWORK_WRITES_ENV, "1")
    assert lockfree.network_writes_allowed(False)
    monkeypatch.setenv(lockfree.ALLOW_NETWORK_WRITES_ENV, "0")
    assert not lockfree.network_writes_allowed(False)
    (tmp_path / "data.mdb").write_bytes(b"\0" * 5000)
    monkeypatch.delenv(lockfree.PREFETCH_BYTES_ENV, raising=False)
    assert lockfree.prefetch(str(tmp_path))
    monkeypatch.setenv(lockfree.PREFETCH_BYTES_ENV, "4096")  # larger than the limit: not read
    assert not lockfree.prefetch(str(tmp_path))
    monkeypatch.setenv(lockfree.PREFETCH_BYTES_ENV, "0")
    assert not lockfree.prefetch(str(tmp_path))
    assert not lockfree.prefetch(str(tmp_path / "missing"))
