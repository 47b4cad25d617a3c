"""F24: no false alarms on healthy but unusual files.

The p02c random workload (values of 10 B to 300 KB, shrinking and growing overwrites,
the same key twice in one transaction, deletes, aborted transactions) runs through
kvcache's write path (``Store.transact`` / ``write_records`` / ``delete_keys`` and
datasets with changing ``version=``), plus a raw-LMDB shrinking overwrite inside one
transaction of a kvcache-made file. Right after commits (from another process, while the
writer still has the file open) and after close: opening never refuses the cache (the
structural validation (kvcache.structure) never refuses a healthy file) and ``verify`` is OK.
"""

import os
import random

import lmdb
import numpy as np
import pytest
from _fault_helpers import BigSource, Holder

import kvcache
from kvcache import codec
from kvcache.store import Store, key_of

# Counts how often an open walked the file (its stamp did not match: another process wrote).
COUNT_TRIPS = """
import kvcache.structure as S
_orig = S.validate
trips = [0]
def _counted(*a, **k):
    trips[0] += 1
    return _orig(*a, **k)
S.validate = _counted
"""

# The holder opens the cache afresh each time (the registry closes it in between).
REOPEN = """
try:
    with kvcache.open_cache(path) as v:
        n = len(v.keys())
    d = kvcache.LmdbCachedDataset(None, path)
    len(d)
    d.close()
    res = {"ok": True, "n": n}
except kvcache.KvCacheError as exc:
    res = {"ok": False, "err": f"{type(exc).__name__}: {exc}"}
"""


def _row(rng, fp):
    a = np.frombuffer(rng.randbytes(rng.choice([10, 100, 2000, 5000, 40_000, 300_000])), np.uint8)
    rec, layout, checksum = codec.encode(a.copy(), fp)
    return rec, codec.meta_row(fp, checksum, len(rec), layout)


def _workload(path, holder, seed, commits):
    import kvcache.maintenance as m

    rng = random.Random(seed)
    sizes = [rng.choice([10, 3000, 70_000]) for _ in range(64)]
    ds = kvcache.LmdbCachedDataset(BigSource(sizes), path, write_batch=8)
    for i in range(0, 64, 3):
        ds[i]
    ds.flush()
    fp = ds._fp_id
    st = Store(path)
    alarms, checks = [], 0
    for c in range(commits):
        op = rng.random()
        if op < 0.35:  # overwrites that grow or shrink, and the same key twice in one txn
            keys = rng.sample(range(64), rng.randint(1, 6))
            rows = {k: [_row(rng, fp) for _ in range(rng.choice([1, 1, 2]))] for k in keys}

            def put(txn, rows=rows):
                e = st.handle()
                for k, versions in rows.items():
                    for rec, meta in versions:
                        txn.put(key_of(k), rec, db=e.samples)
                        txn.put(key_of(k), meta, db=e.meta)
            st.transact(put)
        elif op < 0.55:
            st.write_records(((k, *_row(rng, fp)) for k in rng.sample(range(64, 200), 4)), fp)
        elif op < 0.7:
            st.delete_keys(rng.sample(range(200), rng.randint(1, 10)))
        elif op < 0.85:  # an aborted transaction
            def boom(txn, fp=fp):
                e = st.handle()
                for k in rng.sample(range(64), 5):
                    rec, meta = _row(rng, fp)
                    txn.put(key_of(k), rec, db=e.samples)
                    txn.put(key_of(k), meta, db=e.meta)
                raise KeyboardInterrupt("abort")
            with pytest.raises(KeyboardInterrupt):
                st.transact(boom)
        else:  # a dataset with another version rewrites what it reads
            with kvcache.LmdbCachedDataset(BigSource(sizes), path, version=f"v{c}", write_batch=4) as d2:
                for i in rng.sample(range(64), 12):
                    d2[i]
            fp = ds._prepare() and ds._fp_id  # back to the first source's fingerprint
        out = holder.ok(REOPEN)  # right after the commit, writer still open
        checks += 1
        if not out["ok"]:
            alarms.append((c, out["err"]))
        if c % 15 == 14:
            rep = m.verify(path)
            assert rep.ok, (c, rep)
    ds.close()
    st.close()
    out = holder.ok(REOPEN)
    if not out["ok"]:
        alarms.append(("closed", out["err"]))
    return alarms, checks


def _raw_shrinking_overwrite(path):
    """In one raw LMDB transaction: grow a record to 300 KB, then shrink it back."""
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    env = lmdb.open(path, max_dbs=4, subdir=True, map_size=2 * size + (16 << 20))
    try:
        samples = env.open_db(b"samples", create=False)
        with env.begin(write=True, db=samples) as txn:
            cur = txn.cursor()
            assert cur.first()
            key, old = bytes(cur.key()), bytes(cur.value())
            fp = codec.read_header(old)[0]
            big = codec.encode(np.zeros(300_000, np.uint8), fp)[0]
            txn.put(key, big)
            txn.put(key, old)
            txn.put(key + b"x", big)  # a new overflow value, deleted in the same txn
            txn.delete(key + b"x")
    finally:
        env.close()


@pytest.mark.parametrize("seed,commits", [(1, 45), pytest.param(2, 300, marks=pytest.mark.slow),
                                          pytest.param(3, 300, marks=pytest.mark.slow)])
def test_f24_random_workload_no_false_alarm(tmp_path, seed, commits):
    import kvcache.maintenance as m

    path = str(tmp_path / "c")
    kvcache.LmdbCachedDataset(BigSource([10]), path).close()  # create it
    h = Holder(path)
    h.ok(COUNT_TRIPS)
    try:
        alarms, checks = _workload(path, h, seed, commits)
        assert checks == commits
        assert alarms == [], alarms  # 0 false CacheCorruptError
        rep = m.verify(path)
        assert rep.ok, rep
        _raw_shrinking_overwrite(path)
        out = h.ok(REOPEN)
        assert out["ok"], out
        print("structural walks on open (all passed):", h.ok("res = trips[0]"))
    finally:
        assert h.close() == 0
    rep = m.verify(path)
    assert rep.ok, rep
    from kvcache.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["verify", path])
    assert ex.value.code == 0
