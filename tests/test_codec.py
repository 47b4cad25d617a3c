"""The codec: exact round trips of any supported sample, refusals that name the place,
and decoding of hostile bytes that only ever raises CorruptRecordError."""

from __future__ import annotations

import collections
import io
import random
import struct

import xxhash

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvcache import CorruptRecordError, KvCacheError, UnsupportedSampleError, codec, layout, plans
from kvcache.codec import HEADER_SIZE, decode, encode

from helpers import Unsupported, same, tensor_bytes

# --------------------------------------------------------------------------- strategies

_RAW_T = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}
TORCH_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    - {torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4},
    key=str,
)
assert {torch.bfloat16, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
        torch.uint32, torch.uint64, torch.complex32, torch.complex64} <= set(TORCH_DTYPES)



def _reprable(dt: torch.dtype) -> bool:
    """Hypothesis reprs what it draws; torch cannot repr some sub-byte dtypes (int1...)."""
    try:
        repr(torch.zeros(dt.itemsize, dtype=torch.uint8).view(dt)[0])
        return True
    except (NotImplementedError, RuntimeError):
        return False


HYPOTHESIS_TORCH_DTYPES = [dt for dt in TORCH_DTYPES if _reprable(dt)]
small_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def tensors(draw):
    dt = draw(st.sampled_from(HYPOTHESIS_TORCH_DTYPES))
    shape = draw(small_shapes)
    how = draw(st.sampled_from(["plain", "transposed", "strided", "view"]))
    base_shape = shape
    if how == "strided":
        base_shape = shape[:-1] + (2 * shape[-1],) if shape else shape
    elif how == "transposed" and len(shape) >= 2:
        base_shape = shape[::-1]
    elif how == "view":
        base_shape = (int(np.prod(shape)) + 3,)
    n = int(np.prod(base_shape)) * dt.itemsize
    data = draw(st.binary(min_size=n, max_size=n))
    if dt is torch.bool:
        data = bytes(b & 1 for b in data)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    t = t.reshape(base_shape + (dt.itemsize,)).view(dt)[..., 0]
    if how == "strided" and shape:
        t = t[..., ::2]
    elif how == "transposed" and len(shape) >= 2:
        t = t.permute(*reversed(range(len(shape))))
    elif how == "view":
        t = t[3:].reshape(shape)
    return t


ascii_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=4)


def _structs(fields):
    return st.lists(st.tuples(ascii_names, fields, st.sampled_from([(), (2,)])),
                    min_size=1, max_size=3, unique_by=lambda f: f[0]).map(
        lambda fs: np.dtype([(n, d, s) if s else (n, d) for n, d, s in fs]))


structured_dtypes = _structs(st.one_of(hnp.scalar_dtypes(), _structs(hnp.scalar_dtypes())))

array_dtypes = st.one_of(
    hnp.scalar_dtypes(),
    hnp.integer_dtypes(endianness=">"),
    hnp.floating_dtypes(endianness=">", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness=">"),
    hnp.byte_string_dtypes(max_len=5),
    hnp.unicode_string_dtypes(max_len=5, endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    structured_dtypes,
    st.just(np.dtype(np.longdouble)),
)


@st.composite
def ndarrays(draw):
    dt = draw(array_dtypes)
    shape = draw(small_shapes)
    n = int(np.prod(shape)) * dt.itemsize
    data = draw(st.binary(min_size=n, max_size=n))
    a = np.frombuffer(data, dtype=dt, count=int(np.prod(shape))).reshape(shape).copy()
    how = draw(st.sampled_from(["plain", "fortran", "strided"]))
    if how == "fortran":
        a = np.asfortranarray(a)
    elif how == "strided" and a.ndim:
        a = np.concatenate([a, a], axis=-1)[..., ::2]
    return a


@st.composite
def np_scalars(draw):
    dt = draw(array_dtypes.filter(lambda d: d.itemsize > 0))
    data = draw(st.binary(min_size=dt.itemsize, max_size=dt.itemsize))
    try:
        return np.frombuffer(data, dtype=dt, count=1)[0]
    except (SystemError, ValueError):  # numpy refuses code points past U+10FFFF
        assume(False)


any_text = st.text(st.characters(blacklist_categories=()), max_size=12)  # surrogates included
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-0.0, 0.0]),
                   st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0]))
