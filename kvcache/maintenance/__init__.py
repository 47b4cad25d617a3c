"""Maintenance of caches: inspect, verify, compact, build, merge, gc, get, publish.

Every function returns a report dataclass and never prints; ``kvcache.cli`` formats them.
"""

from .build import BuildReport, build
from .compact import CompactReport, compact
from .gc import GcReport, gc
from .get import LeafValue, SampleReport, get_sample
from .inspect import InspectReport, LeafSummary, inspect_cache
from .merge import MergeReport, merge
from .publish import PublishReport, publish
from .spec import load_key, load_spec, module_for_file
from .verify import VerifyReport, verify

__all__ = [
    "BuildReport",
    "CompactReport",
    "GcReport",
    "InspectReport",
    "LeafSummary",
    "LeafValue",
    "MergeReport",
    "PublishReport",
    "SampleReport",
    "VerifyReport",
    "build",
    "compact",
    "gc",
    "get_sample",
    "inspect_cache",
    "load_key",
    "load_spec",
    "module_for_file",
    "merge",
    "publish",
    "verify",
]
