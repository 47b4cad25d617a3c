"""``get_sample``: one cached sample's structure, and its arrays as plain ``.npy`` files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..view import CacheView
from ._common import check_cache

__all__ = ["LeafValue", "SampleReport", "get_sample"]


@dataclass(frozen=True)
class LeafValue:
    path: str  # sample[0]['image']
    kind: str  # tensor, ndarray, int, str, ...
    dtype: str | None = None
    shape: list[int] | None = None
    value: Any = None  # scalars and short strings; None for arrays
    file: str | None = None  # the .npy file written for this leaf (with ``out``)


@dataclass
class SampleReport:
    path: str
    index: int | None  # None when read by key
    structure: str  # e.g. "tuple(tensor, int)"
    leaves: list[LeafValue] = field(default_factory=list)
    key: str | bytes | None = None  # the key it was read by (a keyed cache)


def get_sample(path: str | os.PathLike, index: int | None = None, out: str | os.PathLike | None = None,
               *, key: str | bytes | None = None) -> SampleReport:
    """Read sample ``index`` of the cache, or the sample stored under ``key`` in a keyed
    cache (checksum verified), and describe it.

    Args:
        out: a directory; each array or tensor leaf is written there as a ``.npy`` file
            named after its place in the sample (``sample_0_image.npy``), readable with
            ``np.load`` alone. bfloat16 tensors are written as float32 (numpy has no
            bfloat16).

    Raises:
        NotACacheError, MissingSampleError, CorruptRecordError; KeyedCacheError: an index
        of a keyed cache (read it by key), or a key of an index-keyed one; ValueError:
        both or neither of ``index`` and ``key``.
    """
    if (index is None) == (key is None):
        raise ValueError("give an index or a key (key= for a keyed cache), not both or neither")
    path = check_cache(path)
    with CacheView(path) as view:
        sample = view[index] if key is None else view.by_key(key)
    rep = SampleReport(path=path, index=index, structure=_structure(sample), key=key)
    if out is not None:
        os.makedirs(out, exist_ok=True)
    _walk(sample, "sample", rep.leaves, None if out is None else os.fspath(out))
    return rep


def _structure(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}({', '.join(_structure(v) for v in x)})"
    if isinstance(x, dict):
        return "dict(" + ", ".join(f"{k}: {_structure(v)}" for k, v in x.items()) + ")"
    return _kind(x)


def _kind(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "ndarray"
    if isinstance(x, np.generic):
        return "npscalar"
    if type(x).__module__.startswith("torch"):
        return "tensor"
    return type(x).__name__


def _fname(where: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", where).strip("_") + ".npy"


def _walk(x: Any, where: str, leaves: list[LeafValue], out: str | None) -> None:
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            _walk(v, f"{where}[{i}]", leaves, out)
        return
    if isinstance(x, dict):
        for k, v in x.items():
            _walk(v, f"{where}[{k!r}]", leaves, out)
        return
    kind = _kind(x)
    if kind in ("ndarray", "tensor"):
        if kind == "tensor":
            dtype = str(x.dtype).removeprefix("torch.")
            t = x.detach().cpu()
            arr = (t.float() if dtype == "bfloat16" else t).numpy()
        else:
            arr, dtype = x, str(x.dtype)
        file = None
        if out is not None:
            file = os.path.join(out, _fname(where))
            np.save(file, arr, allow_pickle=False)
        leaves.append(LeafValue(where, kind, dtype, list(arr.shape), None, file))
        return
    if isinstance(x, np.generic):
        leaves.append(LeafValue(where, kind, str(x.dtype), None, x.item()))
        return
    value = x
    if isinstance(x, (str, bytes)) and len(x) > 80:
        value = x[:77] + (b"..." if isinstance(x, bytes) else "...")
    if isinstance(value, bytes):
        value = repr(value)
    leaves.append(LeafValue(where, kind, None, None, value))
