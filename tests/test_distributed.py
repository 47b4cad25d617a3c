"""Distributed builds with real process groups: ranks spawned by torch.multiprocessing,
``init_process_group("gloo", init_method="file://...")``, every rank on the same path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as tmp
from _dist_helpers import DiesOnRank, build_rank
from helpers import ImageSource, records, same

from kvcache import BuildError, LmdbCachedDataset, open_cache
from kvcache.maintenance import verify

TESTS = os.path.dirname(os.path.abspath(__file__))
N = 241  # odd: the ranks get shares of different sizes


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[int, bytes]:
    path = str(tmp_path_factory.mktemp("serial") / "c")
    with LmdbCachedDataset(DiesOnRank(N), path) as ds:
        ds.build()
    return records(path)


def run_ranks(tmp_path, world: int, source, tag: str = "", num_workers: int = 0,
              round_seconds: float | None = None) -> tuple[str, list[dict]]:
    path, out = str(tmp_path / "cache"), str(tmp_path / f"out{tag}")
    os.makedirs(out, exist_ok=True)
    init = f"file://{tmp_path}/pg{tag}-{time.time_ns()}"
    tmp.spawn(build_rank, args=(world, init, path, source, out, num_workers, round_seconds),
              nprocs=world, join=True)
    reps = []
    for r in range(world):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            reps.append(json.load(f))
    return path, reps


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_build_equals_a_single_process_build(tmp_path, serial, world):
    # a round after every chunk: the last round then often falls inside a rank's last
    # add(), which once left that rank waiting for a round nobody else would start
    path, reps = run_ranks(tmp_path, world, DiesOnRank(N), round_seconds=0.0)
    assert records(path) == serial  # same indices, same bytes (so the same checksums)
    assert all(r["in_step"] for r in reps)
    assert all(r["computed"] == N and r["total"] == N and r["ranks"] == world for r in reps)
    assert [r["rank"] for r in reps] == list(range(world))
    assert reps[0]["progress"] == [N, N] and reps[0]["updates"] > 1  # rank 0 shows the whole job
    assert all(r["updates"] == 0 for r in reps[1:])


@pytest.mark.slow  # spawns ranks twice and waits for a commit
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_leaves_a_consistent_cache_and_a_rerun_completes(tmp_path, serial, victim):
    n, at = N, 200 + victim  # late in the victim's share (rank r computes todo[r::2])
    with pytest.raises(Exception):  # noqa: B017 - mp.spawn reports the killed rank
        run_ranks(tmp_path, 2, DiesOnRank(n, victim=victim, at=at, delay=0.02))
    path = str(tmp_path / "cache")
    assert verify(path).ok
    kept = len(records(path))
    assert 0 < kept < N  # rank 0 committed a batch a second (the kill comes after ~2 s)
    _, reps = run_ranks(tmp_path, 2, DiesOnRank(n), tag="rerun")
    assert reps[0]["computed"] == N - kept and reps[0]["already"] == kept
    assert records(path) == serial


@pytest.mark.slow  # 2 ranks with 2 forked workers each
def test_ranks_with_workers_equal_a_single_process_build(tmp_path, serial):
    path, reps = run_ranks(tmp_path, 2, DiesOnRank(N), num_workers=2)
    assert all(r["in_step"] and r["computed"] == N for r in reps)
    assert records(path) == serial


def test_without_a_process_group_it_says_how(tmp_path):
    with LmdbCachedDataset(ImageSource(10), str(tmp_path / "c")) as ds:
        with pytest.raises(BuildError, match="init_process_group"):
            ds.build(distributed=True)


@pytest.mark.slow  # torchrun starts 2 ranks of the real CLI
def test_torchrun_cli_build_distributed(tmp_path, serial):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this python")
    spec = tmp_path / "spec.py"
    spec.write_text(f"from _dist_helpers import DiesOnRank\n\ndef make():\n    return DiesOnRank({N})\n")
    path = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "kvcache", "build",
                        f"{spec}:make", path, "--distributed"], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("built ") == 1  # rank 0 reports, the others stay quiet
    assert f"computed {N:,}" in r.stdout and "on each of 2 ranks" in r.stdout
    assert records(path) == serial
    with open_cache(path) as v:
        assert same(v.get(5), DiesOnRank(N)[5])
