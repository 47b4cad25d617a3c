"""The default fingerprint covers the source's plain-data attributes; stale never silent."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import warnings

import lmdb
import pytest
import torch
from torch.utils.data import Dataset

from kvcache import KvCacheWarning, LmdbCachedDataset, open_cache
from kvcache.fingerprint import compute_parts, state_hash


class Images(Dataset):
    """A folder of images as a user writes it: a root, a list of files, a shape."""

    def __init__(self, files, shape=(3, 16, 16), root="/data"):
        self.files = list(files)
        self.shape = shape
        self.root = pathlib.Path(root)
        self.table = torch.zeros(2)  # not plain data: left out, by name
        self.calls = 0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        self.calls += 1
        return torch.full(self.shape, float(i))


class Moving(Images):
    kvcache_fingerprint_exclude = ("root",)


def _quiet(src, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return LmdbCachedDataset(src, path, **kw)


def test_a_changed_constructor_argument_is_never_served_old_samples(tmp_path):
    path = str(tmp_path / "c")
    files = [f"img{i}.png" for i in range(50)]
    with _quiet(Images(files, shape=(3, 16, 16)), path) as ds:
        ds.build()
    new = Images(files, shape=(3, 8, 8))
    with pytest.warns(KvCacheWarning) as got:
        ds = LmdbCachedDataset(new, path)
    (w,) = got
    msg = str(w.message)
    assert "the source changed" in msg and "the source's attributes" in msg
    assert "50 cached samples of the previous source will be recomputed" in msg
    with ds:
        assert all(ds[i].shape == (3, 8, 8) for i in range(50))
        assert new.calls == 50
    with _quiet(Images(files, shape=(3, 8, 8)), path) as ds:  # now it is the cached source
        assert ds[3].shape == (3, 8, 8) and ds.stats().misses == 0


def test_appending_files_warns_with_what_is_recomputed(tmp_path):
    path = str(tmp_path / "c")
    files = [f"img{i}.png" for i in range(200)]
    with _quiet(Images(files), path) as ds:
        ds.build()
    with pytest.warns(KvCacheWarning, match=r"length: 200 -> 210.*200 cached samples"):
        ds = LmdbCachedDataset(Images(files + [f"new{i}.png" for i in range(10)]), path)
    ds.close()


def test_the_same_source_opens_quietly_and_writes_nothing(tmp_path):
    path = str(tmp_path / "c")
    files = [f"img{i}.png" for i in range(20)]
    with _quiet(Images(files), path) as ds:
        ds.build()
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    before = env.info()["last_txnid"]
    env.close()
    for _ in range(3):  # each open with the source used to commit the `current` row
        with _quiet(Images(files), path) as ds:
            ds[0]
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    assert env.info()["last_txnid"] == before
    env.close()


def test_what_the_state_covers_and_leaves_out(tmp_path):
    src = Images(["a", "b"])
    parts = compute_parts(src, None, None)
    assert parts["state"] is not None
    assert parts["state_left_out"] == ["table"]
    # each plain attribute matters: files, shape, root, calls (a number) and dict/list nesting
    base = state_hash(src)[0]
    for change in (dict(files=["a", "c"]), dict(shape=(3, 8, 8)), dict(root="/other")):
        assert state_hash(Images(**{"files": ["a", "b"], **change}))[0] != base
    other = Images(["a", "b"])
    other.extra = {"k": [1, 2.5, None, (True, "x")], 3: b"z"}
    assert state_hash(other)[0] not in (base, None)
    other.extra["k"][1] = 2.25
    h2 = state_hash(other)[0]
    other.extra["k"][1] = 2.5
    assert state_hash(other)[0] != h2
    # the exclusion list: a data root that moves between machines
    a, b = Moving(["a"], root="/x"), Moving(["a"], root="/y")
    assert state_hash(a)[0] == state_hash(b)[0] and "root" in state_hash(a)[1]


def test_a_million_paths_and_path_label_rows_are_hashed_and_told_apart():
    paths = [f"/data/train/n{i % 1000:08d}/img_{i:07d}.JPEG" for i in range(10**6)]
    src = Images(paths)
    src.samples = [(p, i % 1000) for i, p in enumerate(paths)]  # torchvision's layout
    h = state_hash(src)
    assert h[0] is not None and h[1] == ["table"]
    src.samples[500_000] = (paths[500_000], 7)
    assert state_hash(src)[0] != h[0]
    src.samples[500_000] = (paths[500_000], 0)
    paths[123] = paths[123][:-1] + "X"
    src.files = paths
    assert state_hash(src)[0] != h[0]


def test_class_source_is_read_once_per_class(monkeypatch):
    calls = []
    real = inspect.getsource

    def counting(obj):
        calls.append(obj)
        return real(obj)

    class Fresh(Images):
        pass

    monkeypatch.setattr(inspect, "getsource", counting)
    for _ in range(5):
        compute_parts(Fresh(["a"]), None, None)
    assert calls.count(Fresh) == 1


def test_workers_get_the_parts_instead_of_hashing_again(tmp_path):
    import pickle

    path = str(tmp_path / "c")
    ds = _quiet(Images(["a", "b"]), path)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.fingerprint_parts == ds.fingerprint_parts
    assert clone[1].shape == (3, 16, 16)
    clone.close()
    ds.close()
    assert len(open_cache(path)) == 1


class _Outer:
    class _Outer:  # a nested class of the same name
        def f(self):
            return 1

    def g(self):
        return 2


@dataclasses.dataclass
class _Decorated:
    x: int = 1

    def f(self):
        return self.x


class _NoMethods:
    x = 1


def test_class_source_is_inspect_getsource_without_parsing_the_module():
    import importlib
    import inspect

    from kvcache.fingerprint import class_source

    checked = 0
    for name in ("kvcache.dataset", "kvcache.store", "kvcache.errors", "kvcache.builder", "_cli_helpers",
                 "helpers", "torch.utils.data.dataset", "argparse", "dataclasses", __name__):
        m = importlib.import_module(name)
        for c in [v for v in vars(m).values() if isinstance(v, type) and v.__module__ == m.__name__]:
            for cls in [c, *[v for v in vars(c).values() if isinstance(v, type)]]:
                try:
                    ref = inspect.getsource(cls)
                except (OSError, TypeError):
                    continue
                assert class_source(cls) == ref, cls
                checked += 1
    assert checked > 50
