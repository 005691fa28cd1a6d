"""The exact conformal quantile, computed in two streaming passes of bounded memory.

q̂ is the ⌈(n+1)(1−α)⌉-th smallest of n calibration scores, and 1 when that rank exceeds n.
No step holds all scores: every float32 score is mapped to a 32-bit key whose integer order is
the float order (:func:`sort_keys`); pass 1 counts the keys' high 16 bits per group (a histogram
of at most 65 536 bins), which locates the bin holding the wanted rank; pass 2 counts the low
16 bits of the keys inside that one bin only, which gives the exact key and so the exact float.
Both passes return small sparse count tables (:class:`Counts`) that add up across images in any
order with identical results (integer sums).

A "group" is what a quantile is taken over: group 0 for the pooled pixel-wise quantile, the true
class for the class-conditional one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

_LOW_BITS = 16
_LOW_MASK = np.uint64((1 << _LOW_BITS) - 1)
_DENSE_LIMIT = 1 << 22  # codes below this may be counted with a dense bincount


def conformal_rank(n: int, alpha: float) -> int:
    """⌈(n+1)(1−α)⌉, computed exactly on α's decimal value (no float rounding at integers).

    ``alpha`` is taken as the decimal it prints as (``0.1`` means exactly 1/10), so that, e.g.,
    n = 99 and α = 0.1 give rank 90, not 91 as ``math.ceil(100 * 0.9)`` would.
    """
    a = Fraction(repr(float(alpha)))
    return math.ceil((n + 1) * (1 - a))


def sort_keys(scores: np.ndarray) -> np.ndarray:
    """Map float32 values to uint64 keys (in [0, 2**32)) ordered exactly as the floats are.

    -0.0 is treated as 0.0. NaN must not occur (callers check for it).
    """
    x = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 becomes +0.0
    b = x.view(np.uint32).astype(np.uint64)
    neg = (b >> np.uint64(31)).astype(bool)
    return np.where(neg, np.uint64(0xFFFFFFFF) - b, b | np.uint64(0x80000000))


def keys_to_float(keys: np.ndarray | int) -> np.ndarray:
    """Inverse of :func:`sort_keys`: float32 values from keys."""
    k = np.asarray(keys, dtype=np.uint64)
    pos = (k >> np.uint64(31)).astype(bool)
    b = np.where(pos, k & np.uint64(0x7FFFFFFF), np.uint64(0xFFFFFFFF) - k)
    return b.astype(np.uint32).view(np.float32)


@dataclass(frozen=True)
class Counts:
    """A sparse integer histogram: sorted unique ``codes`` (uint64) and their ``counts`` (int64)."""

    codes: np.ndarray
    counts: np.ndarray

    @staticmethod
    def empty() -> Counts:
        return Counts(np.zeros(0, np.uint64), np.zeros(0, np.int64))

    @staticmethod
    def of(codes: np.ndarray) -> Counts:
        """Count the occurrences of each code in a 1-D uint64 array."""
        if codes.size == 0:
            return Counts.empty()
        top = int(codes.max())
        if top < _DENSE_LIMIT and top < 4 * codes.size + 1024:  # a dense count is cheaper
            dense = np.bincount(codes.astype(np.intp), minlength=top + 1)
            nz = np.flatnonzero(dense)
            return Counts(nz.astype(np.uint64), dense[nz].astype(np.int64))
        u, c = np.unique(codes, return_counts=True)
        return Counts(u.astype(np.uint64), c.astype(np.int64))

    def __add__(self, other: Counts) -> Counts:
        if other.codes.size == 0:
            return self
        if self.codes.size == 0:
            return other
        codes = np.concatenate([self.codes, other.codes])
        counts = np.concatenate([self.counts, other.counts])
        u, inv = np.unique(codes, return_inverse=True)
        return Counts(u, np.bincount(inv, weights=counts, minlength=u.size).astype(np.int64))

    def total(self) -> int:
        return int(self.counts.sum())


def high_counts(keys: np.ndarray, groups: np.ndarray | None = None) -> Counts:
    """Pass 1 for one chunk: counts of (group, high 16 bits of key).

    Args:
        keys: uint64 (n,) from :func:`sort_keys`.
        groups: int (n,) group of each score (None: all in group 0).
    Returns:
        Counts over codes ``group << 16 | key >> 16``.
    """
    code = keys >> np.uint64(_LOW_BITS)
    if groups is not None:
        code = code | (groups.astype(np.uint64) << np.uint64(_LOW_BITS))
    return Counts.of(code)


def group_total(counts: Counts, group: int) -> int:
    """How many scores of ``group`` pass 1 counted."""
    sel = (counts.codes >> np.uint64(_LOW_BITS)) == np.uint64(group)
    return int(counts.counts[sel].sum())


def locate(counts: Counts, group: int, rank: int) -> tuple[int, int] | None:
    """Find the pass-1 bin holding the ``rank``-th smallest score (1-based) of ``group``.

    Returns:
        (bin code ``group << 16 | high bits``, rank inside that bin, 1-based), or None when
        the group has fewer than ``rank`` scores.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    sel = (counts.codes >> np.uint64(_LOW_BITS)) == np.uint64(group)
    codes, c = counts.codes[sel], counts.counts[sel]
    cum = np.cumsum(c)
    if cum.size == 0 or cum[-1] < rank:
        return None
    i = int(np.searchsorted(cum, rank, side="left"))
    before = int(cum[i - 1]) if i > 0 else 0
    return int(codes[i]), rank - before


