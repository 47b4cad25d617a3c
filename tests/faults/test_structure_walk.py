"""kvcache.structure's walk reads small files in one pass and large ones page by page: the
two must agree on every file, healthy or damaged (a verdict, never a signal)."""

import os
import random
import shutil

import pytest
from helpers import ImageSource

import kvcache
from kvcache import structure


def _verdict(path):
    try:
        return ("ok", structure.validate(path))
    except kvcache.CacheCorruptError as exc:
        return ("refused", str(exc))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("walk") / "c")
    with kvcache.LmdbCachedDataset(ImageSource(300), path) as ds:
        ds.build()
    return path


def test_one_pass_and_page_by_page_agree(healthy, tmp_path, monkeypatch):
    rng = random.Random(7)
    verdicts = []
    data = os.path.join(healthy, "data.mdb")
    size = os.path.getsize(data)
    for k in range(12):
        path = str(tmp_path / f"d{k}")
        shutil.copytree(healthy, path)
        if k:  # k == 0 stays healthy
            with open(os.path.join(path, "data.mdb"), "r+b") as f:
                for _ in range(rng.randint(1, 4)):
                    f.seek(rng.randrange(2 * 4096, size))
                    f.write(rng.randbytes(rng.randint(1, 64)))
        whole = _verdict(path)
        monkeypatch.setattr(structure, "WHOLE_FILE_BYTES", 0)
        paged = _verdict(path)
        monkeypatch.undo()
        assert whole == paged, k
        verdicts.append(whole[0])
        if k == 0:
            assert whole[0] == "ok"
    assert "refused" in verdicts  # the damage reached the trees at least once
