"""The kvcache CLI and kvcache.maintenance on real caches: CliRunner and real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import _cli_helpers as H
import numpy as np
import pytest
from click.testing import CliRunner

import kvcache
from kvcache import LmdbCachedDataset, open_cache
from kvcache.cli import cli
from kvcache.maintenance import (
    build,
    compact,
    gc,
    get_sample,
    inspect_cache,
    merge,
    verify,
)

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
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=_env(**env), timeout=300,
                          check=False)


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
        assert list(v.keys()) == list(range(n))
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


def _break_page(path: str, i: int) -> None:
    """Turn the leaf page holding record ``i`` into a "branch" page (structural damage)."""
    data = os.path.join(path, "data.mdb")
    with open(data, "r+b") as f:  # page header: pgno u64, pad u16, flags u16
        for pos in _flip_tag(path, i):
            f.seek(pos // 4096 * 4096 + 10)
            f.write((0x01).to_bytes(2, "little"))


def _truncated(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "t")
    monkeypatch.setenv("KVTEST_N", "2000")
    # many commits, as a cache filled by training has: the first half of the file then
    # holds whole older trees (one 2000-record commit puts every root, and the info
    # table, past the cut, and nothing is left to salvage)
    with LmdbCachedDataset(H.small(), path, write_batch=256) as ds:
        for i in range(2000):
            ds[i]
    data = os.path.join(path, "data.mdb")
    os.truncate(data, os.path.getsize(data) // 2 // 4096 * 4096)
    return path


def _fill(path: str, indices) -> None:
    with LmdbCachedDataset(H.small(), path) as ds:
        for i in indices:
            ds[i]


# --------------------------------------------------------------------------- real processes

SCRIPT = r"""
set -u
PY=$1; K=$2; C=$3; N=$4
"$PY" -m kvcache inspect --json "$C" > inspect.json; echo "inspect $?" >> rc
"$K" verify "$C" > verify.out 2> verify.err; echo "verify $?" >> rc
"$K" inspect "$N" > notacache.out 2> notacache.err; echo "notacache $?" >> rc
"$PY" -c "import sys, kvcache, kvcache.maintenance; print('click' in sys.modules)" > light.out
"""


def test_real_processes(cache, tmp_path):
    """The default run's real processes, in one script: ``python -m kvcache``, the console
    script, exit codes 0 and 2 with one clean stderr line, and ``import kvcache`` without click."""
    assert os.path.exists(CONSOLE), "the kvcache console script is not installed"
    (tmp_path / "notes.txt").write_text("hello")
    work = tmp_path / "out"
    work.mkdir()
    subprocess.run(["bash", "-c", SCRIPT, "script", sys.executable, CONSOLE, cache, str(tmp_path)],
                   cwd=work, env=_env(), check=True, timeout=300)
    rc = dict(line.split() for line in (work / "rc").read_text().splitlines())
    assert rc == {"inspect": "0", "verify": "0", "notacache": "2"}
    assert json.loads((work / "inspect.json").read_text())["current_entries"] == 200
    assert (work / "verify.out").read_text().splitlines()[-1] == "ok"
    assert (work / "verify.err").read_text() == ""  # not a terminal: no progress bar
    err = (work / "notacache.err").read_text()
    assert err.startswith("kvcache: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert (work / "notacache.out").read_text() == ""
    assert (work / "light.out").read_text().strip() == "False"
    assert sorted(os.listdir(tmp_path)) == ["c", "notes.txt", "out"]  # nothing created


@pytest.mark.slow  # one process per command (each imports torch)
def test_every_command_as_a_real_process(cache, tmp_path):
    r = run_cli("get", "--json", cache, "7", console=True)
    assert r.returncode == 0 and json.loads(r.stdout)["leaves"][1]["value"] == 7
    r = run_cli("gc", cache)
    assert r.returncode == 0 and "removed 0 records" in r.stdout
    r = run_cli("compact", "--json", cache, console=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"] == 200
    r = run_cli("merge", str(tmp_path / "m"), cache)
    assert r.returncode == 0 and "copied 200" in r.stdout
    spec_file = tmp_path / "mysrc.py"
    spec_file.write_text("import _cli_helpers\n\ndef make():\n    return _cli_helpers.Squares(30)\n")
    r = run_cli("build", f"{spec_file}:make", str(tmp_path / "b"), "--workers", "2", console=True)
    assert r.returncode == 0, r.stderr
    assert "computed 30" in r.stdout and "items/s" in r.stdout
    _flip_tag(cache, 17)
    r = run_cli("verify", cache)
    assert r.returncode == 1 and "bad records (1): 17" in r.stdout
    r = run_cli("verify", "--repair", cache, console=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deleted 2 rows (records and their metadata)" in r.stdout
    (tmp_path / "notes.txt").write_text("hello")
    for cmd in (["verify"], ["compact"], ["gc"], ["get"]):
        r = run_cli(*cmd, str(tmp_path), *(["0"] if cmd == ["get"] else []))
        assert r.returncode == 2 and r.stderr.startswith("kvcache: error:"), (cmd, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stdout == ""


# --------------------------------------------------------------------------- healthy


def test_inspect_healthy(cache):
    r = invoke("inspect", cache)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "image: uint8[3,8,8] x 200" in out and "label: int x 200" in out
    assert "entries:       200 of 200 (100.0%)" in out
    for key in ("format:", "fingerprint:", "class:", "logical bytes:", "file bytes:", "map:",
                "readers:", "created:", "last written:"):
        assert key in out, key
    j = json.loads(invoke("inspect", "--json", cache).output)
    assert j["current_entries"] == j["entries"] == j["source_length"] == 200
    assert 0 < j["total_bytes"] < j["file_bytes"] <= j["map_size"]
    assert j["file_bytes"] % 4096 == 0 and j["disk_bytes"] >= j["file_bytes"]
    assert j["max_readers"] >= 1 and j["readers_used"] >= 0
    assert j["created"] <= j["last_written"] <= time.time()
    assert j["fingerprint"]["parts"]["class"] == "_cli_helpers.Squares"


def test_inspect_partial_cache_shows_cached_vs_source_length(tmp_path):
    path = str(tmp_path / "p")
    _fill(path, range(50))
    r = invoke("inspect", path)
    assert "entries:       50 of 200 (25.0%)" in r.output, r.output


def test_verify_healthy(cache):
    rep = verify(cache)
    assert rep.ok and rep.checked == 200 and rep.bad == [] and rep.orphans == [] and rep.signal is None
    r = invoke("verify", cache)
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "ok"
    assert r.stderr == ""  # not a terminal: no progress bar
    j = json.loads(invoke("verify", "--json", cache).stdout)
    assert j["ok"] is True and j["checked"] == 200


def test_not_a_cache_is_exit_2_without_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for cmd in (["inspect"], ["verify"], ["compact"], ["gc"], ["get"]):
        args = cmd + [str(tmp_path)] + (["0"] if cmd == ["get"] else [])
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (cmd, res.output)
        assert res.stdout == "" and res.stderr.startswith("kvcache: error:") and res.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing created


def test_usage_error_is_exit_2(cache):
    assert CliRunner().invoke(cli, ["verify", cache, "--spot-check", "3"]).exit_code == 2
    assert CliRunner().invoke(cli, ["build", "nocolon", cache]).exit_code == 2
    assert CliRunner().invoke(cli, ["frobnicate"]).exit_code == 2


def test_help_documents_exit_codes():
    out = CliRunner().invoke(cli, ["--help"]).output
    assert "0 ok, 1 problems found, 2 usage error or not a cache" in " ".join(out.split())


# --------------------------------------------------------------------------- progress


def _on_a_terminal(monkeypatch, args: list[str]) -> tuple[int, str]:
    """Run the CLI in this process with stderr on a pseudo-terminal; (exit code, what it showed)."""
    import threading

    master, slave = os.openpty()
    shown: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:
                return
            if not b:
                return
            shown.append(b)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    with open(slave, "w", closefd=True) as tty, monkeypatch.context() as mp:
        mp.setattr(sys, "stderr", tty)
        assert sys.stderr.isatty()
        with pytest.raises(SystemExit) as ex:
            cli.main(args, prog_name="kvcache")
        tty.flush()
    t.join(10)
    os.close(master)
    return ex.value.code or 0, b"".join(shown).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "c")
    monkeypatch.setenv("KVTEST_N", "3000")
    code, shown = _on_a_terminal(monkeypatch, ["build", "_cli_helpers:small", path])
    assert code == 0 and "build" in shown and "items/s" in shown and "3000/3000" in shown, shown
    assert "built" in capsys.readouterr().out
    code, shown = _on_a_terminal(monkeypatch, ["verify", path])
    assert code == 0 and "verify" in shown and "3000/3000" in shown, shown
    code, shown = _on_a_terminal(monkeypatch, ["verify", "--json", path])
    assert code == 0 and shown == ""  # --json: no bar even on a terminal
    r = invoke("build", "_cli_helpers:small", str(tmp_path / "d"))  # not a terminal
    assert r.exit_code == 0 and r.stderr == ""


@pytest.mark.slow  # a real process on a real terminal (script(1)), ~3 s of builds
def test_build_bar_on_a_real_terminal_shows_rate_and_eta(tmp_path):
    import re
    import shutil

    if shutil.which("script") is None:
        pytest.skip("script(1) is not installed")
    path = str(tmp_path / "c")
    cmd = f"{CONSOLE} build _cli_helpers:slow {path}"
    p = subprocess.run(["script", "-qc", cmd, "/dev/null"], capture_output=True, text=True,
                       env=_env(KVTEST_N="1500", KVTEST_DELAY="0.002"), timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    frames = p.stdout.replace("\r", "\n")
    assert re.search(r"build .*\d+/1500 +\d\d:\d\d:\d\d +[\d,]+ items/s", frames), frames[-2000:]
    assert "built" in frames


# --------------------------------------------------------------------------- corruption


def test_verify_finds_and_repairs_corrupted_value_bytes(cache):
    _flip_tag(cache, 17)
    r = invoke("verify", cache)
    assert r.exit_code == 1
    assert "bad records (1): 17" in r.output
    j = json.loads(invoke("verify", "--json", cache).output)
    assert j["bad"] == [17] and j["ok"] is False and "checksum" in j["reasons"]["17"]
    r = invoke("verify", "--repair", cache)
    assert r.exit_code == 0, r.output
    assert "deleted 2 rows (records and their metadata)" in r.output
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


def test_verify_structural_damage_is_reported_and_salvaged(cache):
    _break_page(cache, 40)
    r = invoke("verify", "--json", cache)
    assert r.exit_code == 1, r.output
    j = json.loads(r.stdout)
    assert j["ok"] is False and (j["signal"] or j["errors"])
    r = invoke("verify", "--repair", cache)
    assert r.exit_code == 0, r.output
    assert "salvaged" in r.stdout
    rep = verify(cache)
    assert rep.ok and 0 < rep.checked < 200
    with open_cache(cache) as v:
        for i in v.keys():
            assert H.same(v.get(i), H.expected(i))


def test_verify_truncated_file(tmp_path, monkeypatch):
    path = _truncated(tmp_path, monkeypatch)
    r = invoke("verify", path)
    assert r.exit_code == 1, r.output
    rep = verify(path)
    assert not rep.ok and (rep.signal or rep.errors)
    rep = verify(path, repair=True)
    assert rep.repaired and rep.ok, rep
    assert verify(path).ok


@pytest.mark.slow  # real CLI processes (each imports torch)
def test_damaged_files_through_real_processes(cache, tmp_path, monkeypatch):
    """A scan child killed by the damage: the CLI process itself survives, no traceback."""
    path = _truncated(tmp_path, monkeypatch)
    _break_page(cache, 40)
    for p in (path, cache):
        r = run_cli("verify", "--json", p)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        j = json.loads(r.stdout)
        assert j["ok"] is False and (j["signal"] or j["errors"])
        r = run_cli("verify", "--repair", p, console=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert verify(p).ok


# --------------------------------------------------------------------------- compact, gc


# A kvcache opener in another process, without kvcache/__init__ (torch): Store takes the
# shared lock every opener takes.
HOLD = """
import sys, types
m = types.ModuleType("kvcache")
m.__path__ = [sys.argv[1]]
sys.modules["kvcache"] = m
from kvcache.store import Store
s = Store(sys.argv[2], readonly=True, create=False)
s.handle()
print("ready", flush=True)
sys.stdin.read()
s.close()
"""


def test_compact_and_repair_refused_while_in_use(cache):
    _flip_tag(cache, 5)
    pkg = os.path.dirname(os.path.abspath(kvcache.__file__))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, pkg, cache], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = invoke("compact", cache)
        assert r.exit_code == 1 and "in use by 1 process" in r.stderr, r.output
        r = invoke("verify", "--repair", cache)
        assert r.exit_code == 1 and "in use by 1 process" in r.stderr, r.output
        assert "bad records" not in r.stdout  # one clean error line, nothing half-done
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    assert holder.returncode == 0
    assert invoke("verify", "--repair", cache).exit_code == 0
    assert invoke("compact", cache).exit_code == 0


@pytest.mark.slow  # a second process holding the cache
def test_compact_refused_while_in_use_by_another_process(cache):
    holder = subprocess.Popen([sys.executable, "-m", "_cli_helpers", cache, "200"], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = run_cli("compact", cache)
        assert r.returncode == 1
        assert "in use by 1 process" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    assert holder.returncode == 0
    assert run_cli("compact", cache).returncode == 0


def test_gc_then_compact_gives_pages_back(cache):
    with pytest.warns(kvcache.KvCacheWarning, match="200 cached samples of the previous source"):
        build("_cli_helpers:tuples", cache)  # another source takes over
    r = invoke("gc", "--json", cache)
    assert r.exit_code == 0, r.output
    g = json.loads(r.output)
    assert g["removed"] == 150 and g["kept"] == 50  # keys 0..49 were rewritten by the new source
    assert g["compact_would_reclaim"] > 0
    before = inspect_cache(cache).file_bytes
    r = invoke("compact", "--json", cache)
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)
    assert c["bytes_before"] == before and c["bytes_after"] < c["bytes_before"]
    assert c["reclaimed"] == c["bytes_before"] - c["bytes_after"]
    assert inspect_cache(cache).file_bytes == c["bytes_after"]
    text = invoke("compact", cache).stdout
    assert "before:" in text and "after:" in text and "reclaimed:" in text
    assert verify(cache).ok
    with open_cache(cache) as v:
        assert sorted(v.keys()) == list(range(50))
        arr, s = v.get(7)
        assert s == "item 7" and arr[0] == 7.0
    assert [n for n in os.listdir(os.path.dirname(cache)) if n.startswith(".")] == []


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


def test_build_from_file_spec_resumes_a_partial_cache(tmp_path):
    spec_file = tmp_path / "mysrc.py"
    spec_file.write_text("import _cli_helpers\n\ndef make():\n    return _cli_helpers.Squares(30)\n")
    path = str(tmp_path / "c")
    with LmdbCachedDataset(H.Squares(30), path) as ds:
        for i in range(0, 30, 3):
            ds[i]
    r = invoke("build", f"{spec_file}:make", path, "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "computed 20, already cached 10, of 30" in r.stdout and "items/s" in r.stdout
    _check_all(path, 30)


@pytest.mark.slow  # a real process interrupted by SIGINT
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


def test_merge_two_halves_equals_full_build(tmp_path, cache):
    a, b, dest = (str(tmp_path / n) for n in ("a", "b", "dest"))
    _fill(a, range(100))
    _fill(b, range(100, 200))
    r = invoke("merge", dest, a, b)
    assert r.exit_code == 0, r.output
    assert "copied 200" in r.stdout
    with open_cache(dest) as d, open_cache(cache) as full:
        assert list(d.keys()) == list(full.keys()) == list(range(200))
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
    assert "class: '_cli_helpers.Squares' -> '_cli_helpers.Pairs'" in r.stderr
    assert "length: 200 -> 50" in r.stderr
    assert not os.path.exists(tmp_path / "dest")


def test_merge_skips_corrupt_records(tmp_path, cache):
    _flip_tag(cache, 9)
    r = invoke("merge", str(tmp_path / "dest"), cache)
    assert r.exit_code == 1 and "skipped 1 bad records" in r.stdout
    rep = merge(str(tmp_path / "dest2"), [cache])
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
    j = json.loads(invoke("get", "--json", cache, "7").stdout)
    assert j["leaves"][1]["value"] == 7
    assert CliRunner().invoke(cli, ["get", cache, "999"]).exit_code == 1


def test_spot_check_catches_and_repairs_a_changed_source(cache):
    r = invoke("verify", cache, "--spot-check", "5", "--source", "_cli_helpers:small")
    assert r.exit_code == 0 and "5 recomputed, 0 differ" in r.output
    r = invoke("verify", cache, "--spot-check", "5", "--source", "_cli_helpers:shifted")
    assert r.exit_code == 1 and "5 recomputed, 5 differ" in r.output
    with open_cache(cache) as v:  # reported only: nothing replaced without --repair
        assert H.same(v.get(3), H.expected(3))
    r = invoke("verify", cache, "--spot-check", "500", "--source", "_cli_helpers:shifted", "--repair")
    assert r.exit_code == 0 and "200 recomputed, 200 differ" in r.output and "replaced 200" in r.output
    with open_cache(cache) as v:
        assert H.same(v.get(3), H.shifted()[3])
    r = invoke("verify", cache, "--spot-check", "5", "--source", "_cli_helpers:tuples")
    assert r.exit_code == 1 and "class: '_cli_helpers.Squares' -> '_cli_helpers.Pairs'" in r.stderr


@pytest.mark.slow
def test_scale_50k(tmp_path, monkeypatch):
    """Every command on a 50,000-sample cache."""
    path = str(tmp_path / "big")
    monkeypatch.setenv("KVTEST_N", "50000")
    rep = build("_cli_helpers:small", path, workers=2)
    assert rep.computed == 50000
    ins = inspect_cache(path)
    assert ins.current_entries == 50000 and "image: uint8[3,8,8] x 50000" in [str(x) for x in ins.leaves]
    v = verify(path)
    assert v.ok and v.checked == 50000
    assert get_sample(path, 49999).leaves[1].value == 49999
    c = compact(path)
    assert c.bytes_after <= c.bytes_before and verify(path).ok


def test_maintenance_beside_a_dataset_open_in_this_process(tmp_path):
    """gc, inspect and get on a cache this process holds open: they raised NotACacheError
    (their identity check opened LMDB a second time, which py-lmdb refuses). Found by
    tests/test_state_machine.py."""
    path = str(tmp_path / "c")
    with LmdbCachedDataset(H.Squares(20), path, version=0) as ds:
        ds.__getitems__([0, 1, 2])
    with LmdbCachedDataset(H.Squares(20, offset=1), path, version=1) as ds:
        ds[0]
        ds.flush()
        assert inspect_cache(path).current_entries == 1
        assert get_sample(path, 0).index == 0
        report = gc(path)
        assert (report.removed, report.kept) == (2, 1)
        assert ds[0]["label"] == 0 and int(ds[0]["image"][0, 0, 0]) == 1
