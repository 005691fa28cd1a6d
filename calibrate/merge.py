"""Combining the small results of map-reduce passes (see :mod:`calibrate.runner`).

Its own module, imported by both the runner and the per-image tasks (:mod:`calibrate.tasks`),
so that neither imports the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrate.quantile import Counts


def merge(a: Any, b: Any) -> Any:
    """Combine two pass results: Counts and arrays add, ints add, lists concatenate, dicts merge
    key by key (a key present on one side only is kept). ``None`` is the neutral element."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out.get(k), v)
        return out
    if isinstance(a, list):
        return a + b
    if isinstance(a, Counts | np.ndarray | int | float):
        return a + b
    raise TypeError(f"cannot merge {type(a).__name__}")


def merge_many(*parts: Any) -> Any:
    out = None
    for p in parts:
        out = merge(out, p)
    return out
