"""Parallel builds: ``LmdbCachedDataset.build(num_workers=N)`` and ``kvcache build --workers N``
share one implementation (kvcache.builder): equal to a serial build record for record
under fork and spawn, resumable, Ctrl-C safe, and a dead worker loses no committed batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import BigSource, ImageSource, records, same

import kvcache
from kvcache import BuildError, LmdbCachedDataset, open_cache
from kvcache.maintenance import verify

TESTS = os.path.dirname(os.path.abspath(__file__))
N = 300


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[int, bytes]:
    path = str(tmp_path_factory.mktemp("serial") / "c")
    with LmdbCachedDataset(ImageSource(N), path) as ds:
        rep = ds.build()
    assert rep.computed == N and rep.already_cached == 0 and rep.workers == 1
    return records(path)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_workers_equal_a_serial_build(tmp_path, serial, method):
    path = str(tmp_path / "c")
    seen = []
    with LmdbCachedDataset(ImageSource(N), path) as ds:
        rep = ds.build(num_workers=2, start_method=method, progress=lambda d, t: seen.append((d, t)))
        assert rep.computed == N and rep.workers == 2 and not rep.interrupted
        assert seen[-1] == (N, N) and all(t == N for _d, t in seen)
        got = records(path)
        assert got.keys() == serial.keys() == set(range(N))
        assert all(got[i] == serial[i] for i in range(N))  # same bytes: same checksums
        assert same(ds[7], ImageSource(N)[7])


def test_build_resumes_a_partial_cache(tmp_path, serial):
    path = str(tmp_path / "c")
    with LmdbCachedDataset(ImageSource(N), path) as ds:
        for i in range(0, N, 3):
            ds[i]
        ds.flush()
        rep = ds.build(num_workers=2)
        assert rep.computed == N - len(range(0, N, 3)) and rep.already_cached == len(range(0, N, 3))
        assert ds.build(num_workers=2).computed == 0
    assert records(path) == serial


def test_too_large_samples_are_left_out_and_warned(tmp_path):
    with LmdbCachedDataset(BigSource(20, 4096), str(tmp_path / "c"), max_sample_bytes=2000) as ds:
        with pytest.warns(kvcache.KvCacheWarning, match="max_sample_bytes=2000"):
            rep = ds.build(num_workers=2)
        assert rep.too_large == 20 and rep.computed == 0 and len(ds.cached_indices()) == 0


class DiesAt(torch.utils.data.Dataset):
    """ImageSource whose index ``at`` kills the worker computing it (not the parent)."""

    def __init__(self, n: int, at: int, parent: int) -> None:
        self.inner, self.at, self.parent = ImageSource(n), at, parent

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        if i == self.at and os.getpid() != self.parent:
            os._exit(3)
        return self.inner[i]


class RaisesAt(DiesAt):
    def __getitem__(self, i: int):
        if i == self.at:
            raise RuntimeError(f"source broke at {i}")
        return self.inner[i]


def test_a_dead_worker_raises_and_a_rerun_completes(tmp_path, serial):
    path = str(tmp_path / "c")
    src = DiesAt(N, at=250, parent=os.getpid())
    with LmdbCachedDataset(src, path) as ds:
        with pytest.raises(BuildError, match="worker died"):
            ds.build(num_workers=2)
    assert verify(path).ok
    with LmdbCachedDataset(src, path) as ds:  # in this process index 250 computes fine
        rep = ds.build()
        assert rep.computed + rep.already_cached == N and rep.computed < N
    assert records(path) == serial


def test_a_source_error_propagates_and_keeps_what_arrived(tmp_path):
    path = str(tmp_path / "c")
    with LmdbCachedDataset(RaisesAt(N, at=N - 1, parent=0), path) as ds:
        with pytest.raises(RuntimeError, match="source broke at 299"):
            ds.build(num_workers=2)
        assert 0 < len(ds.cached_indices()) < N


@pytest.mark.slow  # a real CLI process (test_cli covers --workers in-process)
def test_cli_build_workers_matches_library(tmp_path, serial):
    path = str(tmp_path / "c")
    spec = tmp_path / "spec.py"
    spec.write_text("from helpers import ImageSource\n\ndef make():\n    return ImageSource(300)\n")
    r = subprocess.run([sys.executable, "-m", "kvcache", "build", f"{spec}:make", path, "--workers", "2"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert "computed 300, already cached 0, of 300" in r.stdout and "2 worker(s)" in r.stdout
    assert records(path) == serial


def _env(**kw: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw)
    return env


INTERRUPTED = r"""
import sys
from _cli_helpers import Squares
from kvcache import LmdbCachedDataset
ds = LmdbCachedDataset(Squares(2000, delay=0.02), sys.argv[1])
try:
    ds.build(num_workers=2, start_method=sys.argv[2])
except KeyboardInterrupt:
    print("interrupted", len(ds.cached_indices()), flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_ctrl_c_keeps_every_committed_batch_and_a_rerun_completes(tmp_path, method):
    from _cli_helpers import Squares

    path = str(tmp_path / "c")
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, path, method], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job
    seen, deadline = 0, time.monotonic() + 120
    while seen == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with open_cache(path) as v:
                seen = len(v)
        except kvcache.KvCacheError:
            pass  # not created yet
    assert seen > 0, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the writer and its workers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out.startswith("interrupted"), out + err
    kept = int(out.split()[1])
    assert seen <= kept < 2000 and "Traceback" not in err
    assert verify(path).ok
    with LmdbCachedDataset(Squares(2000), path) as ds:
        rep = ds.build(num_workers=2)
        assert rep.already_cached == kept and rep.computed == 2000 - kept
    with open_cache(path) as v:
        assert list(v.keys()) == list(range(2000))
        for i in range(0, 2000, 37):
            assert same(v.get(i), Squares(2000)[i])


def _open_at(path: str, start: float, q) -> None:
    while time.time() < start:
        pass
    try:
        with LmdbCachedDataset(ImageSource(50), path) as ds:
            q.put(("ok", same(ds[3], ImageSource(50)[3])))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        q.put((f"{type(exc).__name__}: {exc}", False))


def test_processes_creating_one_new_path_at_once_all_open_it(tmp_path):
    """The ranks of a job on one machine construct their dataset on one new path at once:
    none may see another's half-created environment (that was 'not a kvcache cache')."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(8):
        path = str(tmp_path / f"c{trial}")
        q = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_open_at, args=(path, start, q)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert results == [("ok", True)] * 4, results
    assert verify(path).ok
