"""A Hypothesis state machine drives one cached dataset against a plain dict model.

The model knows, per index, which source version wrote the record in LMDB and whether its
bytes were damaged, which computed samples wait in the write buffer, and the counts
``stats()`` must show. Rules: reads, ``__getitems__``, ``flush``, close and reopen (with
the source or ``source=None``), a ``version=`` bump under each ``on_stale`` mode,
``build()``, ``kvcache gc`` (CliRunner), ``merge`` of a second cache, damaging one record
in place in ``data.mdb``, ``kvcache verify``, ``compact`` and ``verify --repair``,
switching ``transform=``, and a DataLoader epoch in forked workers. After every step the
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
from _fault_helpers import patch, record_place  # noqa: E402

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
            kinds.append("corrupt" if "damaged" in msg else "reset" if "emptied" in msg else msg)
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
            self._open(new, on_stale)
            if on_stale == "reset":
                self.records.clear()
                self._warn("reset")

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
            damaged = sorted(i for i, r in self.records.items() if r.damaged)
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
                damaged = sorted(i for i, r in self.records.items() if r.damaged)
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

    @rule(data=st.data(), workers=st.sampled_from([1, 2]), batch_size=st.sampled_from([1, 4]))
    def epoch(self, data, workers: int, batch_size: int) -> None:
        """A DataLoader pass in forked workers; the parent's buffer is flushed before the
        fork, and the workers write what they computed before they exit."""
        pool = [i for i in range(N) if self._good(i)] if self.readonly else list(range(N))
        order = data.draw(st.lists(st.sampled_from(pool), max_size=2 * N) if pool else st.just([]),
                          label="sampler")
        with self._step():
            self._model_flush()
            loader = torch.utils.data.DataLoader(
                self.ds, batch_size=batch_size, sampler=order, num_workers=workers,
                multiprocessing_context="fork", collate_fn=list)
            got = [s for batch in loader for s in batch]
            assert len(got) == len(order)
            for i, sample in zip(order, got):
                assert same(sample, self._served(i)), i
            if not self.readonly:
                for i in order:
                    self.records[i] = Record(self.salt)

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

