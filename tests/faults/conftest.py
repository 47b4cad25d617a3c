"""Fixtures for the fault suite (F01-F24 of shared/faults/RESULTS.md section 4)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _fault_helpers import build


@pytest.fixture
def cache(tmp_path):
    """A closed cache of 100 inline samples (64 float32 each) and 8 overflow ones."""
    path = str(tmp_path / "cache")
    build(path, n=100, size=64)
    return path


@pytest.fixture
def big_cache(tmp_path):
    """A closed cache of 8 samples of 64 KiB each (overflow pages)."""
    path = str(tmp_path / "big")
    build(path, n=8, size=16384)
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts, runuser)")
