"""Fingerprints: what identifies the source that filled a cache.

By default a fingerprint is made of the source's class (module and qualified name), its
length and a hash of its class's source code where Python can read it, plus the user's
``version=`` salt; ``fingerprint=`` replaces all of that with the user's own string. The
parts are stored in the cache, so a mismatch can say which part changed.

A keyed source (``key=``) leaves the length out (appending or removing items keeps the
cache: each record is found by its key) and adds ``"keyed": True``, so a cache filled by
index and one filled by key never share a fingerprint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

__all__ = ["compute_parts", "diff_parts", "digest"]


def _class_source_hash(cls: type) -> str | None:
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def compute_parts(source: Any, version: str | int | None, fingerprint: str | None,
                  keyed: bool = False) -> dict[str, Any]:
    """The parts of ``source``'s fingerprint, as a JSON-able dict (``keyed``: the
    source's records are stored by ``key=``; its length is then no part of it)."""
    if fingerprint is not None:
        return {"fingerprint": str(fingerprint), "keyed": True} if keyed else {"fingerprint": str(fingerprint)}
    cls = type(source)
    parts: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if keyed:
        parts["keyed"] = True
    else:
        try:
            parts["length"] = len(source)
        except TypeError:
            parts["length"] = None
    parts["source_hash"] = _class_source_hash(cls)
    parts["version"] = None if version is None else str(version)
    return parts


def digest(parts: dict[str, Any]) -> str:
    """A stable hex digest of fingerprint parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def diff_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable lines naming each part that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out
