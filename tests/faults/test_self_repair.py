"""Self-repair with a source (kvcache.selfrepair): a damaged cache never stops training.

A zeroed overflow page costs its record; a zeroed leaf or branch page is salvaged (in a
child, under the writer lock, by one process); where the cache cannot be written the
samples come from the source. Without a source: CacheCorruptError naming the fix. Every
read of a damaged file happens in a child process (a signal fails the test by name).
"""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
from _fault_helpers import HERE, PSIZE, PY, check_child, patch, run_child, snapshot, walk

N = 200

# Opens the cache (with or without its source) and reads every index: directly, or through a
# DataLoader with 2 workers (fork or spawn) for 2 epochs. Reports wrong samples, warnings,
# what the dataset did about the damage, and its counts.
READ = r"""
import json, sys, warnings
from _fault_helpers import *
import kvcache, torch
path, n, with_source, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
expect = lambda i: sample_for(i, 16384 if i % 8 == 0 else 64)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    try:
        ds = kvcache.LmdbCachedDataset(MixedSource(n) if with_source else None, path, **extra)
    except kvcache.KvCacheError as exc:
        print(json.dumps({"open": type(exc).__name__, "msg": str(exc)})); sys.exit(0)
    wrong, hits = [], []
    if mode == "plain":
        for i in range(n):
            before = ds.stats().hits
            if not same(ds[i], expect(i)):
                wrong.append(i)
            if ds.stats().hits > before:
                hits.append(i)
    else:
        dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=mode,
                                         collate_fn=list, shuffle=True)
        for epoch in range(2):
            seen = 0
            for batch in dl:
                for x in batch:
                    seen += 1
                    if not same(x, expect(x[1])):
                        wrong.append(x[1])
            if seen != n:
                wrong.append(f"epoch {epoch}: {seen} samples")
    rep = ds.self_repair
    ds.close()
print(json.dumps({"wrong": wrong, "hits": len(hits), "stats": ds.stats().as_dict(),
                  "action": rep.action if rep else None, "kept": rep.kept if rep else None,
                  "warnings": [str(w.message) for w in ws if issubclass(w.category, kvcache.KvCacheWarning)],
                  "other_warnings": [str(w.message) for w in ws if not issubclass(w.category, kvcache.KvCacheWarning)]}))
"""


def _build(path: str) -> None:
    import kvcache
    from _fault_helpers import MixedSource

    with kvcache.LmdbCachedDataset(MixedSource(N), path) as ds:
        ds.build()


@pytest.fixture
def mixed(tmp_path):
    """A closed cache of 200 samples: 175 inline, 25 of 64 KiB (overflow runs); depth 2."""
    path = str(tmp_path / "mixed")
    _build(path)
    return path


