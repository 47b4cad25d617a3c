"""The opening decision (kvcache.opening) and the publish record (kvcache.pubrecord):
a published cache, or a byte-identical copy of one, opens without the structural walk;
anything else is walked; the modes are what the path and filesystem call for."""

import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from helpers import ImageSource, same

import kvcache
from kvcache import structure
from kvcache.cli import cli
from kvcache.errors import CacheCorruptError, NotACacheError
from kvcache.maintenance import verify
from kvcache.opening import decide
from kvcache.pubrecord import RECORD_NAME, file_digest


@pytest.fixture
def published(tmp_path):
    src = str(tmp_path / "src")
    with kvcache.LmdbCachedDataset(ImageSource(120), src) as ds:
        ds.build()
    dest = str(tmp_path / "pub")
    kvcache.publish(src, dest)
    return src, dest


@pytest.fixture
def walks(monkeypatch):
    """The paths structural validation walks in this process from now on."""
    seen = []
    real = structure.validate

    def counting(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(structure, "validate", counting)
    return seen


def _writable_copy(a, b):
    shutil.copytree(a, b)
    for n in os.listdir(b):
        os.chmod(os.path.join(b, n), 0o644)


def test_publish_writes_a_record_of_what_it_validated(published):
    src, dest = published
    rec = kvcache.publish_record(dest)
    assert rec is not None and rec["size"] == os.path.getsize(os.path.join(dest, "data.mdb"))
    assert rec["file_xxh3"] == file_digest(dest)
    assert rec["format"]["format"] == "kvcache" and rec["published"]["entries"] == 120
    assert os.stat(os.path.join(dest, RECORD_NAME)).st_mode & 0o777 == 0o444
    assert kvcache.matches_record(dest)
    assert kvcache.publish_record(src) is None and not kvcache.matches_record(src)


@pytest.mark.parametrize("how", ["copytree", "cp -r", "rsync"])
def test_a_plain_copy_is_trusted_without_a_walk(published, tmp_path, walks, how):
    _src, dest = published
    copy = str(tmp_path / "copy")
    if how == "copytree":
        shutil.copytree(dest, copy)
    elif how == "cp -r":
        subprocess.run(["cp", "-r", dest, copy], check=True)
    else:
        if shutil.which("rsync") is None:
            pytest.skip("no rsync")
        subprocess.run(["rsync", "-a", dest + "/", copy + "/"], check=True)
    assert kvcache.matches_record(copy) and kvcache.matches_record(copy, kvcache.publish_record(dest))
    source = ImageSource(120)
    with kvcache.LmdbCachedDataset(source, copy) as ds:
        op = ds._env.opening
        assert (op.mode, op.trusted, op.lockfree) == ("published", "record", True)
        assert all(same(ds[i], source[i]) for i in range(120))
    assert walks == []  # neither the dataset nor anything else walked the file
    with kvcache.open_cache(copy) as view:
        assert len(view) == 120
    assert walks == []


def test_a_changed_file_is_walked_and_a_damaged_one_refused(published, tmp_path, walks):
    src, dest = published
    other = str(tmp_path / "other")
    with kvcache.LmdbCachedDataset(ImageSource(60, salt=1), str(tmp_path / "src2")) as ds:
        ds.build()
    kvcache.publish(str(tmp_path / "src2"), other)
    # another version's data.mdb under this record: the record does not match, so it is walked
    mixed = str(tmp_path / "mixed")
    _writable_copy(dest, mixed)
    shutil.copyfile(os.path.join(other, "data.mdb"), os.path.join(mixed, "data.mdb"))
    assert not kvcache.matches_record(mixed)
    walks.clear()
    op = decide(mixed, readonly=True, create=False)
    assert op.mode == "published" and op.trusted == "validated" and walks == [mixed]
    # a broken page the record does not cover (it covers size and meta pages) in a copy
    # whose record no longer matches (the meta pages were rewritten): refused at open
    broken = str(tmp_path / "broken")
    _writable_copy(dest, broken)
    data = os.path.join(broken, "data.mdb")
    rec = kvcache.publish_record(broken)
    with open(data, "r+b") as f:  # zero the main tree's root page and bump the txnid
        f.seek(rec["main_root"] * rec["psize"])
        f.write(bytes(rec["psize"]))
        f.seek(144)
        f.write((rec["txnid"] + 5).to_bytes(8, "little"))
    assert not kvcache.matches_record(broken)
    # the size still matches: decide() trusts the record provisionally, and the opener
    # compares the meta pages it maps, finds them changed, and decides again, walking
    assert decide(broken, readonly=True, create=False).trusted == "record"
    op = decide(broken, readonly=True, create=False, trust_record=False)
    assert op.mode == "damaged" and "kvcache verify --repair" in op.reason
    with pytest.raises(CacheCorruptError, match="structure is damaged"):
        kvcache.LmdbCachedDataset(None, broken)


def test_decide_names_the_mode(tmp_path, published):
    src, dest = published
    new = str(tmp_path / "new")
    assert decide(new, readonly=False, create=True).mode == "create"
    with pytest.raises(NotACacheError):
        decide(new, readonly=True, create=False)
    op = decide(src, readonly=False, create=True)
    assert (op.mode, op.trusted, op.lockfree, op.published) == ("locked", "validated", False, None)
    assert decide(dest, readonly=True, create=False).published["entries"] == 120


def test_verify_checks_a_published_copy_byte_for_byte(published, tmp_path):
    _src, dest = published
    rep = verify(dest)
    assert rep.ok and rep.published_record == "matches"
    r = CliRunner().invoke(cli, ["verify", dest])
    assert r.exit_code == 0 and "byte for byte" in r.output, r.output
    copy = str(tmp_path / "copy")
    _writable_copy(dest, copy)
    data = os.path.join(copy, "data.mdb")
    with open(data, "r+b") as f:  # one byte inside a record's value: the meta pages are unchanged
        f.seek(os.path.getsize(data) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert kvcache.matches_record(copy)  # O(1): the meta pages and the size
    rep = verify(copy)
    assert not rep.ok and rep.published_record == "differs"
    r = CliRunner().invoke(cli, ["verify", "--json", copy])
    assert r.exit_code == 1 and json.loads(r.output)["published_record"] == "differs"


def test_a_malformed_record_is_ignored(published, tmp_path, walks):
    _src, dest = published
    copy = str(tmp_path / "copy")
    _writable_copy(dest, copy)
    for text in ("{not json", json.dumps({"record": "kvcache-publish", "version": 1, "size": "x"}),
                 json.dumps([1, 2])):
        with open(os.path.join(copy, RECORD_NAME), "w") as f:
            f.write(text)
        assert kvcache.publish_record(copy) is None and not kvcache.matches_record(copy)
    source = ImageSource(120)
    with kvcache.LmdbCachedDataset(source, copy) as ds:  # walked, still published (its info row)
        assert ds._env.opening.trusted == "validated" and ds._env.lockfree
        assert same(ds[7], source[7])
    assert walks == [copy]
