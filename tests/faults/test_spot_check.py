"""spot_check: a source whose output changed while its code did not is caught and repaired."""

import random

import pytest
from _fault_helpers import DriftingSource

import kvcache
from kvcache.integrity import spot_check


def test_spot_check_finds_and_repairs_drift(tmp_path):
    cfg = tmp_path / "offset.txt"
    cfg.write_text("0")
    path = tmp_path / "c"
    with kvcache.LmdbCachedDataset(DriftingSource(50, str(cfg)), path) as ds:
        ds.build()
        assert spot_check(ds, 20, random.Random(0)).mismatched == []
    cfg.write_text("5")  # new data on disk, same code: the fingerprint cannot see it
    with pytest.warns(RuntimeWarning, match="spot check found 10 of 10"):
        ds = kvcache.LmdbCachedDataset(DriftingSource(50, str(cfg)), path, spot_check=10)
    rep = ds.spot_check_report
    assert rep.checked == 10 and len(rep.mismatched) == 10 and rep.repaired == 10
    for i in rep.mismatched:
        assert float(ds[i][0][0]) == pytest.approx(float(DriftingSource(50, str(cfg))[i][0][0]))
    assert ds.stats().hits == 10  # the replaced records are served
    ds.close()
