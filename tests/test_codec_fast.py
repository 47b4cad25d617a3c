"""The fast encoder (common types, no path bookkeeping) must write exactly the bytes the
full encoder writes; anything it does not handle falls back to the full one."""

from __future__ import annotations

import numpy as np
import xxhash
import pytest
import torch
from hypothesis import given, settings
from test_codec import samples

from kvcache import codec, encoder, plans


def full_encode(sample, fp_id: int) -> bytes:
    """The record as the full (path-tracking) encoder alone would write it."""
    enc = encoder._Encoder()
    enc.add(sample, "sample", 0)
    layout = b"".join(enc.layout)
    body = b"".join([encoder._TAIL.pack(fp_id, len(layout)), layout, *enc.parts])
    checksum = xxhash.xxh3_64_intdigest(body)
    return encoder._PREFIX.pack(codec.MAGIC, 0, checksum) + body


@settings(max_examples=300)
@given(samples)
def test_fast_encoder_writes_the_full_encoders_bytes(sample):
    record = codec.encode(sample, 5)[0]
    assert bytes(record) == full_encode(sample, 5)
    assert codec.checksum_ok(record)


@pytest.mark.parametrize("sample", [
    (np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2], 1),  # non-contiguous
    {"t": torch.arange(6).reshape(2, 3).t(), "g": torch.ones(2, requires_grad=True)},
    [torch.zeros(2, dtype=torch.bfloat16), torch.tensor([1 + 2j]).conj(), 2**70, np.int8(3)],
    {"big": np.zeros(70_000, np.uint8), "s": "x" * 10},  # over 64 KiB: bytearray join
    (np.zeros((0, 3)), torch.zeros(0), -(2**63), 2**63 - 1),
])
def test_fast_and_fallback_paths_agree(sample):
    record, _, _ = codec.encode(sample, 9)
    assert bytes(record) == full_encode(sample, 9)
    out = codec.decode(record, True, 9)
    assert codec.encode(out, 9)[0] == record


def test_layouts_of_one_structure_share_one_compiled_code_object():
    recs = [codec.encode({"tokens": np.arange(n, dtype=np.int64), "label": n}, 1)[0] for n in (5, 17, 300)]
    for r in recs:
        for _ in range(4):  # compiled from the third use on
            codec.decode(r, True, 1)
    found = [plans.PLANS[bytes(r[24 : 24 + codec.read_header(r)[2]])] for r in recs]
    assert len({id(p) for p in found}) == 3  # one plan per layout (their own lengths) ...
    assert len({id(p.__code__) for p in found}) == 1  # ... sharing one code object
    for n, r in zip((5, 17, 300), recs):
        out = codec.decode(r, True, 1)
        assert out["label"] == n and np.array_equal(out["tokens"], np.arange(n))
