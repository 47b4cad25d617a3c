"""F26: a damaged node size, or another record's bytes under a key, is never served.

Issue 11, item 1: (a) ``codec.decode`` hashed ``buf[16:]`` before anything had checked
``len(buf)``, so a damaged LMDB node size made the value run past the end of ``data.mdb``
and the first touch there was SIGBUS; now the plan checks the record's length against its
header and layout first. And a page of one record copied over another's (tools/fuzz.py
kind ``copy_page``) served the other sample with a valid checksum; records are now KEYED
(the checksum is seeded with the index), so it fails the checksum under the wrong key.
"""

from _fault_helpers import check_child, file_bytes, patch, record_place, run_child

# A record at the very end of a file, seen through a buffer that claims 1 MiB: what LMDB
# hands out when a node's size is damaged. The buffer is a mapping of the file longer
# than the file, so any touch past the record's page is SIGBUS, as in data.mdb.
MAPPED_DECODE = r"""
import ctypes, json, mmap, os, sys
import numpy as np
from kvcache import codec, CorruptRecordError
path = sys.argv[1]
rec, _layout, _cs = codec.encode((np.arange(64, dtype=np.float32), 7), 1, 7)
with open(path, "wb") as f:
    f.write(bytes(4096 - len(rec)) + rec)  # the record ends where the file ends
fd = os.open(path, os.O_RDONLY)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
base = libc.mmap(None, 1 << 21, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
start = base + 4096 - len(rec)
buf = memoryview((ctypes.c_char * (1 << 20)).from_address(start)).cast("B")
assert bytes(buf[:len(rec)]) == bytes(rec)
out = {}
for verify in (True, False):
    try:
        codec.decode(buf, verify, None, 7)
        out[str(verify)] = "decoded"
    except CorruptRecordError as exc:
        out[str(verify)] = str(exc)
out["good"] = int(codec.decode(buf[:len(rec)], True, None, 7)[1])
print(json.dumps(out))
"""


def test_f26_damaged_size_is_refused_before_the_body_is_read(tmp_path):
    """The length check comes before the checksum: a buffer longer than its record (a
    damaged node size) is refused without touching a byte past the record."""
    out = check_child(run_child(MAPPED_DECODE, tmp_path / "f"))  # SIGBUS here before the fix
    assert out["good"] == 7, out
    assert "length" in out["True"] and "length" in out["False"], out


READ = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from _fault_helpers import *
import kvcache
path, with_source = sys.argv[1], sys.argv[2] == "1"
ds = kvcache.LmdbCachedDataset(ArraySource(8, 16384) if with_source else None, path)
out = {}
for i in range(8):
    try:
        out[i] = "same" if same(ds[i], sample_for(i, 16384)) else "WRONG"
    except kvcache.KvCacheError as exc:
        out[i] = type(exc).__name__
try:
    out["batch"] = [same(x, sample_for(i, 16384)) for i, x in enumerate(ds.__getitems__(list(range(8))))]
except kvcache.KvCacheError as exc:
    out["batch"] = type(exc).__name__
out["corrupt"] = ds.stats().corrupt
ds.close()
print(json.dumps(out))
"""


def test_f26_record_copied_over_another_key_is_not_served(big_cache):
    """Copy index 2's record (its overflow pages, header and all) over index 5's."""
    a, b = record_place(big_cache, 2), record_place(big_cache, 5)
    assert a["dsize"] == b["dsize"]
    data = file_bytes(big_cache)
    patch(big_cache, b["data_off"], data[a["data_off"]: a["data_off"] + a["dsize"]])
    out = check_child(run_child(READ, big_cache, "0"))
    assert out["5"] == "CorruptRecordError", out  # not sample 2 served as sample 5
    assert all(out[str(i)] == "same" for i in range(8) if i != 5), out
    out = check_child(run_child(READ, big_cache, "1"))  # with a source: recomputed
    assert all(out[str(i)] == "same" for i in range(8)), out
    assert out["batch"] == [True] * 8 and out["corrupt"] == 1, out
