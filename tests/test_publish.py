"""kvcache.publish and reading published caches lock-free (local disk; the same through
a simulated network filesystem is in test_network.py)."""

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from helpers import ImageSource, same, tree_hashes

import kvcache
from kvcache.cli import cli
from kvcache.maintenance import compact, gc, inspect_cache, verify


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def src(tmp_path):
    """A local cache holding indices 0..149 of ImageSource(200) (published with partial=True)."""
    path = str(tmp_path / "src")
    with kvcache.LmdbCachedDataset(ImageSource(200), path) as ds:
        for i in range(150):
            ds[i]
    return path


def test_publish_makes_a_verified_immutable_copy(src, tmp_path):
    dest = str(tmp_path / "shared" / "pub")
    r = kvcache.publish(src, dest, partial=True)
    assert (r.entries, r.replaced, r.exchange) == (150, False, "rename")
    assert sorted(os.listdir(dest)) == ["data.mdb", "kvcache.lock", "kvcache.published"]  # no lock.mdb
    assert [n for n in os.listdir(tmp_path / "shared") if n != "pub"] == []  # no temp dir left
    for name in os.listdir(dest):
        assert os.stat(os.path.join(dest, name)).st_mode & 0o777 == 0o444
    assert verify(dest).ok
    info = inspect_cache(dest)
    assert info.published["from"] == src and info.published["entries"] == 150
    assert info.lockfree and info.current_entries == 150 and info.filesystem


def test_reading_a_published_cache_writes_nothing(src, tmp_path):
    dest = str(tmp_path / "pub")
    kvcache.publish(src, dest, partial=True)
    before = tree_hashes(dest)
    source = ImageSource(200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = kvcache.LmdbCachedDataset(source, dest)
        assert ds._env.lockfree and ds._env.env.flags()["lock"] is False
        assert ds._env.env.flags()["readahead"] is True  # the published default
        for _ in range(2):
            assert all(same(ds[i], source[i]) for i in range(200))
        st = ds.stats()
        ds.close()
    assert (st.hits, st.misses, st.writes) == (300, 100, 0)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "published cache" in msgs[0] and "not stored" in msgs[0], msgs
    assert all(issubclass(w.category, kvcache.KvCacheWarning) for w in caught)
    with kvcache.LmdbCachedDataset(None, dest) as ro:  # no source: serve what it holds
        assert len(ro) == 200 and same(ro[7], source[7])
        with pytest.raises(kvcache.MissingSampleError):
            ro[199]
    with kvcache.open_cache(dest) as view:
        assert len(view) == 150
    assert tree_hashes(dest) == before  # not a byte changed, no file created


def test_a_changed_source_is_computed_not_stored(src, tmp_path):
    dest = str(tmp_path / "pub")
    kvcache.publish(src, dest, partial=True)
    other = ImageSource(200, salt=5)  # another salt: another fingerprint (its attributes)
    with pytest.warns(kvcache.KvCacheWarning, match="published cache"), \
            pytest.warns(kvcache.KvCacheWarning, match="150 cached samples of the previous source"):
        with kvcache.LmdbCachedDataset(other, dest, version="v2") as ds:
            assert all(same(ds[i], other[i]) for i in range(20))
            assert ds.stats().hits == 0


def test_maintenance_refuses_to_change_a_published_cache(src, tmp_path):
    dest = str(tmp_path / "pub")
    kvcache.publish(src, dest, partial=True)
    before = tree_hashes(dest)
    for fn in (compact, gc):
        with pytest.raises(kvcache.CacheReadOnlyError, match="published cache"):
            fn(dest)
    r = invoke("compact", dest)
    assert r.exit_code == 1 and "publish --force" in r.output
    assert tree_hashes(dest) == before and sorted(os.listdir(dest)) == ["data.mdb", "kvcache.lock", "kvcache.published"]


def test_force_replaces_atomically(src, tmp_path):
    dest = str(tmp_path / "pub")
    kvcache.publish(src, dest, partial=True)
    with pytest.raises(kvcache.CacheExistsError, match="--force"):
        kvcache.publish(src, dest, partial=True)
    # a reader of the old copy keeps it while the new one takes its place
    old_reader = kvcache.LmdbCachedDataset(None, dest)
    assert same(old_reader[3], ImageSource(200)[3])
    with kvcache.LmdbCachedDataset(ImageSource(200), src) as ds:
        ds.build()  # the source now holds all 200
    r = kvcache.publish(src, dest, force=True, partial=True)
    assert r.replaced and r.exchange in ("exchange", "aside") and r.entries == 200
    assert sorted(os.listdir(tmp_path)) == ["pub", "src"]  # the old copy is gone
    assert same(old_reader[3], ImageSource(200)[3])  # still reads the old (unlinked) file
    old_reader.close()
    with kvcache.LmdbCachedDataset(None, dest) as ds:
        assert same(ds[199], ImageSource(200)[199])


def test_never_replaces_what_is_not_a_cache(src, tmp_path):
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(kvcache.NotACacheError):
        kvcache.publish(src, str(dest), force=True, partial=True)
    assert (dest / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert kvcache.publish(src, str(empty), partial=True).entries == 150  # an empty directory is taken over


def test_cli_publish(src, tmp_path):
    dest = str(tmp_path / "pub")
    r = invoke("publish", "--json", "--partial", src, dest)
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["entries"] == 150 and j["dest"] == dest
    r = invoke("publish", "--partial", src, dest)
    assert r.exit_code == 2 and "--force" in r.output
    r = invoke("publish", "--force", "--partial", src, dest)
    assert r.exit_code == 0 and "150 records verified" in r.output and "replaced" in r.output
    r = invoke("publish", str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert r.exit_code == 2
    r = invoke("inspect", dest)
    assert r.exit_code == 0 and "published:     yes" in r.output and "filesystem:" in r.output
    assert "published:     no" in invoke("inspect", src).output


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_on_a_published_cache(src, tmp_path, method):
    with kvcache.LmdbCachedDataset(ImageSource(200), src) as ds:
        ds.build()
    dest = str(tmp_path / "pub")
    kvcache.publish(src, dest, partial=True)
    before = tree_hashes(dest)
    ds = kvcache.LmdbCachedDataset(None, dest)
    dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=method,
                                     persistent_workers=True)
    source = ImageSource(200)
    want_imgs = torch.stack([source[i][0] for i in range(200)])
    want_labels = torch.tensor([source[i][1] for i in range(200)])
    for _epoch in range(3):
        batches = list(dl)
        assert torch.equal(torch.cat([b[0] for b in batches]), want_imgs)
        assert torch.equal(torch.cat([b[1] for b in batches]), want_labels)
    del dl, batches
    ds.close()
    assert tree_hashes(dest) == before and "lock.mdb" not in os.listdir(dest)