def low_counts(keys: np.ndarray, groups: np.ndarray | None, targets: np.ndarray) -> Counts:
    """Pass 2 for one chunk: low 16 bits of the keys that fall in one of the target bins.

    Args:
        keys: uint64 (n,); groups: int (n,) or None (group 0).
        targets: sorted unique uint64 bin codes (``group << 16 | high bits``) from :func:`locate`.
    Returns:
        Counts over codes ``target index << 16 | low 16 bits``.
    """
    if targets.size == 0 or keys.size == 0:
        return Counts.empty()
    code = keys >> np.uint64(_LOW_BITS)
    if groups is not None:
        code = code | (groups.astype(np.uint64) << np.uint64(_LOW_BITS))
    pos = np.searchsorted(targets, code)
    pos_c = np.minimum(pos, targets.size - 1)
    hit = targets[pos_c] == code
    if not hit.any():
        return Counts.empty()
    low = keys[hit] & _LOW_MASK
    return Counts.of((pos_c[hit].astype(np.uint64) << np.uint64(_LOW_BITS)) | low)


def finish(low: Counts, targets: np.ndarray, bin_code: int, rank_in_bin: int) -> np.float32:
    """The exact value: the ``rank_in_bin``-th smallest key inside ``bin_code`` (pass 2 counts)."""
    t = int(np.searchsorted(targets, np.uint64(bin_code)))
    sel = (low.codes >> np.uint64(_LOW_BITS)) == np.uint64(t)
    codes, c = low.codes[sel], low.counts[sel]
    cum = np.cumsum(c)
    i = int(np.searchsorted(cum, rank_in_bin, side="left"))
    if i >= cum.size:
        raise RuntimeError("pass 2 found fewer scores in the bin than pass 1 counted")
    high = np.uint64(bin_code) & _LOW_MASK
    key = (high << np.uint64(_LOW_BITS)) | (codes[i] & _LOW_MASK)
    return np.float32(keys_to_float(key))


def exact_quantile(chunks: list[np.ndarray], alpha: float) -> np.float32:
    """The conformal quantile of float32 scores given as chunks, by the two-pass method.

    This is the in-process reference of what the Dask job does across images; it holds one
    chunk at a time plus the two count tables.
    """
    c1 = Counts.empty()
    for ch in chunks:
        c1 = c1 + high_counts(sort_keys(ch))
    n = c1.total()
    loc = locate(c1, 0, conformal_rank(n, alpha)) if n else None
    if loc is None:
        return np.float32(1.0)
    targets = np.array([loc[0]], dtype=np.uint64)
    c2 = Counts.empty()
    for ch in chunks:
        c2 = c2 + low_counts(sort_keys(ch), None, targets)
    return finish(c2, targets, *loc)


def small_quantile(values: np.ndarray, alpha: float) -> np.float32:
    """The conformal quantile of a small in-memory float32 array (e.g. one value per image)."""
    v = np.asarray(values, dtype=np.float32).ravel()
    r = conformal_rank(v.size, alpha)
    if r > v.size:
        return np.float32(1.0)
    return np.float32(np.partition(v, r - 1)[r - 1]) + np.float32(0.0)
