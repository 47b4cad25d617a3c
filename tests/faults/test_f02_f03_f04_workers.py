"""F02-F04 and F19: DataLoader workers: killed, forked after use, spawned, overlapping writers."""

import pickle
import signal

import pytest
import torch.utils.data
from _fault_helpers import (
    ArraySource,
    KillAt,
    build,
    check_child,
    run_child,
    same,
    sample_for,
)

import kvcache

READERS = r"""
import json, os, sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=4)
rows = [l.split() for l in env.readers().splitlines()[1:] if l.strip()]
print(json.dumps({"pids": [int(r[0]) for r in rows]}))
"""


def test_f02_killed_worker(tmp_path):
    path = str(tmp_path / "c")
    build(path, n=200, size=1024)
    with pytest.warns(kvcache.KvCacheWarning, match="the source changed"):  # another class: its own fingerprint
        ds = kvcache.LmdbCachedDataset(KillAt(400, at=300, size=1024), path)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                     multiprocessing_context="fork", timeout=60)
    # DataLoader's own error, whose form depends on timing: "exited unexpectedly", "killed
    # by signal", or an OSError/EOFError from the pipe or fd a dead worker was sharing a
    # tensor through. It must not be kvcache's or LMDB's, nor a hang ("timed out").
    # DataLoader's SIGCHLD handler can raise "killed by signal" again after the first error,
    # at any later line: swap it out from the first error until the workers are shut down.
    it = iter(dl)
    errs = []
    handler = signal.getsignal(signal.SIGCHLD)
    try:
        try:
            for _ in it:
                pass
        except (RuntimeError, OSError, EOFError) as exc:
            errs.append(exc)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except RuntimeError as exc:  # the handler fired between the two
        errs.append(exc)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        it._shutdown_workers()  # unregisters the worker pids the handler watches
    finally:
        signal.signal(signal.SIGCHLD, handler)
    assert errs, "the DataLoader did not notice its killed worker"
    for exc in errs:
        assert not isinstance(exc, kvcache.KvCacheError) and "lmdb" not in type(exc).__module__, exc
        assert "timed out" not in str(exc), exc
    del it
    ds.close()
    with pytest.warns(kvcache.KvCacheWarning, match="the source changed"):
        ds2 = kvcache.LmdbCachedDataset(ArraySource(400, 1024), path)  # opening runs reader_check
    assert same(ds2[5], sample_for(5, 1024))
    pids = check_child(run_child(READERS, path))["pids"]
    import os

    assert all(os.path.exists(f"/proc/{p}") for p in pids), pids  # no dead pid holds a slot
    ds2.close()
    size0 = kvcache.open_cache(path).info().file_bytes
    with pytest.warns(kvcache.KvCacheWarning, match="the source changed"):  # the first: shorter; later ones change version= alone (no warning)
        for v in range(20):
            with kvcache.LmdbCachedDataset(ArraySource(200, 1024), path, version=v) as d:
                d.build()
    assert kvcache.open_cache(path).info().file_bytes < 2 * size0 + (2 << 20)


# spawn/forkserver workers import torch every epoch (~5 s an epoch here): slow; the default
# run of tests/test_dataloader.py covers them with persistent workers
@pytest.mark.parametrize("ctx", ["fork", pytest.param("spawn", marks=pytest.mark.slow),
                                 pytest.param("forkserver", marks=pytest.mark.slow)])
def test_f03_f04_three_epochs(tmp_path, ctx):
    path = str(tmp_path / "c")
    ds = kvcache.LmdbCachedDataset(ArraySource(160), path)
    assert same(ds[0], sample_for(0))  # the main process touches the env first (F03)
    clone = pickle.loads(pickle.dumps(ds))  # F04: pickles without the Environment
    assert clone._env is None
    clone.close()
    dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=True, num_workers=2,
                                     multiprocessing_context=ctx, timeout=120)
    for _ in range(3):
        seen = {}
        for a, i in dl:
            seen[int(i)] = a
        assert len(seen) == 160 and all(same((seen[i], i), sample_for(i)) for i in range(160))
    assert same(ds[7], sample_for(7))  # the main process can still read
    pids = check_child(run_child(READERS, path))["pids"]
    assert len(pids) <= 3
    ds.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_f19_overlapping_writers(tmp_path):
    path = str(tmp_path / "c")
    ds = kvcache.LmdbCachedDataset(ArraySource(600), path, write_batch=16)
    for epoch in range(2):
        dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=True, num_workers=4,
                                         multiprocessing_context="fork", timeout=120)
        assert sorted(int(i) for _, i in dl) == list(range(600))
    ds.close()
    view = kvcache.open_cache(path)
    assert list(view.keys()) == list(range(600)) and view.info().entries == 600
    assert all(same(view.get(i), sample_for(i)) for i in range(600))
    view.close()
    maintenance = pytest.importorskip("kvcache.maintenance")
    assert maintenance.verify(path).ok
