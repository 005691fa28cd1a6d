"""Pseudo-labels from top-k cache entries: never wrong where written, 255 only where open.

Soundness is checked against the exact rule on full probability vectors built to be consistent
with what a top-k entry stores (the stored classes' float16 probabilities, hidden classes at
most the k-th probability and summing to the leftover mass, a hidden class never tied with a
stored class of higher index). Hidden mass is spread in three ways: evenly, piled up to the
bound class by class (the case that puts hidden classes into sets), and at random.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

from annotate.cache import resize_chw, topk_encode
from calibrate import sets as S
from calibrate import topk as T


def consistent(
    rng: np.random.Generator, k_classes: int, k: int, h: int, w: int
) -> tuple[np.ndarray, T.TopK, np.ndarray]:
    """(float32 (K, h, w) probabilities, their top-k entry, bool (h, w) pixels to compare).

    The stored classes keep the values that were encoded; the hidden mass is then spread
    anew over the hidden classes (evenly, piled up to the k-th probability class by class, or
    at random), which the entry cannot tell apart.
    """
    conc = rng.choice([0.05, 0.3, 1.0, 5.0], size=(h, w))
    p0 = rng.gamma(conc[None], size=(k_classes, h, w)).astype(np.float32) + 1e-12
    p0 /= p0.sum(axis=0, keepdims=True)
    idx, prob16 = topk_encode(p0, k)
    t = T.TopK.from_stored(idx, prob16, k_classes)
    n_hidden = k_classes - k
    stored_p = np.take_along_axis(p0, idx.astype(np.intp), 0)
    full = np.zeros((k_classes, h, w), np.float32)
    np.put_along_axis(full, idx.astype(np.intp), stored_p, axis=0)
    if n_hidden == 0:
        return p0, t, np.ones((h, w), bool)
    rest = np.maximum(1 - stored_p.sum(axis=0, dtype=np.float32), 0)
    u = np.minimum(stored_p[-1], rest)
    style = rng.integers(0, 3, size=(h, w))
    caps = np.where(style == 0, u, np.where(style == 1, rest / n_hidden, u * rng.random((h, w))))
    caps = np.broadcast_to(caps, (n_hidden, h, w))
    v = _fill(rest, caps)
    v += _fill(rest - v.sum(axis=0), u - v)  # what random caps left over, up to u
    v = np.minimum(v, u).astype(np.float32)
    ok = np.abs(v.sum(axis=0, dtype=np.float64) - rest) < 1e-6
    stored = np.zeros((k_classes, h, w), np.int8)
    np.put_along_axis(stored, idx.astype(np.intp), 1, axis=0)
    # per pixel, the classes not stored, in increasing order
    hidden_cls = np.argsort(stored, axis=0, kind="stable")[:n_hidden]
    order = rng.permuted(np.broadcast_to(np.arange(n_hidden)[:, None, None], v.shape), axis=0)
    v = np.take_along_axis(v, order, axis=0)  # random classes get the piles
    # stored classes rank above hidden ones (the encoder keeps the lowest index among ties):
    # a hidden class tied with the k-th stored one must have a higher index
    tie = (v == stored_p[-1]) & (hidden_cls < idx[-1].astype(np.intp))
    v = np.where(tie, np.nextafter(v, np.float32(0.0)), v)
    for r in range(k):  # a tie at 0 cannot be moved: such pixels are not consistent
        ok &= ~((v == stored_p[r]) & (hidden_cls < idx[r].astype(np.intp))).any(axis=0)
    np.put_along_axis(full, hidden_cls, v, axis=0)
    return full, t, ok


def _fill(total: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Pour ``total`` (h, w) into bins with capacities (n, h, w), first bins first."""
    before = np.cumsum(caps, axis=0) - caps
    return np.clip(total[None] - before, 0.0, caps)


def exact_label(p: np.ndarray, q: np.ndarray, score: str, bg: int | None, m: int) -> np.ndarray:
    sets = S.prediction_sets(p, q, score)
    return S.pseudo_label(p, sets, bg, m)


def thresholds(rng: np.random.Generator, t: T.TopK, kind: str) -> np.ndarray:
    """q̂ per class: common values, or 1 − a stored value (a threshold inside a float16 step)."""
    k_classes = t.num_classes
    near = 1 - (t.lo + t.hi).ravel()[rng.integers(0, t.lo.size, size=k_classes)] / 2
    if kind == "pixel":
        return np.full(k_classes, rng.choice([0.3, 0.6, 0.8, 0.9, 0.97, 1.0, near[0]]), np.float32)
    common = rng.choice([0.2, 0.5, 0.8, 0.95, 0.99, 1.0], size=k_classes)
    return np.where(rng.random(k_classes) < 0.3, near, common).astype(np.float32)


CASES = list(
    itertools.product(
        [(4, 1), (4, 2), (5, 2), (10, 2), (10, 4), (21, 4), (3, 2)],
        ["lac", "aps"],
        ["pixel", "class"],
        [None, 0, 2],
        [0, 1, 2],
    )
)