leaves = st.one_of(
    st.integers(), st.integers(-(2**200), 2**200), st.sampled_from([2**63 - 1, -(2**63), 2**63, -(2**63) - 1]),
    floats, st.booleans(), st.none(), any_text, st.binary(max_size=16),
    tensors(), ndarrays(), np_scalars(),
)
samples = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(any_text, kids, max_size=4),
    ),
    max_leaves=12,
)


# --------------------------------------------------------------------------- helpers


def _leaves(x):
    if isinstance(x, (tuple, list)):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    else:
        yield x


def _leaf_size(v) -> int:
    """Payload bytes of a non-array leaf (see the record format in kvcache.codec)."""
    if type(v) is int:
        if -(2**63) <= v < 2**63:
            return 8
        return 4 + (v.bit_length() + 8) // 8
    if type(v) is float:
        return 8
    if type(v) is bool:
        return 1
    if v is None:
        return 0
    if type(v) is str:
        return 4 + len(v.encode("utf-8", "surrogatepass"))
    if type(v) is bytes:
        return 4 + len(v)
    assert isinstance(v, np.generic)
    return v.dtype.itemsize or (4 if v.dtype.kind == "U" else 1)  # b"" / "" take one unit


def _as_numpy(v):
    """What np.load must give for an array leaf: the C-order array (a tensor of a dtype
    numpy lacks is stored as the unsigned integer of its width)."""
    if isinstance(v, torch.Tensor):
        v = v.detach()
        name = str(v.dtype).removeprefix("torch.")
        if name not in layout.TORCH_NATIVE:
            # view first: complex32 / sub-byte dtypes have no copy kernel (or warn)
            v = v.view(_RAW_T[v.element_size()])
        return v.contiguous().numpy()
    return np.ascontiguousarray(v) if v.ndim else v


def check_npy_blobs(sample, record: bytes) -> None:
    """Every array leaf is a complete .npy blob that np.load reads on its own."""
    _fp, _cs, layout_len = codec.read_header(record)
    f = io.BytesIO(record)
    f.seek(HEADER_SIZE + layout_len)
    for v in _leaves(sample):
        if isinstance(v, (np.ndarray, torch.Tensor)):
            got = np.load(f, allow_pickle=False)
            want = _as_numpy(v)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes()
        else:
            f.seek(_leaf_size(v), io.SEEK_CUR)
    assert f.tell() == len(record)


def roundtrip(sample, decodes: int = 5):
    """Encode, then decode ``decodes`` times from a cold plan cache (interpreted first,
    compiled from the third use on); every decode must equal the sample exactly."""
    record, lay, checksum = encode(sample, 7)
    assert record[HEADER_SIZE : HEADER_SIZE + len(lay)] == lay
    assert codec.checksum_ok(record)
    assert codec.read_header(record) == (7, checksum, len(lay))
    plans.PLANS.pop(lay, None)
    outs = [decode(record, True, 7) for _ in range(decodes)]
    for out in outs:
        assert same(out, sample)
    assert plans.PLANS[lay].__name__ != "warming"  # the hot plan was built and used
    return record, outs


# --------------------------------------------------------------------------- round trips


@settings(max_examples=300)
@given(samples)
def test_roundtrip_any_sample(sample):
    record, _ = roundtrip(sample)
    check_npy_blobs(sample, record)


@settings(max_examples=100)
@given(samples)
def test_roundtrip_from_memoryview_and_bytearray(sample):
    record, _, _ = encode(sample, 1)
    assert same(decode(memoryview(record)), sample)
    assert same(decode(bytearray(record)), sample)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype(dtype):
    raw = torch.arange(24 * dtype.itemsize, dtype=torch.uint8)
    if dtype is torch.bool:
        raw = raw % 2
    t = raw.reshape(2, 3, 4, dtype.itemsize).view(dtype)[..., 0]
    for x in (t, t.transpose(0, 2), t[:, 1:, ::2], t[1, 2, 3]):
        _, outs = roundtrip(x)
        assert outs[0].dtype == dtype and outs[0].shape == x.shape
        assert outs[0].is_contiguous()


