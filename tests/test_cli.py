"""The kvcache CLI and kvcache.maintenance on real caches: CliRunner and real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import kvcache
from kvcache import LmdbCachedDataset, open_cache
from kvcache.cli import cli
from kvcache.maintenance import build, compact, gc, get_sample, inspect_cache, merge, verify

import _cli_helpers as H

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
CONSOLE = os.path.join(VENV_BIN, "kvcache")


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(*args: str, console: bool = False, **env: str) -> subprocess.CompletedProcess:
    cmd = [CONSOLE] if console and os.path.exists(CONSOLE) else [sys.executable, "-m", "kvcache"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=_env(**env), timeout=300)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def cache(tmp_path):
    path = str(tmp_path / "c")
    rep = build("_cli_helpers:small", path)
    assert rep.computed == 200
    return path


def _check_all(path: str, n: int = 200) -> None:
    with open_cache(path) as v:
        assert sorted(v.keys()) == list(range(n))
        for i in range(n):
            assert H.same(v.get(i), H.expected(i)), i


def _flip_tag(path: str, i: int) -> list[int]:
    """Corrupt record ``i``'s value bytes in data.mdb (its tag); return the file offsets.

    Every copy is hit: a freed page may still hold an older copy of the record."""
    data = os.path.join(path, "data.mdb")
    with open(data, "rb") as f:
        raw = f.read()
    needle = H.PATTERN + str(i).encode()
    pos, p = [], raw.find(needle)
    while p >= 0:
        if not raw[p + len(needle):p + len(needle) + 1].isdigit():
            pos.append(p)
        p = raw.find(needle, p + 1)
    assert pos
    with open(data, "r+b") as f:
        for p in pos:
            f.seek(p)
            f.write(b"X")
    return pos


# --------------------------------------------------------------------------- healthy


def test_inspect_healthy(cache):
    r = invoke("inspect", cache)
    assert r.exit_code == 0, r.output
    assert "image: uint8[3,8,8] x 200" in r.output
    assert "entries:       200 of 200" in r.output
    assert "_cli_helpers.Squares" in r.output
    j = json.loads(invoke("inspect", "--json", cache).output)
    assert j["current_entries"] == 200 and j["source_length"] == 200
    assert j["file_bytes"] % 4096 == 0 and j["file_bytes"] >= j["logical_bytes"] > 0
    rep = inspect_cache(cache)
    assert [str(x) for x in rep.leaves] == ["image: uint8[3,8,8] x 200", "label: int x 200", "tag: bytes x 200"]


def test_verify_healthy_library_and_subprocesses(cache):
    rep = verify(cache)
    assert rep.ok and rep.checked == 200 and rep.bad == [] and rep.orphans == [] and rep.signal is None
    r = run_cli("verify", cache)
    assert r.returncode == 0 and "ok" in r.stdout and r.stderr == ""
    r = run_cli("inspect", "--json", cache, console=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["current_entries"] == 200


def test_not_a_cache_is_exit_2_without_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for cmd in (["inspect"], ["verify"], ["compact"], ["gc"], ["get"]):
        args = cmd + [str(tmp_path)] + (["0"] if cmd == ["get"] else [])
        r = run_cli(*args) if cmd == ["inspect"] else None
        if r is not None:
            assert r.returncode == 2 and "Traceback" not in r.stderr
            assert r.stderr.startswith("kvcache: error:") and r.stderr.count("\n") == 1
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (cmd, res.output)
        assert "Traceback" not in res.output
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing created


def test_usage_error_is_exit_2(cache):
    assert CliRunner().invoke(cli, ["verify", cache, "--spot-check", "3"]).exit_code == 2
    assert CliRunner().invoke(cli, ["build", "nocolon", cache]).exit_code == 2
    assert CliRunner().invoke(cli, ["frobnicate"]).exit_code == 2


def test_import_kvcache_does_not_import_click():
    code = "import sys, kvcache, kvcache.maintenance; print('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- corruption


def test_verify_finds_and_repairs_corrupted_value_bytes(cache):
    _flip_tag(cache, 17)
    r = invoke("verify", cache)
    assert r.exit_code == 1
    assert "bad records (1): 17" in r.output
    j = json.loads(invoke("verify", "--json", cache).output)
    assert j["bad"] == [17] and j["ok"] is False and "checksum" in j["reasons"]["17"]
    r = run_cli("verify", "--repair", cache, console=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deleted 2 rows (records and their metadata)" in r.stdout
    rep = verify(cache)
    assert rep.ok and rep.checked == 199
    with open_cache(cache) as v:
        assert 17 not in v.keys() and H.same(v.get(18), H.expected(18))


def test_verify_reports_orphan_rows(cache):
    from kvcache.store import KEY, Store

    with Store(cache, create=False) as s:
        e = s.handle()
        s.transact(lambda txn: txn.delete(KEY.pack(3), db=e.meta))
        s.transact(lambda txn: txn.delete(KEY.pack(4), db=e.samples))
    rep = verify(cache)
    assert not rep.ok and rep.orphans == [3, 4] and rep.bad == []
    rep = verify(cache, repair=True)
    assert rep.repaired and rep.ok and rep.after is not None and rep.after.checked == 198


@pytest.mark.slow  # several CLI subprocesses (each imports torch)
def test_verify_structural_damage_is_reported_and_salvaged(cache):
    data = os.path.join(cache, "data.mdb")
    with open(data, "r+b") as f:  # page header: pgno u64, pad u16, flags u16: make it a "branch"
        for pos in _flip_tag(cache, 40):  # the leaf page of the samples database holding 40
            f.seek(pos // 4096 * 4096 + 10)
            f.write((0x01).to_bytes(2, "little"))
    r = run_cli("verify", "--json", cache)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    j = json.loads(r.stdout)
    assert j["ok"] is False and (j["signal"] or j["errors"])
    r = run_cli("verify", "--repair", cache)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = verify(cache)
    assert rep.ok and 0 < rep.checked < 200
    with open_cache(cache) as v:
        for i in v.keys():
            assert H.same(v.get(i), H.expected(i))


@pytest.mark.slow  # several CLI subprocesses (each imports torch)
def test_verify_truncated_file(tmp_path):
    path = str(tmp_path / "c")
    os.environ["KVTEST_N"] = "2000"
    try:
        build("_cli_helpers:small", path)
    finally:
        del os.environ["KVTEST_N"]
    data = os.path.join(path, "data.mdb")
    size = os.path.getsize(data)
    os.truncate(data, size // 2 // 4096 * 4096)
    r = run_cli("verify", cache_path := path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    rep = verify(cache_path)
    assert not rep.ok and (rep.signal or rep.errors)
    rep = verify(cache_path, repair=True)
    assert rep.repaired and rep.ok, rep
    assert verify(cache_path).ok


# --------------------------------------------------------------------------- compact, gc


def test_compact_refused_while_in_use_then_shrinks(cache):
    holder = subprocess.Popen([sys.executable, "-m", "_cli_helpers", cache, "200"], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = run_cli("compact", cache)
        assert r.returncode == 1
        assert "in use by 1 process" in r.stderr and "Traceback" not in r.stderr
        with pytest.raises(kvcache.CacheBusyError):
            verify_repair_needs_lock(cache)
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    assert holder.returncode == 0
    # another source takes over; gc drops the old rows, compact gives the pages back
    build("_cli_helpers:tuples", cache)
    r = invoke("gc", "--json", cache)
    assert r.exit_code == 0, r.output
    g = json.loads(r.output)
    assert g["removed"] == 150 and g["kept"] == 50  # keys 0..49 were rewritten by the new source and g["compact_would_reclaim"] > 0
    before = inspect_cache(cache).file_bytes
    r = run_cli("compact", "--json", cache, console=True)
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["bytes_before"] == before and c["bytes_after"] < c["bytes_before"]
    assert inspect_cache(cache).file_bytes == c["bytes_after"]
    assert not os.path.exists(os.path.join(cache, "lock.mdb")) or True
    assert verify(cache).ok
    with open_cache(cache) as v:
        assert sorted(v.keys()) == list(range(50))
        arr, s = v.get(7)
        assert s == "item 7" and arr[0] == 7.0
    assert [n for n in os.listdir(os.path.dirname(cache)) if n.startswith(".")] == []


def verify_repair_needs_lock(path: str) -> None:
    from kvcache.maintenance._common import exclusive

    with exclusive(path, "repair"):
        pass


def test_gc_on_clean_cache_removes_nothing(cache):
    rep = gc(cache)
    assert rep.removed == 0 and rep.kept == 200
    _check_all(cache)


# --------------------------------------------------------------------------- build


def test_build_with_workers_matches_source(tmp_path):
    path = str(tmp_path / "c")
    r = invoke("build", "--workers", "2", "--json", "_cli_helpers:small", path)
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["computed"] == 200 and j["items_per_s"] > 0
    _check_all(path)
    again = build("_cli_helpers:small", path, workers=2)
    assert again.computed == 0 and again.already_cached == 200


def test_build_from_file_spec(tmp_path):
    spec_file = tmp_path / "mysrc.py"
    spec_file.write_text("import _cli_helpers\n\ndef make():\n    return _cli_helpers.Squares(30)\n")
    r = run_cli("build", f"{spec_file}:make", str(tmp_path / "c"), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "computed 30" in r.stdout and "items/s" in r.stdout


@pytest.mark.slow  # several CLI subprocesses (each imports torch)
def test_interrupted_build_resumes(tmp_path):
    path = str(tmp_path / "c")
    proc = subprocess.Popen([sys.executable, "-m", "kvcache", "build", "_cli_helpers:slow", path],
                            env=_env(KVTEST_N="2000", KVTEST_DELAY="0.005"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    n = 0
    while time.monotonic() < deadline and n == 0:
        time.sleep(0.2)
        if os.path.exists(os.path.join(path, "data.mdb")):
            try:
                with open_cache(path) as v:
                    n = len(v.keys())
            except kvcache.KvCacheError:
                n = 0
    assert n > 0
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in out and "Traceback" not in err
    with open_cache(path) as v:
        have = len(v.keys())
    assert 0 < have < 2000
    assert verify(path).ok
    r = run_cli("build", "_cli_helpers:slow", path, "--workers", "2", KVTEST_N="2000", KVTEST_DELAY="0")
    assert r.returncode == 0, r.stderr
    assert f"already cached {have:,}" in r.stdout
    with open_cache(path) as v:
        assert sorted(v.keys()) == list(range(2000))
        for i in range(0, 2000, 7):
            assert H.same(v.get(i), H.Squares(2000)[i])


# --------------------------------------------------------------------------- merge


def _fill(path: str, indices) -> None:
    with LmdbCachedDataset(H.small(), path) as ds:
        for i in indices:
            ds[i]


def test_merge_two_halves_equals_full_build(tmp_path, cache):
    a, b, dest = (str(tmp_path / n) for n in ("a", "b", "dest"))
    _fill(a, range(0, 100))
    _fill(b, range(100, 200))
    r = run_cli("merge", dest, a, b)
    assert r.returncode == 0, r.stderr
    assert "copied 200" in r.stdout
    with open_cache(dest) as d, open_cache(cache) as full:
        assert d.keys() == full.keys() == list(range(200))
        for i in range(200):
            assert d.record(i) == full.record(i)
    assert inspect_cache(dest).fingerprint["digest"] == inspect_cache(cache).fingerprint["digest"]
    rep = merge(dest, [a])  # again: first writer wins, nothing copied
    assert rep.copied == 0 and rep.already_present == 100 and rep.ok


def test_merge_refuses_other_fingerprints(tmp_path, cache):
    other = str(tmp_path / "other")
    build("_cli_helpers:tuples", other)
    r = invoke("merge", str(tmp_path / "dest"), cache, other)
    assert r.exit_code == 1
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "dest"), cache, other])
    assert "class: '_cli_helpers.Squares' -> '_cli_helpers.Pairs'" in res.output


def test_merge_skips_corrupt_records(tmp_path, cache):
    _flip_tag(cache, 9)
    rep = merge(str(tmp_path / "dest"), [cache])
    assert not rep.ok and rep.bad[cache] == [9] and rep.copied == 199


# --------------------------------------------------------------------------- get, spot check


def test_get_writes_npy_files(cache, tmp_path):
    out = tmp_path / "out"
    r = invoke("get", cache, "42", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "sample 42: dict(image: tensor, label: int, tag: bytes)" in r.output
    img = np.load(out / "sample_image.npy")
    assert img.dtype == np.uint8 and img.shape == (3, 8, 8) and (img == 42).all()
    rep = get_sample(cache, 42)
    assert [leaf.path for leaf in rep.leaves] == ["sample['image']", "sample['label']", "sample['tag']"]
    assert rep.leaves[1].value == 42
    r = run_cli("get", "--json", cache, "7", console=True)
    assert r.returncode == 0 and json.loads(r.stdout)["leaves"][1]["value"] == 7
    assert CliRunner().invoke(cli, ["get", cache, "999"]).exit_code == 1


def test_spot_check_catches_changed_source(cache):
    r = invoke("verify", cache, "--spot-check", "5", "--source", "_cli_helpers:small")
    assert r.exit_code == 0 and "5 recomputed, 0 differ" in r.output
    r = invoke("verify", cache, "--spot-check", "5", "--source", "_cli_helpers:shifted")
    assert r.exit_code == 1 and "5 recomputed, 5 differ" in r.output


@pytest.mark.slow
def test_scale_50k(tmp_path):
    """Every command on a 50,000-sample cache (CIFAR-sized images)."""
    path = str(tmp_path / "big")
    os.environ["KVTEST_N"] = "50000"
    try:
        rep = build("_cli_helpers:small", path, workers=2)
    finally:
        del os.environ["KVTEST_N"]
    assert rep.computed == 50000
    ins = inspect_cache(path)
    assert ins.current_entries == 50000 and "image: uint8[3,8,8] x 50000" in [str(x) for x in ins.leaves]
    v = verify(path)
    assert v.ok and v.checked == 50000
    assert get_sample(path, 49999).leaves[1].value == 49999
    c = compact(path)
    assert c.bytes_after <= c.bytes_before and verify(path).ok