@pytest.mark.parametrize(("kk", "score", "kind", "bg", "m"), CASES)
def test_written_labels_are_exact(
    kk: tuple[int, int], score: str, kind: str, bg: int | None, m: int
) -> None:
    k_classes, k = kk
    rng = np.random.default_rng(zlib.crc32(repr((kk, score, kind, bg, m)).encode()))
    full, t, ok = consistent(rng, k_classes, k, 24, 40)
    for _ in range(3):
        q = thresholds(rng, t, kind)
        got, unsure = T.topk_cp_label(t, q, score, bg, m)
        want = exact_label(full, q, score, bg, m)
        sure = ok & ~unsure
        np.testing.assert_array_equal(got[sure], want[sure])
        assert (got[unsure] == 255).all()
        if kind == "pixel" and m == 0 and (k >= 2 or bg is None):
            # one q̂, no size limit: the top k decide every label (see calibrate.topk), but
            # where a stored probability (APS: a cumulative sum) is within rounding of q̂
            near = _near_threshold(t, q[0], score)
            assert not (unsure & ~near).any(), (q[0], int(unsure.sum()))


def _near_threshold(t: T.TopK, q: float, score: str) -> np.ndarray:
    """bool (H, W): a stored class's score interval contains q̂."""
    if score == "lac":
        s_lo, s_hi = 1 - t.hi, 1 - t.lo
    else:
        s_lo, s_hi = np.cumsum(t.lo, axis=0) - 1e-6, np.cumsum(t.hi, axis=0) + 1e-6
    return ((s_lo <= q + 1e-6) & (s_hi >= q - 1e-6)).any(axis=0)


def test_undetermined_pixels_are_really_open() -> None:
    """Class mode at K = 10, k = 2: every undetermined pixel has two probability vectors
    consistent with its entry that get different labels (one hidden class as high or as low
    as it can be, the others sharing the rest evenly)."""
    rng = np.random.default_rng(1)
    _, t, _ = consistent(rng, 10, 2, 40, 60)
    q = np.array([0.3, 0.6, 0.6, 0.7, 0.6, 0.95, 0.6, 0.6, 0.6, 0.6], np.float32)
    _, unsure = T.topk_cp_label(t, q, "lac", 0, 0)
    assert 0 < unsure.mean() < 1
    mid = (t.lo + t.hi) / 2
    for y, x in np.argwhere(unsure)[:60]:
        stored = t.index[:, y, x].astype(int)
        hidden = [c for c in range(10) if c not in stored]
        rest = 1 - float(mid[:, y, x].sum())
        u = min(float(mid[-1, y, x]), rest)
        labels = set()
        n = len(hidden)
        for pile, value in itertools.product(hidden, (u, max(rest - (n - 1) * u, 0))):
            p = np.zeros(10, np.float32)
            p[stored] = mid[:, y, x]
            p[pile] = value
            p[[c for c in hidden if c != pile]] = (rest - value) / (n - 1)
            labels.add(int(exact_label(p[:, None, None], q, "lac", 0, 0)[0, 0]))
        assert len(labels) > 1, (y, x, labels)


@pytest.mark.parametrize("bg", [None, 0])
@pytest.mark.parametrize("m", [0, 1])
def test_resized_entries(bg: int | None, m: int) -> None:
    """Entries at a lower resolution than the image: bounds blended like the probabilities."""
    rng = np.random.default_rng(7)
    full, t, ok = consistent(rng, 8, 2, 12, 16)
    ok_up = resize_chw(ok[None].astype(np.float32), 30, 37)[0] == 1
    p_up = resize_chw(full, 30, 37)
    lo, hi, stored = T.full_bounds(t)
    share = resize_chw(stored.astype(np.float32), 30, 37)
    b = T.Bounds(resize_chw(lo, 30, 37), resize_chw(hi, 30, 37), share >= 1 - 1e-5, share <= 1e-5)
    for qv in (0.5, 0.8, 0.95):
        q = np.full(8, qv, np.float32)
        got, unsure = T.bounds_cp_label(b, q, "lac", bg, m)
        want = exact_label(p_up, q, "lac", bg, m)
        sure = ok_up & ~unsure
        np.testing.assert_array_equal(got[sure], want[sure])
    label, unsure, low, high = T.bounds_argmax(b)
    sure = ok_up & ~unsure
    np.testing.assert_array_equal(label[sure], S.raw_label(p_up)[sure])
    assert (low <= p_up.max(axis=0) + 1e-6).all() and (high >= p_up.max(axis=0) - 1e-6).all()
    with pytest.raises(Exception, match="score 'aps' cannot be computed exactly"):
        T.bounds_cp_label(b, q, "aps", bg, m)


def test_decide_on_exact_inputs_is_the_plain_rule() -> None:
    """With lower = upper bounds the bounded rule is the rule of calibrate.sets."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(6) * 0.5, size=(30, 40)).astype(np.float32).transpose(2, 0, 1)
    p[:, 0, :6] = p[:, 0, 6:12][::-1]  # exact ties between classes
    for bg, m, qv in itertools.product([None, 0, 3], [0, 1, 2], [0.4, 0.7, 0.9]):
        q = np.full(6, qv, np.float32)
        sets = S.prediction_sets(p, q, "lac")
        n = sets.sum(axis=0)
        cls = np.arange(6).reshape(-1, 1, 1)
        no = np.zeros((6, 1, 1), bool)
        got, unsure = T.decide(p, p, sets, sets, cls, no, no, bg, (n, n), m)
        assert not unsure.any()
        np.testing.assert_array_equal(got, S.pseudo_label(p, sets, bg, m))
