"""F02-F04 and F19: DataLoader workers: killed, forked after use, spawned, overlapping writers."""

import pickle

import pytest
import torch.utils.data

import kvcache
from _fault_helpers import ArraySource, KillAt, build, check_child, run_child, same, sample_for

READERS = r"""
import json, os, sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=4)
rows = [l.split() for l in env.readers().splitlines()[1:] if l.strip()]
print(json.dumps({"pids": [int(r[0]) for r in rows]}))
"""


@pytest.mark.slow
def test_f02_killed_worker(tmp_path):
    path = str(tmp_path / "c")
    build(path, n=200, size=1024)
    ds = kvcache.LmdbCachedDataset(KillAt(400, at=300, size=1024), path)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                     multiprocessing_context="fork", timeout=60)
    # DataLoader's own error, whose form depends on timing: "exited unexpectedly", "killed
    # by signal", or an OSError/EOFError from the pipe or fd a dead worker was sharing a
    # tensor through. It must not be kvcache's or LMDB's, nor a hang ("timed out").
    with pytest.raises((RuntimeError, OSError, EOFError)) as err:
        for _ in dl:
            pass
    assert not isinstance(err.value, kvcache.KvCacheError) and "lmdb" not in type(err.value).__module__, err.value
    assert "timed out" not in str(err.value), err.value
    ds.close()
    ds2 = kvcache.LmdbCachedDataset(ArraySource(400, 1024), path)  # opening runs reader_check
    assert same(ds2[5], sample_for(5, 1024))
    pids = check_child(run_child(READERS, path))["pids"]
    import os

    assert all(os.path.exists(f"/proc/{p}") for p in pids), pids  # no dead pid holds a slot
    ds2.close()
    size0 = kvcache.open_cache(path).info().file_bytes
    for v in range(20):
        with kvcache.LmdbCachedDataset(ArraySource(200, 1024), path, version=v) as d:
            d.build()
    assert kvcache.open_cache(path).info().file_bytes < 2 * size0 + (2 << 20)


@pytest.mark.parametrize("ctx", ["fork", "spawn", pytest.param("forkserver", marks=pytest.mark.slow)])
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
    assert view.keys() == list(range(600)) and view.info().entries == 600
    assert all(same(view.get(i), sample_for(i)) for i in range(600))
    view.close()
    maintenance = pytest.importorskip("kvcache.maintenance")
    assert maintenance.verify(path).ok