def _page(path: str, what: str) -> int:
    w = walk(path)
    if what == "overflow":
        runs = sorted(r["overflow"] for r in w["records"]["samples"].values() if r["overflow"])
        return runs[len(runs) // 2]
    pages = w["pages"]["samples"][what]
    assert pages, f"the samples tree has no {what} page"
    return pages[len(pages) // 2]


def _zero(path: str, what: str) -> int:
    pg = _page(path, what)
    patch(path, pg * PSIZE, bytes(PSIZE))
    return pg


def _leaf_records(path: str, leaf: int) -> int:
    return sum(1 for r in walk(path)["records"]["samples"].values() if r["leaf"] == leaf)


def _verify_ok(path: str) -> bool:
    from kvcache.maintenance import verify

    return verify(path).ok


ACTION = {"overflow": "patched", "leaf": "salvaged", "branch": "salvaged"}


@pytest.mark.parametrize("what", ["overflow", "leaf", "branch"])
def test_damaged_page_with_source_costs_only_what_it_damaged(mixed, what):
    lost = _leaf_records(mixed, _page(mixed, "leaf")) if what == "leaf" else 0
    _zero(mixed, what)
    out = check_child(run_child(READ, mixed, N, "1", "plain"))
    assert "open" not in out, out
    assert out["wrong"] == [], out
    assert out["action"] == ACTION[what], out
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "damaged" in out["warnings"][0] and ("repaired" in out["warnings"][0]), out["warnings"]
    # every intact record was kept: a zeroed overflow page costs its one record, a leaf its
    # own records, a branch nothing (its leaves are intact and found)
    assert out["hits"] == N - {"overflow": 1, "leaf": lost, "branch": 0}[what], out
    assert _verify_ok(mixed)


@pytest.mark.parametrize("what", [pytest.param("overflow", marks=pytest.mark.slow), "leaf", pytest.param("branch", marks=pytest.mark.slow)])
def test_damaged_page_without_source_is_refused_naming_the_fix(mixed, what):
    _zero(mixed, what)
    before = snapshot(mixed)
    out = check_child(run_child(READ, mixed, N, "0", "plain"))
    assert out.get("open") == "CacheCorruptError", out
    assert "kvcache verify --repair" in out["msg"], out
    assert snapshot(mixed) == before


@pytest.mark.parametrize("what,mode", [
    pytest.param(w, m, marks=() if (w, m) == ("leaf", "fork") else pytest.mark.slow)
    for w in ("overflow", "leaf", "branch") for m in ("fork", "spawn")])
def test_damaged_page_in_dataloader_workers(mixed, what, mode):
    """Damaged before the job starts: the main process repairs at construction, workers
    read the repaired file; 2 epochs, every sample right."""
    _zero(mixed, what)
    out = check_child(run_child(READ, mixed, N, "1", mode, timeout=300))
    assert out["wrong"] == [] and out["action"] == ACTION[what], out
    assert len(out["warnings"]) == 1, out
    assert _verify_ok(mixed)


# Opens the cache, then damages it while open (what a failing disk does), then reads.
WHILE_OPEN = r"""
import json, sys, warnings
from _fault_helpers import *
import kvcache, torch
path, n, what, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
expect = lambda i: sample_for(i, 16384 if i % 8 == 0 else 64)
w = walk(path)
if what == "leaf":
    pages = w["pages"]["samples"]["leaf"]
    pg = pages[len(pages) // 2]
else:
    pg = w["pages"]["samples"]["branch"][0]
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    ds = kvcache.LmdbCachedDataset(MixedSource(n), path)
    ds[1]
    patch(path, pg * PSIZE, bytes(PSIZE))
    wrong = []
    if mode == "plain":
        for epoch in range(2):
            wrong += [i for i in range(n) if not same(ds[i], expect(i))]
            wrong += [i for i, x in zip(range(n), ds.__getitems__(list(range(n)))) if not same(x, expect(i))]
    else:
        dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=mode,
                                         collate_fn=list)
        for epoch in range(2):
            got = [x for b in dl for x in b]
            wrong += [x[1] for x in got if not same(x, expect(x[1]))]
            if len(got) != n:
                wrong.append(f"{len(got)} samples")
    rep = ds.self_repair
    ds.close()
print(json.dumps({"wrong": wrong, "action": rep.action if rep else None,
                  "warnings": [str(w.message) for w in ws if issubclass(w.category, kvcache.KvCacheWarning)]}))
"""


@pytest.mark.parametrize("what", ["leaf", pytest.param("branch", marks=pytest.mark.slow)])
def test_damage_while_open_is_repaired_in_process(mixed, what):
    out = check_child(run_child(WHILE_OPEN, mixed, N, what, "plain"))
    assert out["wrong"] == [], out
    assert out["action"] == "salvaged", out
    assert _verify_ok(mixed)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_damage_while_open_in_dataloader_workers(mixed, mode):
    """The parent holds the cache open, so a worker cannot repair it: it serves from the
    source; the next opener repairs (the stamp that vouched for the file is gone)."""
    out = check_child(run_child(WHILE_OPEN, mixed, N, "leaf", mode, timeout=300))
    assert out["wrong"] == [], out
    out = check_child(run_child(READ, mixed, N, "1", "plain"))
    assert out["wrong"] == [] and out["action"] in ("salvaged", None), out
    assert _verify_ok(mixed)


OPENER = r"""
import json, os, sys, time, warnings
from _fault_helpers import *
import kvcache
path, n, go = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while time.time() < go:
    time.sleep(0.001)
warnings.simplefilter("ignore")
ds = kvcache.LmdbCachedDataset(MixedSource(n), path)
wrong = [i for i in range(n) if not same(ds[i], sample_for(i, 16384 if i % 8 == 0 else 64))]
rep = ds.self_repair
ds.close()
print(json.dumps({"wrong": wrong, "action": rep.action if rep else None}))
"""


@pytest.mark.parametrize("what", ["leaf", pytest.param("overflow", marks=pytest.mark.slow)])
def test_concurrent_openers_repair_once(mixed, what):
    import time

    _zero(mixed, what)
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    go = time.time() + 4.0  # every process imports torch first, then they open at once
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(OPENER), mixed, str(N), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        assert p.returncode == 0, se[-3000:]
        outs.append(check_child(subprocess.CompletedProcess(p.args, 0, so, se)))
    assert all(o["wrong"] == [] for o in outs), outs
    actions = [o["action"] for o in outs]
    assert sum(a in ("patched", "salvaged") for a in actions) == 1, actions
    assert all(a in ("patched", "salvaged", "repaired_by_another", None) for a in actions), actions
    assert _verify_ok(mixed)


def test_readonly_damaged_cache_serves_from_the_source(mixed):
    _zero(mixed, "leaf")
    before = snapshot(mixed)
    out = check_child(run_child(READ, mixed, N, "1", "plain", '{"readonly": true}'))
    assert out["wrong"] == [] and out["action"] == "unstored", out
    assert len(out["warnings"]) == 1 and "not cached" in out["warnings"][0], out
    assert snapshot(mixed) == before


@pytest.mark.slow
def test_unwritable_damaged_cache_serves_from_the_source(mixed):
    """A data.mdb without write permission (a published copy, a read-only file): even
    root does not repair it."""
    _zero(mixed, "branch")
    os.chmod(os.path.join(mixed, "data.mdb"), 0o444)
    before = snapshot(mixed)
    out = check_child(run_child(READ, mixed, N, "1", "fork"))
    assert out["wrong"] == [] and out["action"] == "unstored", out
    assert len(out["warnings"]) == 1, out
    assert snapshot(mixed) == before


@pytest.mark.parametrize("what", ["leaf", pytest.param("overflow", marks=pytest.mark.slow)])
def test_published_damaged_cache_serves_from_the_source(mixed, tmp_path, what):
    import kvcache

    dest = str(tmp_path / "pub")
    kvcache.publish(mixed, dest)
    data = os.path.join(dest, "data.mdb")
    os.chmod(data, 0o644)
    _zero(dest, what)
    os.chmod(data, 0o444)
    before = snapshot(dest)
    out = check_child(run_child(READ, dest, N, "1", "plain"))
    assert out["wrong"] == [], out
    # A published copy is opened in O(1), without the walk (its publish record matches):
    # a zeroed overflow page is then a damaged record (its own warning) whose recomputed
    # sample is not stored (the published cache's note); a zeroed leaf is an LMDB error
    # that turns the dataset to the source (one warning).
    assert 1 <= len(out["warnings"]) <= (2 if what == "overflow" else 1), out
    assert snapshot(dest) == before
    assert not os.path.exists(os.path.join(dest, "lock.mdb"))
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o444


def test_truncated_file_repair_keeps_what_is_intact_before_the_cut(mixed):
    """verify --repair (and self-repair) keep every record whose pages lie before the
    cut, though LMDB's newest root is past it."""
    from kvcache.maintenance import verify

    w = walk(mixed)
    size = os.path.getsize(os.path.join(mixed, "data.mdb"))
    cut = (size // PSIZE // 2) * PSIZE
    intact = 0
    for r in w["records"]["samples"].values():
        end = r["data_off"] + r["dsize"] if r["overflow"] else (r["leaf"] + 1) * PSIZE
        intact += end <= cut and (r["leaf"] + 1) * PSIZE <= cut
    os.truncate(os.path.join(mixed, "data.mdb"), cut)
    rep = verify(mixed, repair=True)
    assert rep.ok and rep.repaired, rep
    assert rep.salvaged >= intact > 0, (rep.salvaged, intact)
    out = check_child(run_child(READ, mixed, N, "1", "plain"))
    assert out["wrong"] == [] and out["hits"] == rep.salvaged, out
