"""Keyed caches through the CLI and the maintenance functions: build --key (a real
subprocess of the installed command), inspect, get --key, gc by the source's keys,
verify/repair, merge, compact, publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import _key_helpers as K
import pytest
from click.testing import CliRunner
from helpers import same

from kvcache import LmdbCachedDataset, StaleCacheError, open_cache, publish
from kvcache.cli import cli
from kvcache.maintenance import compact, gc, get_sample, inspect_cache, merge, verify

HERE = os.path.dirname(os.path.abspath(__file__))
CONSOLE = os.path.join(os.path.dirname(sys.executable), "kvcache")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def keyed(path: str, src: K.Folder | None = None) -> K.Folder:
    src = src or K.folder()
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        ds.build()
    return src


def check(path: str, src: K.Folder) -> None:
    with open_cache(path, key=src.key) as v:
        assert len(v) == len(src) and all(same(v[i], src.expected(i)) for i in range(len(src)))


def test_cli_build_key_inspect_and_get(tmp_path):
    path = str(tmp_path / "c")
    cmd = [CONSOLE] if os.path.exists(CONSOLE) else [sys.executable, "-m", "kvcache"]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd + ["build", "_key_helpers:folder", path, "--key", "key", "--workers", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "computed 40" in p.stdout
    check(path, K.folder())
    r = invoke("inspect", path)
    assert r.exit_code == 0 and "keyed:         yes" in r.output
    assert json.loads(invoke("inspect", path, "--json").output)["keyed"] is True
    assert inspect_cache(path).keyed
    r = invoke("get", path, "--key", "img/00003.png")
    assert r.exit_code == 0 and r.output.startswith("sample key 'img/00003.png': tuple(tensor, int, str)")
    assert get_sample(path, key="img/00003.png").leaves[2].value == "img/00003.png"
    r = CliRunner().invoke(cli, ["get", path, "3"])
    assert r.exit_code == 1 and "keyed cache" in r.output
    r = CliRunner().invoke(cli, ["get", path, "--key", "nope"])
    assert r.exit_code == 1 and "not in the cache" in r.output
    # a module:callable key spec; a rerun computes nothing
    p = subprocess.run(cmd + ["build", "_key_helpers:folder", path, "--key", "_key_helpers:name_key", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout)["computed"] == 0, p.stderr


def test_gc_drops_records_whose_keys_the_source_no_longer_has(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    path = str(tmp_path / "c")
    keyed(path)
    fewer = K.fewer()
    r = CliRunner().invoke(cli, ["gc", path, "--source", "_key_helpers:fewer"])
    assert r.exit_code == 2 and "--source and --key go together" in r.output
    with pytest.raises(StaleCacheError, match="version"):  # not the current source: nothing deleted
        gc(path, fewer, fewer.key, version="2")
    assert len(open_cache(path)) == 40
    r = invoke("gc", path, "--source", "_key_helpers:fewer", "--key", "key", "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["removed"] == 10 and rep["unkeyed"] == 10 and rep["kept"] == 30
    check(path, fewer)
    with open_cache(path) as v:
        assert sorted(v) == sorted(fewer.names)
    assert gc(path, fewer, fewer.key).removed == 0
    idx = str(tmp_path / "i")
    with LmdbCachedDataset(K.folder(), idx) as ds:
        ds[0]
    with pytest.raises(ValueError, match="not a keyed cache"):
        gc(idx, fewer, fewer.key)


def test_verify_and_repair_a_keyed_cache(tmp_path):
    path = str(tmp_path / "c")
    src = keyed(path)
    assert verify(path).ok
    with LmdbCachedDataset(src, path, key=src.key) as ds:
        lk = ds.storage_key(5)[0]
        e = ds.store.handle()
        rec = bytearray(ds.store.begin().get(lk))
        rec[-1] ^= 0xFF
        ds.store.transact(lambda txn: txn.put(lk, bytes(rec), db=e.samples))
    rep = verify(path)
    assert not rep.ok and rep.bad == [lk.hex()] and rep.reasons[lk.hex()]
    r = CliRunner().invoke(cli, ["verify", path])
    assert r.exit_code == 1 and lk.hex() in r.output
    rep = verify(path, repair=True)
    assert rep.ok and rep.removed == 2  # the record and its metadata row
    with open_cache(path) as v:
        assert len(v) == 39 and src.names[5] not in v
    with LmdbCachedDataset(src, path, key=src.key) as ds:  # recomputed on read
        assert same(ds[5], src.expected(5)) and ds.stats().misses == 1


def test_spot_check_of_a_keyed_cache(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    path = str(tmp_path / "c")
    keyed(path)
    rep = verify(path, spot_check=5, source="_key_helpers:folder", key="key")
    assert rep.ok and rep.spot_checked == 5
    with pytest.raises(StaleCacheError):  # without its key function the source is another fingerprint
        verify(path, spot_check=5, source="_key_helpers:folder")


def test_merge_keyed_caches_built_from_parts(tmp_path):
    a, b, dest = (str(tmp_path / x) for x in "abd")
    keyed(a, K.Folder(K.names(20)))
    keyed(b, K.Folder(K.names(25, 15)))  # overlaps a in 5 names; another length, same fingerprint
    rep = merge(dest, [a, b])
    assert rep.ok and rep.copied == 40 and rep.already_present == 5 and rep.entries == 40
    whole = K.Folder(K.names(40))
    check(dest, whole)
    with open_cache(dest) as v:
        assert sorted(v) == whole.names
    with LmdbCachedDataset(whole, dest, key=whole.key) as ds:
        assert ds.build().computed == 0


def test_compact_and_publish_keep_a_keyed_cache(tmp_path):
    path, pub = str(tmp_path / "c"), str(tmp_path / "pub")
    src = keyed(path)
    compact(path)
    check(path, src)
    publish(path, pub)
    check(pub, src)
    with LmdbCachedDataset(None, pub, key=src.key) as ds:
        assert len(ds) == 40 and same(ds[7], src.expected(7))
    moved = K.Folder(list(reversed(src.names)))
    with LmdbCachedDataset(moved, pub, key=moved.key) as ds:  # read-only, lock-free: all hits
        assert all(same(ds[i], moved.expected(i)) for i in range(40)) and ds.stats().misses == 0
