"""Where a build's time goes, per item, against a raw LMDB put (wall µs, interleaved rounds).

    .venv/bin/python tools/bench_write_breakdown.py ragged     # or: small, large

Columns: the source alone; encode + the metadata row; a raw ``put(append=True)`` of the
array bytes (the bench's floor for build); the two ``put``s kvcache makes (record and
metadata row, ``overwrite=False``, 4,096-record commits) of pre-encoded records; the same
with ``append=True``; and ``LmdbCachedDataset.build()``.
"""
import os
import shutil
import sys
import tempfile
import time

import lmdb
import numpy as np
import torch

from kvcache import LmdbCachedDataset, codec
from kvcache.store import KEY


class Small(torch.utils.data.Dataset):
    def __init__(s, n): s.n=n; r=np.random.default_rng(0); s.x=r.integers(0,255,(n,3,32,32),dtype=np.uint8)
    def __len__(s): return s.n
    def __getitem__(s, i): return s.x[i], i % 10
class Ragged(torch.utils.data.Dataset):
    def __init__(s, n): s.n=n; r=np.random.default_rng(0); s.x=[r.integers(0,1000,int(r.integers(16,513))) for _ in range(n)]
    def __len__(s): return s.n
    def __getitem__(s, i): return {'tokens': s.x[i], 'label': i % 10}
class Large(torch.utils.data.Dataset):
    def __init__(s, n): s.n=n; r=np.random.default_rng(0); s.x=[r.random((3,224,224),dtype=np.float32) for _ in range(n)]
    def __len__(s): return s.n
    def __getitem__(s, i): return s.x[i], i % 10
which = sys.argv[1] if len(sys.argv) > 1 else "ragged"
src = {'small': lambda: Small(10000), 'ragged': lambda: Ragged(10000), 'large': lambda: Large(300)}[which]()
n = len(src)
base = tempfile.mkdtemp(dir=os.environ.get('TMPD', '/tmp'))
def t_source():
    t=time.perf_counter(); [src[i] for i in range(n)]; return time.perf_counter()-t
def t_encode():
    t=time.perf_counter()
    for i in range(n):
        rec, lay, cs = codec.encode(src[i], 1); codec.meta_row(1, cs, len(rec), lay)
    return time.perf_counter()-t
def t_raw():
    d = tempfile.mkdtemp(dir=base)
    env = lmdb.open(d, map_size=4<<30, max_dbs=2, metasync=False)
    db = env.open_db(b's')
    t=time.perf_counter()
    with env.begin(write=True, db=db) as txn:
        for i in range(n):
            x = src[i][0] if which != 'ragged' else src[i]['tokens']
            txn.put(KEY.pack(i), x.data, append=True)
    el = time.perf_counter()-t; env.close(); shutil.rmtree(d); return el
def t_raw2():  # two dbs, no append (kvcache's shape of writes, without encode)
    d = tempfile.mkdtemp(dir=base)
    env = lmdb.open(d, map_size=4<<30, max_dbs=2, metasync=False)
    db = env.open_db(b's'); db2 = env.open_db(b'm')
    recs = [codec.encode(src[i], 1) for i in range(n)]
    t=time.perf_counter()
    for k in range(0, n, 4096):
        with env.begin(write=True) as txn:
            for i in range(k, min(n, k+4096)):
                rec, lay, cs = recs[i]
                txn.put(KEY.pack(i), rec, db=db, overwrite=False)
                txn.put(KEY.pack(i), codec.meta_row(1, cs, len(rec), lay), db=db2)
    el = time.perf_counter()-t; env.close(); shutil.rmtree(d); return el
def t_raw3():  # two dbs, append
    d = tempfile.mkdtemp(dir=base)
    env = lmdb.open(d, map_size=4<<30, max_dbs=2, metasync=False)
    db = env.open_db(b's'); db2 = env.open_db(b'm')
    recs = [codec.encode(src[i], 1) for i in range(n)]
    t=time.perf_counter()
    for k in range(0, n, 4096):
        with env.begin(write=True) as txn:
            for i in range(k, min(n, k+4096)):
                rec, lay, cs = recs[i]
                key = KEY.pack(i)
                if not txn.put(key, rec, db=db, append=True):
                    txn.put(key, rec, db=db, overwrite=False)
                txn.put(key, codec.meta_row(1, cs, len(rec), lay), db=db2, append=True)
    el = time.perf_counter()-t; env.close(); shutil.rmtree(d); return el
def t_build():
    d = tempfile.mkdtemp(dir=base)
    ds = LmdbCachedDataset(src, d + '/c')
    t=time.perf_counter(); ds.build(); el = time.perf_counter()-t
    ds.close(); shutil.rmtree(d); return el
fns = {'source': t_source, 'encode': t_encode, 'raw_append': t_raw, 'two_dbs_put': t_raw2, 'two_dbs_append': t_raw3, 'build': t_build}
res = {k: [] for k in fns}
for r in range(5):
    for k, f in fns.items(): res[k].append(f())
print(which, {k: round(sorted(v)[2]/n*1e6, 2) for k, v in res.items()}, 'us/item')
shutil.rmtree(base)
