"""The first run, as a new user runs it: every computed sample is kept.

Each test runs a real script in a subprocess that simply ends (no ``del loader``, no
``close()``), then counts what is stored in a fresh process. The source appends every
index it computes to a log file (O_APPEND writes of one line are atomic across the
workers), so "stored" is compared with "computed", not with a guess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kvcache

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from torch.utils.data import ConcatDataset, DataLoader, Dataset
    from kvcache import LmdbCachedDataset

    class Images(Dataset):
        def __init__(self, n, log):
            self.n, self.log = n, log
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            with open(self.log, "a") as f:
                f.write(f"{i}\\n")
            return torch.full((3, 8, 8), float(i)), i

    def mark(log, text):
        with open(log, "a") as f:
            f.write(text + "\\n")

    if __name__ == "__main__":
        path, method, epochs, n, batch, mode = sys.argv[1:7]
        epochs, n, batch = int(epochs), int(n), int(batch)
        log = path + ".calls"
        ds = LmdbCachedDataset(Images(n, log), path)
        if mode == "concat":  # a wrapper that reads item by item (no __getitems__)
            ds = ConcatDataset([ds])
        if mode == "main":  # no workers; SIGTERM from outside while it computes
            for i in range(n):
                ds[i]
                if i == n // 2:
                    mark(log, "ready")
            import time
            time.sleep(60)
        loader = DataLoader(ds, batch_size=batch, num_workers=2, shuffle=True,
                            persistent_workers=True, multiprocessing_context=method)
        for epoch in range(epochs):
            mark(log, f"epoch {epoch}")
            for k, (x, y) in enumerate(loader):
                assert bool((x[:, 0, 0, 0] == y.float()).all())
                if mode == "break" and k == 3:
                    break
        # the script simply ends: persistent workers are terminated by multiprocessing
""")


def _run(tmp_path, method: str, epochs: int, n: int, batch: int = 256, mode: str = "plain"):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    path = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, str(script), path, method, str(epochs), str(n), str(batch), mode],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return path, _calls(path)


def _calls(path: str) -> list[list[int]]:
    """Indices computed, per epoch (the part before the first epoch mark is epoch -1)."""
    out: list[list[int]] = [[]]
    with open(path + ".calls") as f:
        for line in f:
            line = line.strip()
            if line.startswith("epoch"):
                out.append([])
            elif line and line != "ready":
                out[-1].append(int(line))
    return out


def _stored(path: str) -> set[int]:
    # a fresh process: nothing of the script's buffers can be seen from here
    code = f"import kvcache; print(sorted(kvcache.open_cache({path!r}).keys()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(eval(r.stdout))


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=SLOW),
                                    pytest.param("forkserver", marks=SLOW)])
def test_readme_loop_keeps_every_sample_and_later_epochs_read_it(tmp_path, method):
    # the README's loop: batch 256, 2 persistent workers, shuffle, 3 epochs, script ends
    path, calls = _run(tmp_path, method, epochs=3, n=2000)
    assert calls[0] == []
    assert sorted(calls[1]) == list(range(2000))  # epoch 1 computes each index once
    # epochs 2-3: every index epoch 1 computed is read from the cache, by any worker
    # (the goal allows 1%; committing before a worker's last batch leaves it none)
    assert len(calls[2]) + len(calls[3]) == 0, (len(calls[2]), len(calls[3]))
    assert _stored(path) == set(range(2000))


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=SLOW)])
def test_one_short_epoch_per_job_fills_the_cache(tmp_path, method):
    path, calls = _run(tmp_path, method, epochs=1, n=600, batch=64)
    assert sorted(calls[1]) == list(range(600))
    assert _stored(path) == set(range(600))
    _path2, calls2 = _run(tmp_path, method, epochs=1, n=600, batch=64)  # the next job
    assert calls2[-1] == []


@pytest.mark.parametrize("method", ["fork", pytest.param("forkserver", marks=SLOW)])
def test_break_mid_epoch_keeps_what_workers_computed(tmp_path, method):
    # the workers hold buffered rows and more work in their queues when the script
    # ends: multiprocessing's SIGTERM reaches them, the handler commits the rows
    path, calls = _run(tmp_path, method, epochs=1, n=20000, batch=64, mode="break")
    computed = set(calls[1])
    assert len(computed) >= 4 * 64
    assert _stored(path) == computed


@SLOW
def test_item_by_item_wrapper_keeps_every_sample(tmp_path):
    # ConcatDataset calls ds[i] per item, so a worker cannot see a batch's end: it commits
    # when out of work at most every writeback.IDLE_GETITEM seconds, and before it waits
    # for its next batch. Without the second, a worker's last rows of epoch 1 stayed
    # buffered through a whole epoch of hits: ~510 recomputed in epoch 2, 110-240 in 3.
    # What is left is a race at the epoch's start (the other worker reading a row within
    # the milliseconds its commit takes): measured 0 of 1,000 in 6 runs on an idle machine.
    path, calls = _run(tmp_path, "fork", epochs=3, n=1000, batch=100, mode="concat")
    assert sorted(calls[1]) == list(range(1000))
    assert len(calls[3]) == 0  # by epoch 3 everything is in the cache
    assert len(calls[2]) < 100, len(calls[2])
    assert _stored(path) == set(range(1000))


def test_sigterm_to_the_main_process_keeps_what_it_computed(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    path = str(tmp_path / "cache")
    p = subprocess.Popen([sys.executable, str(script), path, "fork", "1", "400", "64", "main"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.exists(path + ".calls"):
            with open(path + ".calls") as f:
                if "ready" in f.read():
                    break
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)  # as a scheduler would
    _out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM, err  # it still ends by SIGTERM
    assert "Traceback" not in err
    calls = _calls(path)
    assert set(calls[0]) == set(range(400))
    assert _stored(path) == set(range(400))


def test_a_program_sigterm_handler_is_left_alone(tmp_path):
    code = textwrap.dedent(f"""
        import signal, torch, sys
        sys.path.insert(0, {HERE!r})
        from helpers import ImageSource
        from kvcache import LmdbCachedDataset
        mine = lambda s, f: None
        signal.signal(signal.SIGTERM, mine)
        ds = LmdbCachedDataset(ImageSource(10), {str(tmp_path / 'c')!r})
        ds[0]
        assert signal.getsignal(signal.SIGTERM) is mine
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr
    assert len(kvcache.open_cache(str(tmp_path / "c"))) == 1
