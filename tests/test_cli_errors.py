"""The CLI never shows a traceback: every error is one line on stderr and an exit code.

Each error path docs/cli.md shows (and the ones the first run hit) runs through the real
CLI: in-process with click's CliRunner, and through the installed ``kvcache`` console
script, as a non-root user (setpriv) where permissions matter.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest
from click.testing import CliRunner

import _cli_helpers as H
from kvcache import LmdbCachedDataset, open_cache
from kvcache.cli import cli

KVCACHE = os.path.join(os.path.dirname(sys.executable), "kvcache")
HERE = os.path.dirname(os.path.abspath(__file__))

FLAKY = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {here!r})
    import _cli_helpers

    class Flaky(_cli_helpers.Squares):
        def __getitem__(self, i):
            if i in BAD and not os.environ.get("KVTEST_FIXED"):
                raise OSError(f"cannot decode image {{i}}.jpg: truncated file")
            return super().__getitem__(i)

    BAD = (7, 33, 34)

    def make():
        return Flaky(60)
""")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def one_line_error(stderr: str) -> str:
    """The one error line (warnings before it are one line each, never a traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("kvcache: warning: ") for ln in lines[:-1]), stderr
    lines = lines[-1:]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("kvcache: error: "), lines[0]
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run_console(*args: str, user: bool = False, cwd: str | None = None, env=None):
    cmd = [KVCACHE, *args]
    if user:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def built(path: str, n: int = 40) -> str:
    with LmdbCachedDataset(H.Squares(n), path) as ds:
        ds.build()
    return path


@pytest.fixture
def flaky(tmp_path):
    spec = tmp_path / "flakyds.py"
    spec.write_text(FLAKY.format(here=HERE))
    return f"{spec}:make"


# --------------------------------------------------------------------------- build


def test_build_when_the_source_raises_names_the_index_in_one_line(tmp_path, flaky):
    path = str(tmp_path / "c")
    r = invoke("build", flaky, path)
    assert r.exit_code == 1
    line = one_line_error(r.stderr)
    assert "index 7" in line and "OSError: cannot decode image 7.jpg" in line and "--skip-errors" in line
    stored = set(open_cache(path).keys())  # every sample computed before the error is kept
    assert set(range(7)) <= stored and not stored & {7, 33, 34}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_skip_errors_stores_the_rest_lists_the_failures_and_a_rerun_retries(tmp_path, flaky, workers):
    path = str(tmp_path / "c")
    r = invoke("build", flaky, path, "--skip-errors", "--workers", workers)
    assert r.exit_code == 1, r.output
    assert "computed 57" in r.stdout and "7, 33, 34" in r.stdout and "cannot decode image 7.jpg" in r.stdout
    assert sorted(open_cache(path).keys()) == [i for i in range(60) if i not in (7, 33, 34)]
    j = json.loads(invoke("build", flaky, path, "--skip-errors", "--json").stdout)
    assert j["failed"] == [7, 33, 34] and j["computed"] == 0 and j["already_cached"] == 57
    assert j["first_error"].startswith("OSError: cannot decode image 7.jpg")
    os.environ["KVTEST_FIXED"] = "1"
    try:  # the files were fixed: a later build computes exactly the three
        r = invoke("build", flaky, path, "--skip-errors")
    finally:
        del os.environ["KVTEST_FIXED"]
    assert r.exit_code == 0 and "computed 3," in r.stdout
    assert len(open_cache(path)) == 60


def test_build_errors_skip_in_the_library(tmp_path):
    import importlib.util

    spec_file = tmp_path / "flakylib.py"
    spec_file.write_text(FLAKY.format(here=HERE))
    s = importlib.util.spec_from_file_location("flakylib", spec_file)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    from kvcache import SourceError

    with LmdbCachedDataset(mod.make(), str(tmp_path / "c")) as ds:
        with pytest.raises(SourceError, match="index 7: the source raised OSError"):
            ds.build()
        rep = ds.build(errors="skip")
        assert rep.failed == [7, 33, 34] and rep.computed + rep.already_cached == 57
        with pytest.raises(ValueError, match="errors must be one of"):
            ds.build(errors="ignore")


def test_build_console_script_source_error_one_line(tmp_path, flaky):
    r = run_console("build", flaky, str(tmp_path / "c"), "--workers", "2")
    assert r.returncode == 1
    assert "index " in one_line_error(r.stderr)


def test_a_spec_that_raises_on_import_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('no data folder configured')\n")
    r = invoke("build", f"{bad}:make", str(tmp_path / "c"))
    assert r.exit_code == 1
    assert "RuntimeError: no data folder configured" in one_line_error(r.stderr)
    r = invoke("build", "nosuchmodule_i15:make", str(tmp_path / "c"))
    assert r.exit_code == 2 and "current directory" in one_line_error(r.stderr)


# --------------------------------------------------------------------------- publish


def test_publish_refuses_a_partial_cache_unless_partial(tmp_path):
    src = str(tmp_path / "src")
    with LmdbCachedDataset(H.Squares(100), src) as ds:
        for i in range(0, 100, 3):
            ds[i]
    r = invoke("publish", src, str(tmp_path / "pub"))
    assert r.exit_code == 2
    line = one_line_error(r.stderr)
    assert "holds 34 of the 100 samples" in line and "missing 66" in line and "indices 1, 2, 4" in line
    assert "--partial" in line and not os.path.exists(tmp_path / "pub")
    r = invoke("publish", src, str(tmp_path / "pub"), "--partial")
    assert r.exit_code == 0 and "66 samples of the source missing" in r.stdout
    assert sorted(os.listdir(tmp_path / "pub")) == ["data.mdb", "kvcache.lock", "kvcache.published"]  # docs/network.md
    assert len(open_cache(str(tmp_path / "pub"))) == 34


def test_publish_of_an_empty_cache_is_refused(tmp_path):
    src = str(tmp_path / "src")
    LmdbCachedDataset(H.Squares(10), src).close()
    r = invoke("publish", src, str(tmp_path / "pub"))
    assert r.exit_code == 2 and "holds 0 of the 10 samples" in one_line_error(r.stderr)


def _shared_tmp():
    """A folder a non-root user can reach (pytest's tmp_path is root's, mode 0700)."""
    d = tempfile.mkdtemp(prefix="kvcache-i15-")
    os.chmod(d, 0o755)
    return d


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run as another user")


@pytest.mark.root
@needs_root
def test_publish_into_a_read_only_directory_as_a_user(tmp_path):
    work = _shared_tmp()
    try:
        src = built(os.path.join(work, "src"))
        for root, dirs, files in os.walk(src):
            for n in files:
                os.chmod(os.path.join(root, n), 0o644)
        ro = os.path.join(work, "ro")
        os.mkdir(ro, 0o555)
        r = run_console("publish", src, os.path.join(ro, "pub"), user=True)
        assert r.returncode == 1, r.stderr
        line = one_line_error(r.stderr)
        assert "ermission denied" in line or "read-only" in line, line
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.root
@needs_root
def test_compact_and_build_on_a_read_only_cache_as_a_user(tmp_path):
    work = _shared_tmp()
    try:
        src = built(os.path.join(work, "c"))
        os.chmod(src, 0o755)
        for n in os.listdir(src):
            os.chmod(os.path.join(src, n), 0o644)
        before = {n: _read(os.path.join(src, n)) for n in os.listdir(src)}
        for args in (["compact", src], ["gc", src], ["verify", "--repair", src],
                     ["build", "_cli_helpers:small", src]):
            r = run_console(*args, user=True, cwd=HERE)
            assert r.returncode in (1, 2), (args, r.stderr)
            one_line_error(r.stderr)
        for args in (["inspect", src],):  # reading needs no write access
            r = run_console(*args, user=True)
            assert r.returncode == 0, (args, r.stderr)
        assert {n: _read(os.path.join(src, n)) for n in os.listdir(src)} == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- every other path


def test_every_documented_error_path_is_one_line(tmp_path):
    cache = built(str(tmp_path / "cache"))
    other = str(tmp_path / "other")
    with LmdbCachedDataset(H.Pairs(), other) as ds:
        ds.build()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    invoke("publish", cache, str(tmp_path / "pub"))
    cases = [
        (["inspect", str(tmp_path / "afile")], 2),
        (["inspect", str(tmp_path / "stuff")], 2),
        (["verify", str(tmp_path / "missing")], 2),
        (["get", cache, "999"], 1),
        (["merge", cache, other], 1),
        (["publish", cache, str(tmp_path / "pub")], 2),  # exists, no --force
        (["publish", cache, cache], 2),
        (["compact", str(tmp_path / "pub")], 1),  # published: immutable
        (["gc", str(tmp_path / "pub")], 1),
        (["build", "nocolon", cache], 2),
        (["verify", cache, "--spot-check", "3", "--source", "_cli_helpers:tuples"], 1),  # stale
    ]
    for args, code in cases:
        r = invoke(*args)
        assert r.exit_code == code, (args, r.exit_code, r.output)
        one_line_error(r.stderr)
