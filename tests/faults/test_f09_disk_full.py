"""F09: disk full during commit (a small tmpfs as root; RLIMIT_FSIZE in a helper without).

LMDB reports a full disk as EIO on ``commit()``. kvcache must keep serving correct samples
from the source, warn once naming the cause, count the dropped rows in ``write_errors``,
resume write-back once space returns, and leave the earlier data intact.
"""

import os
import subprocess

import pytest
from _fault_helpers import check_child, run_child
from conftest import need_root

# Runs in a child: the filling and the rlimit must not touch the test process.
CHILD = r"""
import json, os, resource, sys, time, warnings
from _fault_helpers import *
import kvcache, kvcache.writeback as wb
path, mode = sys.argv[1], sys.argv[2]
wb.RETRY_AFTER = 0.3
N_OLD, N = 30, 150
src = ArraySource(N, 16384)  # 64 KiB samples: every new one needs new pages
ds = kvcache.LmdbCachedDataset(src, path, write_batch=4)
for i in range(N_OLD):
    ds[i]
assert ds.flush() >= 0 and ds.stats().writes == N_OLD, ds.stats()
filler = os.path.join(os.path.dirname(path), "filler")
if mode == "tmpfs":
    with open(filler, "wb", buffering=0) as f:  # fill the filesystem to the last byte (unbuffered:
        # a buffered file would raise ENOSPC again when it flushes on close)
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
else:
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + (128 << 10), resource.RLIM_INFINITY))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok = all(same(ds[i], sample_for(i, 16384)) for i in range(N_OLD, 110))
    ds.flush()
st = ds.stats()
msgs = [str(w.message) for w in caught]
# space returns
if mode == "tmpfs":
    os.unlink(filler)
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
time.sleep(wb.RETRY_AFTER + 0.2)
with warnings.catch_warnings(record=True) as later:
    warnings.simplefilter("always")
    ok2 = all(same(ds[i], sample_for(i, 16384)) for i in range(110, N))
    ds.flush()
cached = sorted(ds.cached_indices())
st2 = ds.stats()
ds.close()
v = kvcache.open_cache(path)  # a fresh open: the earlier data is intact
keys = set(v.keys())
bad = [i for i in range(N) if i in keys and not same(v.get(i), sample_for(i, 16384))]
v.close()
print(json.dumps({"ok": ok, "ok2": ok2, "msgs": msgs, "later": [str(w.message) for w in later],
                  "write_errors": st.write_errors, "writes": st.writes, "writes2": st2.writes,
                  "cached": cached, "bad": bad, "keys": sorted(keys)}))
"""


def _check(path, out, cause):
    assert out["ok"] and out["ok2"], "a sample served during or after the fault was wrong"
    assert len(out["msgs"]) == 1, out["msgs"]  # exactly one warning
    assert cause in out["msgs"][0] and "source" in out["msgs"][0], out["msgs"][0]
    assert out["write_errors"] > 0 and out["writes"] < 110, out  # rows dropped and counted
    # every row computed during the fault was either written or counted as dropped
    # (including those dropped during the retry back-off)
    assert (out["writes"] - 30) + out["write_errors"] == 80, out
    assert out["later"] == [], out["later"]
    # after space returned, the new samples were cached
    assert out["writes2"] > out["writes"]
    assert set(range(110, 150)) <= set(out["cached"]), out["cached"]
    assert set(range(30)) <= set(out["cached"])  # earlier data intact
    import kvcache.maintenance as m

    rep = m.verify(path)
    assert rep.ok, rep
    assert out["bad"] == [] and set(range(30)) <= set(out["keys"])


@pytest.mark.slow
@pytest.mark.root
def test_f09_disk_full_tmpfs(tmp_path):
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        path = str(mnt / "c")
        out = check_child(run_child(CHILD, path, "tmpfs"))
        _check(path, out, "disk full")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_f09_file_size_limit(tmp_path):
    path = str(tmp_path / "c")
    out = check_child(run_child(CHILD, path, "fsize"))
    _check(path, out, "file size limit")
    assert os.path.getsize(os.path.join(path, "data.mdb")) > 0
