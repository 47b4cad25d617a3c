"""F12: a damaged key makes its sample a miss; the dataset recomputes it; verify notices."""

import struct

import pytest
from _fault_helpers import check_child, patch, record_place, run_child
from test_f11_structural_corruption import READ


def test_f12_changed_key_is_recomputed(cache):
    place = record_place(cache, 42)
    patch(cache, place["key_off"], struct.pack(">Q", 10_000_042))  # same order position? no: an unknown key
    out = check_child(run_child(READ, cache, 100, "1"))
    assert out["other"] == {} and out["wrong"] == [] and out["kv_errors"] == {}, out
    assert out["stats"]["misses"] >= 1


def test_f12_verify_reports_missing_and_unknown(cache):
    maintenance = pytest.importorskip("kvcache.maintenance")
    place = record_place(cache, 99)  # the last key: changing it keeps the tree sorted
    patch(cache, place["key_off"], struct.pack(">Q", 5_000_000))
    rep = maintenance.verify(cache)
    assert not rep.ok
    assert 99 in rep.orphans or 99 in rep.bad or 5_000_000 in rep.orphans, rep
