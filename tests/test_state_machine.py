"""A Hypothesis state machine drives one cached dataset against a plain dict model.

The model knows, per index, which source version wrote the record in LMDB and whether its
bytes were damaged, which computed samples wait in the write buffer, and the counts
``stats()`` must show. Rules: reads, ``__getitems__``, ``flush``, close and reopen (with
the source or ``source=None``), a ``version=`` bump under each ``on_stale`` mode,
``build()``, ``kvcache gc`` (CliRunner), ``merge`` of a second cache, damaging one record
in place in ``data.mdb``, damaging a metadata row, zeroing a leaf or branch page of the
samples tree (the dataset repairs it at open: kvcache.selfrepair), ``kvcache verify``,
``compact`` and ``verify --repair``, switching ``transform=``, a DataLoader epoch in fork or
spawn workers, a second live dataset on the same path in this process, two writer
processes at once, and publishing the cache then reading (and damaging) the published copy. After every step the
samples served, ``stats()``, ``open_cache().keys()``, ``len`` (the stored tally),
``inspect`` and every stored sample agree with the model, and the warnings emitted are
exactly the ones the model expects.

The default run is small; ``-m slow`` runs a longer one (zarr-python's store state
machine is the pattern).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass

import pytest
import torch.utils.data
from click.testing import CliRunner
from helpers import ImageSource, same
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import kvcache
from kvcache import (
    CorruptRecordError,
    KvCacheWarning,
    LmdbCachedDataset,
    MissingSampleError,
    StaleCacheError,
    open_cache,
)
from kvcache.cli import cli
from kvcache.maintenance import inspect_cache, merge
from kvcache.tally import TALLY_KEY, Tally

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults"))
from _fault_helpers import patch, record_place, walk  # noqa: E402

N = 12  # samples in the source
SALTS = (0, 1, 2)  # source versions: ImageSource(N, salt) with version=salt
_EXPECTED = {(s, i): ImageSource(N, s)[i] for s in SALTS for i in range(N)}


def expected(salt: int, i: int):
    return _EXPECTED[salt, i]


def augment(sample):
    """A transform= for the machine: deterministic, so the model knows what it serves."""
    image, label = sample
    return image.flip(-1), label + 1000


@dataclass
class Record:
    """What LMDB holds at one index, as the model sees it."""

    salt: int  # the source version that wrote it
    damaged: bool = False
    meta_damaged: bool = False  # its metadata row was damaged (verify reports it; reads do not care)


def _write_subset(path: str, salt: int, subset: list) -> None:
    """In a writer process: open the cache with the source and read ``subset``."""
    warnings.simplefilter("ignore")
    with LmdbCachedDataset(ImageSource(N, salt), path, version=salt) as ds:
        ds.__getitems__(subset)


def _flip_byte(path: str, i: int) -> None:
    """Flip one byte near the end of index ``i``'s record value, in data.mdb itself."""
    place = record_place(path, i)
    off = place["data_off"] + place["dsize"] - 3
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        f.seek(off)
        byte = f.read(1)[0]
    patch(path, off, bytes([byte ^ 0x5A]))


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kvcache-sm-")
        self.path = os.path.join(self.tmp, "cache")
        self.ds: LmdbCachedDataset | None = None
        self.records: dict[int, Record] = {}
        self.pending: list[int] = []  # the write buffer, in insertion order
        self.salt = 0
        self.readonly = False  # opened with source=None
        self.stats: dict[str, int] = {}
        self.warned: set[str] = set()  # this dataset instance's warn-once keys
        self.want_warnings: list[str] = []
        self.write_batch = 4096
        self.transform = None  # transform= of the dataset: served samples, never stored ones
        self.lru_bytes = 0
        self.lru: set[int] = set()  # indices in the dataset's LRU (large enough never to evict)
        self.others = 0

    # -- the dataset under test

    def _open(self, salt: int | None, on_stale: str = "recompute") -> None:
        """Open the dataset (source ``ImageSource(N, salt)``, or none) and reset the
        model's per-instance state."""
        source = None if salt is None else ImageSource(N, salt)
        ds = LmdbCachedDataset(source, self.path, version=None if salt is None else salt,
                               on_stale=on_stale, write_batch=self.write_batch, transform=self.transform,
                               lru_bytes=self.lru_bytes)
        # The writer also flushes a batch once its oldest row is 2 s old: a wall-clock
        # trigger the model cannot predict. Count-triggered flushes stay (write_batch).
        assert hasattr(ds._writer, "batch_seconds"), "the writer's time trigger moved: update this"
        ds._writer.batch_seconds = math.inf
        self.ds = ds
        self.readonly = salt is None
        self.stats = dict.fromkeys(kvcache.CacheStats().as_dict(), 0)
        self.warned = set()
        self.lru = set()
        if salt is not None:
            self.salt = salt

    def _close(self) -> None:
        self._model_flush()
        self.ds.close()

    @contextlib.contextmanager
    def _step(self):
        """Record kvcache's warnings during a step and compare them with the model's."""
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always", KvCacheWarning)
            yield
        kinds = []
        for w in got:
            assert issubclass(w.category, KvCacheWarning), w
            msg = str(w.message)
            kinds.append("corrupt" if "damaged" in msg else "reset" if "emptied" in msg
                         else "stale" if "will be recomputed" in msg else msg)
        assert sorted(kinds) == sorted(self.want_warnings), (kinds, self.want_warnings)
        self.want_warnings = []

    def _warn(self, key: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.want_warnings.append(key)

    # -- the model

    def _served(self, i: int):
        sample = expected(self.salt, i)
        return sample if self.transform is None else self.transform(sample)

    def _good(self, i: int) -> bool:
        r = self.records.get(i)
        return r is not None and r.salt == self.salt and not r.damaged

    def _model_flush(self) -> int:
        """The write buffer goes to LMDB; a key already holding a good record of this
        source is kept (first writer wins). Returns how many rows were written."""
        n = 0
        for i in self.pending:
            if not self._good(i):
                self.records[i] = Record(self.salt)
                n += 1
        self.pending = []
        self.stats["writes"] += n
        return n

    def _model_compute(self, i: int) -> None:
        if i in self.pending:  # computed earlier, not committed yet
            self.stats["hits"] += 1
            return
        self.stats["misses"] += 1
        self.pending.append(i)
        if len(self.pending) >= self.write_batch:
            self._model_flush()

    def _model_lookup(self, i: int) -> str:
        """What reading index ``i`` from LMDB gives: ``"hit"``, ``"compute"``,
        ``"missing"`` or ``"corrupt"`` (the last two only without a source)."""
        if self.lru_bytes and i in self.lru:
            self.stats["lru_hits"] += 1
            return "hit"
        r = self.records.get(i)
        if r is None:
            return "missing" if self.readonly else "compute"
        if r.salt != self.salt:
            self.stats["stale"] += 1
            return "missing" if self.readonly else "compute"
        if r.damaged:
            if i not in self.pending:  # a damaged record is counted once, not once per read
                self.stats["corrupt"] += 1
            if self.readonly:
                return "corrupt"
            self._warn("corrupt")
            return "compute"
        self.stats["hits"] += 1
        self.lru.add(i)
        return "hit"

    # -- rules

    @initialize(write_batch=st.sampled_from([1, 3, 4096]), transformed=st.booleans(), lru=st.booleans())
    def start(self, write_batch: int, transformed: bool, lru: bool) -> None:
        self.write_batch = write_batch
        self.lru_bytes = 1 << 20 if lru else 0
        self.transform = augment if transformed else None
        with self._step():
            self._open(0)

    @rule(i=st.integers(-N - 1, N))
    def read(self, i: int) -> None:
        with self._step():
            if not -N <= i < N:
                with pytest.raises(IndexError):
                    self.ds[i]
                return
            j = i % N
            outcome = self._model_lookup(j)
            if outcome == "missing":
                with pytest.raises(MissingSampleError):
                    self.ds[i]
            elif outcome == "corrupt":
                with pytest.raises(CorruptRecordError):
                    self.ds[i]
            else:
                if outcome == "compute":
                    self._model_compute(j)
                assert same(self.ds[i], self._served(j))

    @rule(asked=st.lists(st.integers(-N, N - 1), max_size=6))
    def getitems(self, asked: list[int]) -> None:
        indices = [i % N for i in asked]
        with self._step():
            # one read transaction for the batch, then the misses computed in order
            outcomes = []
            for i in indices:
                outcomes.append(self._model_lookup(i))
                if outcomes[-1] == "corrupt":
                    with pytest.raises(CorruptRecordError):
                        self.ds.__getitems__(asked)
                    return
            if "missing" in outcomes:
                with pytest.raises(MissingSampleError):
                    self.ds.__getitems__(asked)
                return
            for i, outcome in zip(indices, outcomes):
                if outcome == "compute":
                    self._model_compute(i)
            got = self.ds.__getitems__(asked)
            assert len(got) == len(indices)
            for i, sample in zip(indices, got):
                assert same(sample, self._served(i)), i

    @rule(on=st.booleans())
    def set_transform(self, on: bool) -> None:
        """``ds.transform`` changes what is served, not what is stored or its fingerprint."""
        with self._step():
            self.transform = self.ds.transform = augment if on else None

    @rule()
    def flush(self) -> None:
        with self._step():
            n = self._model_flush()
            assert self.ds.flush() == n

    @rule(with_source=st.booleans())
    def reopen(self, with_source: bool) -> None:
        with self._step():
            self._close()
            self._open(self.salt if with_source else None)

    @rule(data=st.data(), on_stale=st.sampled_from(["recompute", "reset", "error"]))
    def bump_version(self, data, on_stale: str) -> None:
        new = data.draw(st.sampled_from([s for s in SALTS if s != self.salt]), label="new salt")
        with self._step():
            self._close()
            if on_stale == "error":
                with pytest.raises(StaleCacheError):
                    LmdbCachedDataset(ImageSource(N, new), self.path, version=new, on_stale="error")
                self._open(self.salt)  # the old source still opens it
                return
            others = sum(r.salt != new for r in self.records.values())
            self._open(new, on_stale)
            if on_stale == "reset":
                self.records.clear()
                self._warn("reset")
            elif others:  # a changed source (its salt) warns once, naming what is recomputed
                self.want_warnings.append("stale")

    @rule(workers=st.sampled_from([0, 1]))
    def build(self, workers: int) -> None:
        """``build()`` fills every index without a record of this source (a damaged one
        is a record: ``verify`` finds it, a read replaces it)."""
        with self._step():
            if self.readonly:
                with pytest.raises(MissingSampleError):
                    self.ds.build(num_workers=workers)
                return
            self._model_flush()
            todo = [i for i in range(N) if i not in self.records or self.records[i].salt != self.salt]
            report = self.ds.build(num_workers=workers)
            assert (report.total, report.computed, report.already_cached) == (N, len(todo), N - len(todo))
            for i in todo:
                self.records[i] = Record(self.salt)

    @rule()
    def gc(self) -> None:
        with self._step():
            res = CliRunner().invoke(cli, ["gc", "--json", self.path], catch_exceptions=False)
            assert res.exit_code == 0, res.output
            report = json.loads(res.output)
            doomed = [i for i, r in self.records.items() if r.salt != self.salt]
            for i in doomed:
                del self.records[i]
            assert (report["removed"], report["kept"]) == (len(doomed), len(self.records))

    @rule()
    def verify(self) -> None:
        """``kvcache verify`` beside the live dataset names exactly the damaged records."""
        with self._step():
            res = CliRunner().invoke(cli, ["verify", "--json", self.path], catch_exceptions=False)
            report = json.loads(res.output)
            damaged = sorted(i for i, r in self.records.items() if r.damaged or r.meta_damaged)
            assert (report["bad"], report["entries"]) == (damaged, len(self.records)), report
            assert res.exit_code == (1 if damaged else 0)

    @rule(command=st.sampled_from(["compact", "repair"]))
    def offline(self, command: str) -> None:
        """Close the dataset, run a command that needs the cache to itself, reopen."""
        with self._step():
            self._close()
            args = ["compact", "--json"] if command == "compact" else ["verify", "--repair", "--json"]
            res = CliRunner().invoke(cli, [*args, self.path], catch_exceptions=False)
            assert res.exit_code == 0, res.output
            report = json.loads(res.output)
            if command == "compact":
                assert report["entries"] == len(self.records)
            else:
                damaged = sorted(i for i, r in self.records.items() if r.damaged or r.meta_damaged)
                assert report["bad"] == damaged and (report["after"] or report)["ok"], report
                for i in damaged:
                    del self.records[i]
            self._open(None if self.readonly else self.salt)

    @rule(subset=st.sets(st.integers(0, N - 1), max_size=N), same_source=st.booleans(), data=st.data())
    def merge_other(self, subset: set[int], same_source: bool, data) -> None:
        """Build a second cache of some indices (one of them maybe damaged) and merge it
        into ours, live."""
        self.others += 1
        other = os.path.join(self.tmp, f"other{self.others}")
        salt = self.salt if same_source else (self.salt + 1) % len(SALTS)
        bad = data.draw(st.sampled_from([None, *sorted(subset)]), label="damaged in the other cache")
        with self._step():
            with LmdbCachedDataset(ImageSource(N, salt), other, version=salt) as ds2:
                ds2.__getitems__(sorted(subset))
            if bad is not None:
                _flip_byte(other, bad)
            if not same_source:
                with pytest.raises(StaleCacheError):
                    merge(self.path, [other])
                return
            good = subset - {bad}
            copied = [i for i in good if not self._good(i)]
            for i in copied:
                self.records[i] = Record(self.salt)
            report = merge(self.path, [other])
            assert report.ok == (bad is None) and report.bad[other] == ([] if bad is None else [bad])
            assert (report.copied, report.already_present) == (len(copied), len(good) - len(copied))
            assert report.entries == sum(r.salt == self.salt for r in self.records.values())

    def _damageable(self) -> list[int]:
        return sorted(i for i, r in self.records.items() if not r.damaged and i not in self.pending)

    @precondition(lambda self: self._damageable())
    @rule(data=st.data())
    def damage(self, data) -> None:
        """Flip one byte near the end of a committed record's value, in data.mdb itself
        (the dataset keeps its environment open, as a training job would)."""
        i = data.draw(st.sampled_from(self._damageable()), label="damaged index")
        _flip_byte(self.path, i)
        self.records[i].damaged = True

    @rule(data=st.data(), workers=st.sampled_from([1, 2]), batch_size=st.sampled_from([1, 4]),
          start=st.sampled_from(["fork", "fork", "spawn"]))
    def epoch(self, data, workers: int, batch_size: int, start: str) -> None:
        """A DataLoader pass in fork or spawn workers; before a fork the parent's buffer
        is flushed (a spawned worker starts without it and computes those indices itself),
        and the workers write what they computed before they exit."""
        pool = [i for i in range(N) if self._good(i)] if self.readonly else list(range(N))
        order = data.draw(st.lists(st.sampled_from(pool), max_size=2 * N) if pool else st.just([]),
                          label="sampler")
        with self._step():
            if start == "fork":
                self._model_flush()
            loader = torch.utils.data.DataLoader(
                self.ds, batch_size=batch_size, sampler=order, num_workers=workers,
                multiprocessing_context=start, collate_fn=list)
            got = [s for batch in loader for s in batch]
            assert len(got) == len(order)
            for i, sample in zip(order, got):
                assert same(sample, self._served(i)), i
            if not self.readonly:
                for i in order:
                    if not self._good(i):
                        self.records[i] = Record(self.salt)

    @rule(subset=st.lists(st.integers(0, N - 1), max_size=N))
    def second_dataset(self, subset: list[int]) -> None:
        """Another live dataset on the same path in this process (it shares the process's
        environment): it serves, computes and writes on its own; ours sees its records."""
        with self._step():
            ds2 = LmdbCachedDataset(ImageSource(N, self.salt), self.path, version=self.salt)
            got = ds2.__getitems__(subset)
            assert all(same(x, expected(self.salt, i)) for i, x in zip(subset, got))
            if any(i in self.records and self.records[i].damaged and self.records[i].salt == self.salt
                   for i in subset):
                self.want_warnings.append("corrupt")  # its own warn-once
            ds2.close()
            for i in subset:
                if not self._good(i):
                    self.records[i] = Record(self.salt)

    @rule(a=st.lists(st.integers(0, N - 1), max_size=N), b=st.lists(st.integers(0, N - 1), max_size=N))
    def writer_processes(self, a: list[int], b: list[int]) -> None:
        """Two writer processes fill the cache at once while our dataset has it open."""
        import multiprocessing

        with self._step():
            self._model_flush()  # forking flushes our buffer first
            ctx = multiprocessing.get_context("fork")
            procs = [ctx.Process(target=_write_subset, args=(self.path, self.salt, sub)) for sub in (a, b)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(120)
                assert p.exitcode == 0, p.exitcode
            for i in set(a) | set(b):
                if not self._good(i):
                    self.records[i] = Record(self.salt)

    def _meta_damageable(self) -> list[int]:
        return sorted(i for i, r in self.records.items() if not r.meta_damaged and i not in self.pending)

    @precondition(lambda self: self._meta_damageable())
    @rule(data=st.data())
    def damage_meta_row(self, data) -> None:
        """Flip the last byte of a committed metadata row (its layout): reads never consult
        it, verify names the index, a repair drops the record with it."""
        i = data.draw(st.sampled_from(self._meta_damageable()), label="damaged metadata row")
        place = record_place(self.path, i, db="meta")
        off = place["data_off"] + place["dsize"] - 1
        with open(os.path.join(self.path, "data.mdb"), "rb") as f:
            f.seek(off)
            byte = f.read(1)[0]
        patch(self.path, off, bytes([byte ^ 0x01]))
        self.records[i].meta_damaged = True

    @precondition(lambda self: not self.readonly and self.records)
    @rule(data=st.data(), what=st.sampled_from(["leaf", "branch"]))
    def damage_structure(self, data, what: str) -> None:
        """Zero a page of the samples tree of a freshly compacted file (no stale copies
        of pages), then reopen with the source: the dataset salvages every intact record
        (the zeroed leaf's records are lost, a zeroed branch costs nothing), drops the
        damaged ones, and warns once."""
        with self._step():
            self._close()
            res = CliRunner().invoke(cli, ["compact", "--json", self.path], catch_exceptions=False)
            assert res.exit_code == 0, res.output
            w = walk(self.path)
            pages = w["pages"].get("samples", {}).get(what, [])
            if not pages:
                self._open(self.salt)
                return
            pg = data.draw(st.sampled_from(sorted(pages)), label=f"zeroed {what} page")
            lost = {int.from_bytes(k, "big") for k, r in w["records"]["samples"].items()
                    if what == "leaf" and r["leaf"] == pg}
            patch(self.path, pg * 4096, bytes(4096))
            self._open(self.salt)
            assert self.ds.self_repair is not None and self.ds.self_repair.action == "salvaged"
            for i in list(self.records):
                r = self.records[i]
                if i in lost or r.damaged:
                    del self.records[i]
                else:
                    r.meta_damaged = False  # salvage writes every metadata row afresh
            self._warn("corrupt")  # the one warning that says what was repaired

    @precondition(lambda self: not any(r.damaged or r.meta_damaged for r in self.records.values()))
    @rule(zero=st.booleans())
    def publish_and_read(self, zero: bool) -> None:
        """Publish the cache, read every index of the published copy with the source (maybe
        with a zeroed leaf page): every sample right, the copy never written."""
        self.others += 1
        dest = os.path.join(self.tmp, f"pub{self.others}")
        with self._step():
            self._model_flush()
            self.ds.flush()
            res = CliRunner().invoke(cli, ["publish", "--partial", self.path, dest], catch_exceptions=False)
            assert res.exit_code == 0, res.output
            data = os.path.join(dest, "data.mdb")
            if zero:
                leaves = walk(dest)["pages"].get("samples", {}).get("leaf", [])
                if leaves:
                    os.chmod(data, 0o644)
                    patch(dest, leaves[0] * 4096, bytes(4096))
                    os.chmod(data, 0o444)
            with open(data, "rb") as f:
                before = f.read()
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always", KvCacheWarning)
                with LmdbCachedDataset(ImageSource(N, self.salt), dest, version=self.salt) as pub:
                    assert all(same(pub[i], expected(self.salt, i)) for i in range(N))
                    assert all(same(x, expected(self.salt, i))
                               for i, x in enumerate(pub.__getitems__(list(range(N)))))
            assert len(got) <= 1, [str(w.message) for w in got]
            with open(data, "rb") as f:
                assert f.read() == before

    # -- what must hold after every step

    @invariant()
    def agrees_with_model(self) -> None:
        if self.ds is None:
            return
        assert len(self.ds) == N
        assert self.ds.stats().as_dict() == self.stats
        current = sorted(i for i, r in self.records.items() if r.salt == self.salt)
        assert sorted(self.ds.cached_indices()) == current
        per_source = sorted(Counter(r.salt for r in self.records.values()).values())
        missing = object()
        with open_cache(self.path) as view:
            assert list(view.keys()) == list(view) == current
            assert len(view) == len(current)  # the tally every writer keeps
            e = view.store.handle()
            with view.store.begin(e.info) as txn:  # the stored tally, not a recount
                tally = Tally.from_json(txn.get(TALLY_KEY))
            assert sorted(fp.rows for fp in (tally.fps.values() if tally else ())) == per_source
            assert view.info().entries == len(self.records)
            for i in range(N):
                assert (i in view) == (i in current), i
                r = self.records.get(i)
                if r is None or r.salt != self.salt:
                    with pytest.raises(MissingSampleError):
                        view[i]
                    assert view.get(i, missing) is missing
                elif r.damaged:
                    with pytest.raises(CorruptRecordError):
                        view[i]
                else:
                    assert same(view[i], expected(self.salt, i)), i
            if not any(self.records[i].damaged for i in current):
                items = list(view.items())  # a Mapping's items(): decoded, in index order
                assert [i for i, _ in items] == current
                assert all(same(v, expected(self.salt, i)) for i, v in items)
        report = inspect_cache(self.path)
        assert (report.current_entries, report.stale_entries) == (len(current), len(self.records) - len(current))

    def teardown(self) -> None:
        try:
            if self.ds is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", KvCacheWarning)
                    self.ds.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _run(max_examples: int, steps: int) -> None:
    run_state_machine_as_test(CacheMachine, settings=settings(
        settings.get_profile("default"), max_examples=max_examples, stateful_step_count=steps, deadline=None))


def test_state_machine():
    _run(max_examples=10, steps=20)


@pytest.mark.slow
def test_state_machine_long():
    _run(max_examples=60, steps=40)

