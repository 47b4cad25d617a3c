"""Shared pytest setup: Hypothesis profiles sized for a busy 2-core machine."""

import os
import sys

from hypothesis import HealthCheck, settings

# tests/helpers.py is imported as ``helpers`` (also by spawn/forkserver workers, which
# inherit sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
