"""F15: a truncated data.mdb is refused at open, from the guard plus a child walk; no SIGBUS."""

import os

import pytest
from _fault_helpers import PSIZE, check_child, run_child, snapshot
from test_f13_meta_corruption import OPEN


@pytest.mark.parametrize("cut", ["8_pages", *(pytest.param(c, marks=pytest.mark.slow) for c in ("half", "2_pages", "1_page"))])
def test_f15_truncated_refused(big_cache, cut):
    p = os.path.join(big_cache, "data.mdb")
    size = os.path.getsize(p)
    new = {"8_pages": size - 8 * PSIZE, "half": size // 2 // PSIZE * PSIZE,
           "2_pages": 2 * PSIZE, "1_page": PSIZE}[cut]
    os.truncate(p, new)
    before = snapshot(big_cache)
    out = check_child(run_child(OPEN, big_cache))  # a SIGBUS here fails with its name
    for name, res in out.items():
        assert res != "opened" and res[0] == "CacheCorruptError", (name, res)
        if cut in ("8_pages", "half"):
            assert "truncated" in res[1], res
    assert snapshot(big_cache) == before