def test_scalars_and_containers_exact():
    sample = (
        1, -(2**63), 2**63, -(2**300), 3**200, 0.0, -0.0, float("inf"), float("-inf"), float("nan"),
        True, False, None, "", "h\u00e9llo \ud800 \U0001f600", b"", b"\x00\xff",
        [], (), {}, {"b": 1, "a": 2, "\udcff": [()]}, [(1,), [2], {"x": (None,)}],
        np.float32(1.5), np.int8(-3), np.bool_(True), np.datetime64("2024-01-02T03:04:05", "ns"),
        np.str_("abc"), np.bytes_(b"xy"), np.complex128(1 + 2j), np.float64("nan"),
    )
    _, outs = roundtrip(sample)
    out = outs[-1]
    assert type(out[2]) is int and out[2] == 2**63
    assert str(out[5]) == "0.0" and str(out[6]) == "-0.0"
    assert list(out[20]) == ["b", "a", "\udcff"]
    assert type(out[22]) is np.float32 and type(out[25]) is np.datetime64 and type(out[26]) is np.str_
    assert type(out[17]) is list and type(out[18]) is tuple and type(out[19]) is dict


def test_numpy_arrays_exact():
    cases = [
        np.array(5, dtype=">i4"),  # 0-d, big-endian
        np.zeros((0, 3), dtype=np.float32),  # empty
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        np.arange(20)[::3],
        np.array(["a", "bcd", "\u00e9"], dtype="<U3"),
        np.array([b"ab", b""], dtype="S2"),
        np.array(["2020-01-01", "NaT"], dtype="datetime64[s]"),
        np.array([1, -2], dtype="timedelta64[ms]"),
        np.zeros(3, dtype=[("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]),
        np.array([np.nan, -0.0, np.inf], dtype=np.float16),
        np.ones((2, 2), dtype=np.longdouble),
        np.ones(4, dtype=np.complex64),
    ]
    for a in cases:
        record, outs = roundtrip(a)
        check_npy_blobs(a, record)
        for out in outs:
            assert type(out) is np.ndarray and out.dtype == a.dtype and out.shape == a.shape
            assert out.flags.c_contiguous


# --------------------------------------------------------------------------- ownership


@pytest.mark.parametrize("make", [
    lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4),
    lambda: torch.arange(12, dtype=torch.int16).view(torch.bfloat16),
    lambda: np.arange(6, dtype=np.int64).reshape(2, 3),
    lambda: np.array(3.0),
], ids=["tensor", "bfloat16", "ndarray", "0d"])
def test_decoded_values_are_writable_and_own_their_memory(make):
    original = make()
    sample = {"x": original, "y": [original]}
    record, _, _ = encode(sample, 1)
    buf = bytearray(record)
    plans.PLANS.clear()
    for _ in range(5):  # interpreted, then compiled
        out = decode(buf)
        for leaf in (out["x"], out["y"][0]):
            if isinstance(leaf, torch.Tensor):
                leaf.view(_RAW_T[leaf.element_size()]).fill_(7)  # raises if read-only
            else:
                assert leaf.flags.writeable
                leaf.fill(7)
        assert same(decode(buf)["x"], original)
    out = decode(buf)
    buf[len(buf) - 1] ^= 0xFF  # the record changes after decoding: the value does not
    assert same(out["x"], original)


# --------------------------------------------------------------------------- refusals


class Foo:
    pass


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("bad, where, what", [
    ((0, {"meta": Foo()}), "sample[1]['meta']", "Foo"),
    ([1, {2, 3}], "sample[1]", "set"),
    ({"a": np.array([1, "x"], dtype=object)}, "sample['a']", "object"),
    ((Point(1, 2),), "sample[0]", "Point"),
    ({"a": {1: "x"}}, "sample['a']", "int"),
    ([torch.eye(3).to_sparse()], "sample[0]", "sparse"),
    ((np.float64(1), np.ma.masked_array([1, 2])), "sample[1]", "MaskedArray"),
    (frozenset(), "sample", "frozenset"),
    ((1, Unsupported()), "sample[1]", "Unsupported"),
    ({"x": [1.5j]}, "sample['x'][0]", "complex"),
    ((bytearray(b"x"),), "sample[0]", "bytearray"),
    ([0, np.zeros(2, dtype=[("\u00e9", "i4")])], "sample[1]", "non-ASCII"),
    ([np.void(b"")], "sample[0]", "zero-size"),
], ids=["class", "set", "object-array", "namedtuple", "int-key", "sparse", "masked", "frozenset",
        "helper-class", "complex", "bytearray", "unicode-field", "void0"])
def test_unsupported_types_raise_naming_the_place(bad, where, what):
    with pytest.raises(UnsupportedSampleError) as info:
        encode(bad, 1)
    assert isinstance(info.value, TypeError) and isinstance(info.value, KvCacheError)
    msg = str(info.value)
    assert msg.startswith(where + ":"), msg
    assert what in msg, msg


def test_unsupported_object_scalar_and_deep_nesting():
    with pytest.raises(UnsupportedSampleError):
        encode(np.array([None], dtype=object)[0:1], 1)
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(UnsupportedSampleError, match="nested deeper"):
        encode(deep, 1)


# --------------------------------------------------------------------------- hostile bytes

SEED_RECORDS = [
    encode(s, 3)[0]
    for s in [
        (torch.arange(6, dtype=torch.uint8).reshape(2, 3), 4),
        {"a": np.arange(5, dtype=">i4"), "b": "text", "c": [1.5, None, True, b"xy", 2**70]},
        [np.zeros((2, 0)), np.int16(3), (), {}],
        np.zeros(3, dtype=[("a", "<i4"), ("b", "S3")]),
        torch.ones(2, 2, dtype=torch.bfloat16),
    ]
]


def decode_hostile(buf, verify: bool):
    """Decode ``buf``; the only acceptable failure is CorruptRecordError."""
    try:
        return decode(buf, verify)
    except CorruptRecordError:
        return None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_corrupt_record(data):
    for verify in (True, False):
        decode_hostile(data, verify)
        decode_hostile(codec.MAGIC + data, verify)
        decode_hostile(codec.HEADER.pack(codec.MAGIC, 0, 0, 3, len(data) // 2) + data, False)


@settings(max_examples=300)
@given(st.sampled_from(SEED_RECORDS), st.data())
def test_flipped_and_truncated_records(record, data):
    cut = data.draw(st.integers(0, len(record) - 1))
    with pytest.raises(CorruptRecordError):
        decode(record[:cut], True)
    decode_hostile(record[:cut], False)
    pos = data.draw(st.integers(0, len(record) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(record)
    bad[pos] ^= flip
    with pytest.raises(CorruptRecordError):
        decode(bytes(bad), True)
    decode_hostile(bytes(bad), False)


def test_seeded_hostile_loop():
    """Thousands of flips, multi-byte flips and truncations, through both plans."""
    rng = random.Random(1234)
    for record in SEED_RECORDS:
        lay = codec.record_layout(record)
        for _ in range(4):
            decode(record)  # make this layout's plan compiled
        assert plans.PLANS[lay].__name__ != "warming"
        for n in range(800):
            bad = bytearray(record)
            for _ in range(1 + n % 3):
                bad[rng.randrange(len(bad))] ^= rng.randrange(1, 256)
            with pytest.raises(CorruptRecordError):
                decode(bytes(bad), True)
            decode_hostile(bytes(bad), False)
            # Re-seal the checksum so the flip reaches the layout and payload parsers.
            body = bytes(bad[16:])
            sealed = bytes(bad[:8]) + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body
            decode_hostile(sealed, True)
            cut = rng.randrange(len(record))
            with pytest.raises(CorruptRecordError):
                decode(record[:cut], True)
            decode_hostile(record[:cut], False)


def _forged(layout_bytes: bytes, payload: bytes = b"") -> bytes:
    body = struct.pack("<II", 3, len(layout_bytes)) + layout_bytes + payload
    return codec.MAGIC + struct.pack("<IQ", 0, xxhash.xxh3_64_intdigest(body)) + body


def _array_layout(desc: bytes, shape: tuple, hlen: int = 0) -> bytes:
    return (b"A" + bytes([len(desc)]) + desc + bytes([len(shape)])
            + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<I", hlen))


@pytest.mark.parametrize("desc, shape", [
    (b"|u1", (1 << 40,)),
    (b"<f8", (1 << 62, 1 << 62)),
    (b"<f8", (2**64 - 1,)),
    (b"|S0", (1 << 40,)),  # numpy allocates an S0 array with itemsize 1
    (b"<U0", (1 << 38,)),
    (b"|S0", (1 << 31,)),  # small enough for malloc to succeed
    (b"<U0", (3, 1 << 29)),
    (b"|u1", (1 << 32,) * 8),
], ids=["1TiB", "overflow", "u64max", "S0", "U0", "S0-2GiB", "U0-6GiB", "8dims"])
def test_huge_claimed_shape_raises_without_allocating(desc, shape):
    rec = _forged(_array_layout(desc, shape))
    with pytest.raises(CorruptRecordError):
        decode(rec, True)
    with pytest.raises(CorruptRecordError):
        decode(rec, False)


def test_huge_claimed_lengths_raise():
    for lay, payload in [
        (b"s", struct.pack("<I", 0xFFFFFFFF)),
        (b"y", struct.pack("<I", 1 << 31) + b"abc"),
        (b"I", struct.pack("<I", 0xFFFFFFF0)),
        (b"l" + struct.pack("<I", 0xFFFFFFFF), b""),
        (b"d" + struct.pack("<I", 1) + struct.pack("<H", 0xFFFF), b""),
        (b"t" * 70 + struct.pack("<I", 1), b""),
        (b"g\x05<f999", b"\x00" * 8),
        (b"P\x07float99" + _array_layout(b"<u2", (2,))[1:], b"\x00" * 4),
        (b"g\x0c[('a','O')]", b"\x00" * 8),
    ]:
        with pytest.raises(CorruptRecordError):
            decode(_forged(lay, payload), True)


def test_flipped_flags_are_caught():
    record = SEED_RECORDS[0]
    for pos in range(4, 8):
        bad = bytearray(record)
        bad[pos] ^= 1
        with pytest.raises(CorruptRecordError):
            decode(bytes(bad), True)


def test_npy_blob_loads_with_numpy_only():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    a = np.arange(4, dtype=">u2")
    record, _, _ = encode({"t": t, "a": a, "s": "x"}, 1)
    check_npy_blobs({"t": t, "a": a, "s": "x"}, record)
    assert tensor_bytes(decode(record)["t"]) == t.contiguous().numpy().tobytes()


def test_keyed_record_is_bound_to_its_index_and_unkeyed_records_still_read():
    """A KEYED record (the checksum seeded with its index) fails under any other index:
    a page of one record copied over another's is refused, not served as that sample.
    Records written without an index (flags 0, caches made before) still decode."""
    sample = (np.arange(12, dtype=np.int16), 3)
    rec, _layout, _cs = codec.encode(sample, 1, 7)
    assert struct.unpack_from("<I", rec, 4)[0] == codec.KEYED
    assert np.array_equal(codec.decode(rec, True, None, 7)[0], sample[0])
    for wrong in (8, 0, None):
        with pytest.raises(CorruptRecordError):
            codec.decode(rec, True, None, wrong)
    assert codec.decode(rec, False)[1] == 3  # unverified reads (LRU, pending rows) need no index
    old, _layout, _cs = codec.encode(sample, 1)
    assert struct.unpack_from("<I", old, 4)[0] == 0
    assert codec.decode(old, True, None, 123)[1] == 3 and codec.checksum_ok(old, 5)
    moved = codec.with_fp(old, 2, 9)  # merge re-stamps a record for another cache's fingerprint
    assert codec.read_header(moved)[0] == 2 and codec.checksum_ok(moved, 9) and not codec.checksum_ok(moved, 8)
