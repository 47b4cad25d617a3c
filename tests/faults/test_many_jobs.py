"""Many jobs on one cache: independent training jobs (each with 2 DataLoader fork workers)
fill one local cache lazily at once; one is SIGKILLed with its workers mid-epoch while
`kvcache inspect`, `verify` and `gc` (the installed command) run in loops beside them.

Every sample every surviving job read is right, every index committed when the job was
killed is still there, the cache ends holding every index with the right sample,
`kvcache verify` is clean, and nothing hangs (each process has a deadline). The driver is
tools/many_jobs.py, which also prints the figures in docs/reliability.md.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))

import many_jobs  # noqa: E402


@pytest.mark.slow
def test_many_jobs_one_killed_tools_beside(tmp_path):
    res = many_jobs.run(str(tmp_path / "c"), jobs=4, n=1500, epochs=2, cost_ms=2.0, deadline_s=900)
    assert res["wrong"] == [], res
    assert res["served"] == res["expected_served"], res
    assert res["cached_at_kill"] > 0 and res["lost_after_kill"] == [], res
    assert res["final_keys"] == 1500 and res["final_bad"] == [], res
    assert res["verify_rc"] == 0 and res["hung"] == [], res
    assert all(sum(1 for _ in v) for v in [res["tool_rcs"]["inspect"], res["tool_rcs"]["gc"]]), res
    assert all(rc == 0 for rcs in res["tool_rcs"].values() for rc in rcs), res
    assert many_jobs.ok(res)
