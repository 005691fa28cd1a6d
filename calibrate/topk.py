"""Pseudo-labels from top-k cache entries: exact where what is stored decides the label.

An unlabeled image may be stored as its k most probable classes per pixel (``topk_index``
uint8 and ``topk_prob`` float16, (k, h, w), most probable first). Reading it back with the
leftover mass spread evenly over the other K − k classes (``Cache.probs``) invents
probabilities; with the foreground preference, class mode or ``max_set_size`` that changes
pseudo-labels. Here nothing is invented. What a top-k entry says about the annotator's float32
probabilities p:

- stored class r: p lies within half a float16 step of the stored value, [lo_r, hi_r];
- the stored classes are the k first in the order (p descending, index ascending) that the
  pseudo-label rule uses for "most probable" (the encoder sorts that way), so every stored class
  ranks above every other ("hidden") class, and the stored order is the true order;
- a hidden class j: 0 ≤ p_j ≤ u = min(hi_k, r_hi) and Σ_hidden p_j = r ∈ [r_lo, r_hi], the
  leftover mass; hence also p_j ≥ r_lo − (K − k − 1)·u.

A pixel's label is written when it is the same for *every* p consistent with that; otherwise the
pixel becomes 255 and is counted as "undetermined" in the report (the run refuses when more than
``topk_undetermined_max`` of the unlabeled pixels are).

When is the label determined? Membership of stored classes is known except within a float16
step of the threshold. The label is the first stored class (in stored order) that may be in the
set, if it surely is: nothing ranked above it can be in the set, and hidden classes rank below.
With one q̂ (pixel and image modes) LAC membership is monotone in p and APS sets are prefixes of
the ranking, so a hidden class can only be in the set when every stored class is; without the
foreground rule the top-1 decides, and with it (the label is the most probable non-background
class of the set) any k ≥ 2 stored classes include one non-background class, so again the top
k decide. What can depend on hidden classes: ``max_set_size`` (how many hidden classes pass:
none when u fails the threshold, at most ⌊r / (1 − q̂)⌋ for LAC), class mode (a hidden class
with a lenient q̂_j can enter the set when no stored class does), k = 1 with the background on
top; and float16 rounding when a stored probability (for APS, a cumulative sum) lies within a
rounding step of the threshold. Those pixels, and only those, are undetermined.

Entries stored at a resolution other than the image's are resized bilinearly by the reader;
each output pixel is then a convex combination of up to four stored pixels with different top
k. Their bounds are the same combination of the stored pixels' bounds (for every class at once,
(K, H, W)), compared by value, which handles LAC, raw and threshold labels; APS scores of such
pixels depend on a ranking that is not known, and that combination is refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotate.cache import Cache, resize_chw
from data_manifest.errors import UserError
from data_manifest.manifest import IGNORE_INDEX

# float32 sums of a few probabilities are exact to a few ulps of 1; bounds widen by this much
SLACK = np.float32(1e-6)
_F32_HALF_ULP_1 = 2.0**-24  # |fl(1 − p) − (1 − p)| ≤ this for p in [0, 1]
_AGG = 256  # class key of a slot that stands for several hidden classes
_NONE = 999


@dataclass(frozen=True)
class TopK:
    """A top-k entry at image resolution.

    Attributes:
        index: uint8 (k, H, W), the stored classes, most probable first.
        lo, hi: float32 (k, H, W), bounds of their probabilities (float16 value ± half step).
        num_classes: K.
        rest_lo, rest_hi: float32 (H, W), bounds of the hidden classes' total mass.
        hidden_lo, hidden_hi: float32 (H, W), bounds of any one hidden class's probability.
    """

    index: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    num_classes: int
    rest_lo: np.ndarray
    rest_hi: np.ndarray
    hidden_lo: np.ndarray
    hidden_hi: np.ndarray

    @staticmethod
    def from_stored(index: np.ndarray, prob16: np.ndarray, num_classes: int) -> TopK:
        """From the stored arrays: uint8 (k, H, W) and float16 (k, H, W), values in [0, 1]."""
        lo_table, hi_table = _rounding_tables()
        bits = np.ascontiguousarray(prob16, dtype=np.float16).view(np.uint16)
        lo, hi = np.take(lo_table, bits), np.take(hi_table, bits)
        one = np.float32(1.0)
        rest_lo = np.maximum(one - hi.sum(axis=0, dtype=np.float32) - SLACK, np.float32(0.0))
        rest_hi = np.maximum(one - lo.sum(axis=0, dtype=np.float32) + SLACK, np.float32(0.0))
        n_hidden = num_classes - index.shape[0]
        if n_hidden <= 0:
            h_lo = h_hi = np.zeros_like(rest_lo)
        else:
            h_hi = np.minimum(hi[-1], rest_hi)
            # rounding can leave more mass than the hidden classes could hold: cap at h_hi
            h_lo = np.minimum(np.maximum(rest_lo - np.float32(n_hidden - 1) * h_hi, 0), h_hi)
        return TopK(index, lo, hi, num_classes, rest_lo, rest_hi, h_lo, h_hi)


@functools.cache
def _rounding_tables() -> tuple[np.ndarray, np.ndarray]:
    """float32 (65536,) lower and upper ends of the values that round to each float16 bit
    pattern, v ∓ half its step, clipped to [0, 1] (a table lookup is faster than converting
    float16 arrays and computing steps)."""
    v16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    v = v16.astype(np.float32)
    # half the step at v: 2^(e − 26) for exponent field e, 2^-25 for subnormals
    e = (v16.view(np.uint16) >> np.uint16(10)) & np.uint16(0x1F)
    half = ((np.maximum(e, 1).astype(np.uint32) + np.uint32(101)) << np.uint32(23)).view(np.float32)
    with np.errstate(invalid="ignore"):
        lo = np.clip(v - half, 0, 1).astype(np.float32)
        hi = np.clip(v + half, 0, 1).astype(np.float32)
    return lo, hi


@dataclass(frozen=True)
class Bounds:
    """Bounds of every class's probability, float32 (K, H, W) each, and which classes are
    stored (``top``) or hidden (``low``) at every stored pixel an output pixel blends: bool
    (K, H, W). A ``top`` class ranks above a ``low`` one whatever the values."""

    lo: np.ndarray
    hi: np.ndarray
    top: np.ndarray
    low: np.ndarray


def read_unlabeled(cache: Cache, image_id: str) -> np.ndarray | TopK | Bounds:
    """One unlabeled image: float32 (K, H, W) probabilities for full entries, :class:`TopK`
    for top-k entries at image resolution, :class:`Bounds` for resized top-k entries."""
    info = cache.info(image_id)
    if info["mode"] != "topk":
        return cache.probs(image_id)
    data = cache.stored(image_id)
    index, prob16 = data["topk_index"], data["topk_prob"]
    if not np.isfinite(prob16).all():
        raise UserError(
            f"{cache.path}: image {image_id!r} has non-finite scores; expected finite "
            "annotator outputs (re-annotate this image)"
        )
    k_classes = cache.num_classes
    if int(index.max(initial=0)) >= k_classes:
        raise UserError(
            f"{cache.path}: image {image_id!r} has a top-k class index "
            f"{int(index.max())}; expected indices below {k_classes}"
        )
    t = TopK.from_stored(index, prob16, k_classes)
    h, w = int(info["height"]), int(info["width"])
    if index.shape[1:] == (h, w):
        return t
    lo, hi, stored = full_bounds(t)
    share = resize_chw(stored.astype(np.float32), h, w)
    tol = np.float32(1e-5)
    return Bounds(resize_chw(lo, h, w), resize_chw(hi, h, w), share >= 1 - tol, share <= tol)


def full_bounds(t: TopK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (K, h, w) lower and upper bounds of every class, and bool (K, h, w) stored."""
    k_classes = t.num_classes
    lo_h, u = t.hidden_lo, t.hidden_hi
    lo = np.broadcast_to(lo_h, (k_classes, *u.shape)).copy()
    hi = np.broadcast_to(u, (k_classes, *u.shape)).copy()
    stored = np.zeros((k_classes, *u.shape), bool)
    idx = t.index.astype(np.intp)
    np.put_along_axis(lo, idx, t.lo, axis=0)
    np.put_along_axis(hi, idx, t.hi, axis=0)
    np.put_along_axis(stored, idx, True, axis=0)
    return lo, hi, stored


def _first(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int (H, W) first index along axis 0 where ``mask`` is True, bool (H, W) any)."""
    k = mask.shape[0]
    w = np.arange(255, 255 - k, -1, dtype=np.uint8).reshape(k, 1, 1)
    top = np.multiply(mask, w, dtype=np.uint8).max(axis=0)
    return np.where(top > 0, 255 - top.astype(np.intp), 0), top > 0


def _pick(rank: np.ndarray, a: np.ndarray) -> np.ndarray:
    """a[rank[y, x], y, x] for a (k, H, W) array and int (H, W) ranks."""
    return np.take_along_axis(a, rank[None], 0)[0]


def _membership(t: TopK, q: np.ndarray, qs: np.ndarray, score: str) -> tuple[np.ndarray, ...]:
    """Set membership of stored classes (surely, possibly: bool (k, H, W)) and, for hidden
    classes, the thresholds x_def, x_pos (float32 (H, W)): hidden class j is surely in the set
    when q̂_j ≥ x_def and possibly when q̂_j ≥ x_pos."""
    one = np.float32(1.0)
    if score == "lac":
        return one - t.lo <= qs, one - t.hi <= qs, one - t.hidden_lo, one - t.hidden_hi
    if score == "aps":
        cum_lo = np.clip(np.cumsum(t.lo, axis=0, dtype=np.float32), 0, 1) - SLACK
        cum_hi = np.clip(np.cumsum(t.hi, axis=0, dtype=np.float32), 0, 1) + SLACK
        x_def = np.minimum(cum_hi[-1] + t.rest_hi, one)
        sure, maybe = cum_hi <= qs, cum_lo <= qs
        sure[0] = maybe[0] = True  # the argmax scores 0: always in the set (calibrate.sets)
        return sure, maybe, x_def, cum_lo[-1]
    raise ValueError(f"unknown score {score!r}")


def _hidden_counter(t: TopK, q: np.ndarray, qs: np.ndarray) -> Any:
    """A function x (float32 (H, W)) → int (H, W): how many hidden classes have q̂_j ≥ x."""
    n_hidden = t.num_classes - t.index.shape[0]
    if n_hidden <= 0:
        return lambda x: np.zeros(x.shape, np.intp)
    if q.min() == q.max():  # one q̂: every class passes or none
        return lambda x: np.where(q[0] >= x, n_hidden, 0)
    sorted_q = np.sort(q)
    return lambda x: (
        sorted_q.size - np.searchsorted(sorted_q, x, side="left") - (qs >= x).sum(axis=0)
    )


def topk_cp_label(
    t: TopK, qhat: np.ndarray, score: str, background: int | None, max_set_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """CP pseudo-label of a top-k entry at image resolution (see the module docstring).

    Args:
        qhat: float32 (K,) threshold per class.
    Returns:
        (label uint8 (H, W), undetermined bool (H, W)).
    """
    q = np.asarray(qhat, dtype=np.float32)
    k, k_classes = t.index.shape[0], t.num_classes
    n_hidden = k_classes - k
    qs = q[0] if q.min() == q.max() else np.take(q, t.index)
    s_in, s_maybe, x_def, x_pos = _membership(t, q, qs, score)
    hidden_in = _hidden_counter(t, q, qs)
    h_def, h_pos = hidden_in(x_def), hidden_in(x_pos)
    bg_def = bg_pos = np.zeros(x_def.shape, bool)
    elig = np.ones(t.index.shape, bool)
    if background is not None:
        elig = t.index != background
        bg_hidden = elig.all(axis=0) & (n_hidden > 0)
        bg_def, bg_pos = bg_hidden & (q[background] >= x_def), bg_hidden & (q[background] >= x_pos)
    # the first stored class (stored order = true order) that may be in the set and is eligible
    first, found = _first(s_maybe & elig)
    first_in, label = _pick(first, s_in), _pick(first, t.index)
    label = np.where(found & first_in, label, np.uint8(IGNORE_INDEX))
    unsure = found & ~first_in
    # no stored eligible class may be in the set: an eligible hidden one may, else background
    hidden_maybe = (h_pos - bg_pos) > 0
    unsure |= ~found & hidden_maybe
    if background is not None:
        is_bg = ~elig
        bg_in = (s_in & is_bg).any(axis=0) | bg_def
        bg_maybe = (s_maybe & is_bg).any(axis=0) | bg_pos
        only_bg = ~found & ~hidden_maybe
        label = np.where(only_bg & bg_in, np.uint8(background), label)
        unsure |= only_bg & bg_maybe & ~bg_in
    if max_set_size > 0:
        sizes = _set_size_range(t, q, score, n_hidden, s_in, s_maybe, h_def, h_pos)
        label, unsure = _cap_set_size(label, unsure, sizes, max_set_size)
    return np.where(unsure, np.uint8(IGNORE_INDEX), label).astype(np.uint8), unsure


def topk_informative_label(
    t: TopK,
    qhat: np.ndarray,
    score: str,
    background: int | None,
    max_set_size: int,
    informative: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The class-mode rule of :func:`calibrate.sets.pseudo_label` (``informative`` given) on a
    top-k entry at image resolution: the argmax if it is in its set, else 255, except that
    background sharing the set with an informative foreground class gives the most probable
    such class. Stored classes are in true order and rank above hidden ones, so the first
    stored informative foreground class that may be in the set decides when it surely is.

    Returns:
        (label uint8 (H, W), undetermined bool (H, W)).
    """
    q = np.asarray(qhat, dtype=np.float32)
    n_hidden = t.num_classes - t.index.shape[0]
    qs = q[0] if q.min() == q.max() else np.take(q, t.index)
    s_in, s_maybe, x_def, x_pos = _membership(t, q, qs, score)
    label = np.where(s_in[0], t.index[0], np.uint8(IGNORE_INDEX))
    unsure = s_maybe[0] & ~s_in[0]
    if background is not None:
        inf = np.asarray(informative, bool).copy()
        inf[background] = False
        first, found = _first(s_maybe & np.take(inf, t.index))
        first_in, cand = _pick(first, s_in), _pick(first, t.index)
        hid_maybe = np.zeros(label.shape, bool)
        for j in np.flatnonzero(inf):  # hidden informative foreground classes that may enter
            hid_maybe |= ~(t.index == j).any(axis=0) & (q[j] >= x_pos)
        sw_unsure = (found & ~first_in) | (~found & hid_maybe)
        none = ~found & ~hid_maybe
        is_bg = t.index == background
        bg_stored = is_bg.any(axis=0)
        bg_in = np.where(bg_stored, (s_in & is_bg).any(axis=0), q[background] >= x_def)
        bg_maybe = np.where(bg_stored, (s_maybe & is_bg).any(axis=0), q[background] >= x_pos)
        switch = bg_in & found & first_in
        label = np.where(switch, cand, label)
        unsure = np.where(switch, False, unsure | (bg_maybe & ~none) | (bg_in & sw_unsure))
    if max_set_size > 0:
        h_def, h_pos = (_hidden_counter(t, q, qs)(x) for x in (x_def, x_pos))
        sizes = _set_size_range(t, q, score, n_hidden, s_in, s_maybe, h_def, h_pos)
        label, unsure = _cap_set_size(label, unsure, sizes, max_set_size)
    return np.where(unsure, np.uint8(IGNORE_INDEX), label).astype(np.uint8), unsure


def _set_size_range(
    t: TopK,
    q: np.ndarray,
    score: str,
    n_hidden: int,
    s_in: np.ndarray,
    s_maybe: np.ndarray,
    h_def: np.ndarray,
    h_pos: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) possible set size per pixel, int (H, W): the stored classes surely
    (``s_in``) or possibly (``s_maybe``) in the set, plus the hidden classes that surely
    (``h_def``) or possibly (``h_pos``) enter, bounded by what the leftover mass allows."""
    h_min = np.maximum(h_def, _hidden_floor(t, q, score, n_hidden))
    cap = _hidden_cap(t, q, score, n_hidden)
    size_min = s_in.sum(axis=0) + h_min
    size_max = s_maybe.sum(axis=0) + np.maximum(h_min, np.minimum(h_pos, cap))
    return size_min, size_max


def _cap_set_size(
    label: np.ndarray,
    unsure: np.ndarray,
    sizes: tuple[np.ndarray, np.ndarray],
    max_set_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``max_set_size`` on (label, undetermined): a set surely larger is dropped (255, not
    undetermined); one that may be larger is undetermined."""
    size_min, size_max = sizes
    drop = size_min > max_set_size
    unsure = (unsure | (size_max > max_set_size)) & ~drop
    return np.where(drop, np.uint8(IGNORE_INDEX), label), unsure


def _hidden_cap(t: TopK, q: np.ndarray, score: str, n_hidden: int) -> np.ndarray:
    """int (H, W): at most how many hidden classes can be in the set, from their total mass.

    LAC: each needs p_j ≥ 1 − q̂_j ≥ 1 − max q̂, and together they hold r. APS: the hidden class
    ranked i-th among the hidden has a score ≥ Σ stored + i·r / (K − k) (the i largest of K − k
    numbers summing to r hold at least i/(K − k) of it), which must be ≤ max q̂.
    """
    q_max = float(q.max())
    r_lo, r_hi = t.rest_lo.astype(np.float64), t.rest_hi.astype(np.float64)
    if score == "lac":
        need = 1.0 - q_max - 2 * _F32_HALF_ULP_1
        if need <= 0:
            return np.full(r_lo.shape, n_hidden, np.intp)
        cap = np.floor(r_hi / need)
    else:
        cum_lo = t.lo.sum(axis=0, dtype=np.float64) - float(SLACK)
        room = q_max - cum_lo
        with np.errstate(divide="ignore", invalid="ignore"):
            cap = np.where(r_lo > 0, np.floor(room * n_hidden / r_lo), n_hidden)
        cap = np.where(room < 0, 0, cap)
    return np.clip(cap, 0, n_hidden).astype(np.intp)


def _hidden_floor(t: TopK, q: np.ndarray, score: str, n_hidden: int) -> np.ndarray:
    """int (H, W): at least how many hidden classes are in the set, from their total mass.

    LAC: a class with p_j ≥ T = 1 − min q̂ is in the set; the x hidden classes above T hold at
    most x·u and the others less than T each, so x ≥ (r − (K − k)·T) / (u − T). APS: the
    hidden class ranked i-th among the hidden has a score ≤ Σ stored + min(i·u, r), so the
    first ⌊(min q̂ − Σ stored) / u⌋ of them are in the set (all when Σ stored + r ≤ min q̂).
    """
    if n_hidden == 0:
        return np.zeros(t.index.shape[1:], np.intp)
    q_min = float(q.min())
    r_lo, r_hi = t.rest_lo.astype(np.float64), t.rest_hi.astype(np.float64)
    u = t.hidden_hi.astype(np.float64)
    if score == "lac":
        need = 1.0 - q_min + 2 * _F32_HALF_ULP_1
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(u > need, np.ceil((r_lo - n_hidden * need) / (u - need)), 0)
    else:
        top = t.hi.sum(axis=0, dtype=np.float64) + float(SLACK)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(u > 0, np.floor((q_min - top) / u), 0)
        x = np.where(top + r_hi <= q_min, n_hidden, x)
    return np.clip(np.nan_to_num(x), 0, n_hidden).astype(np.intp)


def topk_threshold_label(t: TopK, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """The confidence-threshold label (top-1 where max p ≥ τ) of a top-k entry.

    Returns:
        (label uint8 (H, W), undetermined bool (H, W): τ strictly inside the top-1's rounding
        step; a τ matched to CP's kept pixels is a step boundary, so none are).
    """
    tau32 = np.float32(tau)
    unsure = (t.lo[0] < tau32) & (tau32 < t.hi[0])
    keep = t.lo[0] >= tau32
    return np.where(keep, t.index[0], np.uint8(IGNORE_INDEX)).astype(np.uint8), unsure


# -- resized entries: bounds of every class, compared by value ------------------------------------
def decide(
    lo: np.ndarray,
    hi: np.ndarray,
    din: np.ndarray,
    pin: np.ndarray,
    cls: np.ndarray,
    top: np.ndarray,
    low: np.ndarray,
    background: int | None,
    size: tuple[np.ndarray, np.ndarray] | None,
    max_set_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo-label rule of :func:`calibrate.sets.pseudo_label` on bounded probabilities.

    Args:
        lo, hi: float32 (S, H, W) bounds of each slot's probability (a slot is a class).
        din, pin: bool (S, H, W): the slot is in the prediction set for sure / possibly.
        cls: int, broadcastable to (S, H, W): the slot's class.
        top, low: bool, broadcastable to (S, H, W): a ``top`` slot ranks above every ``low``
            slot whatever their bounds.
        background: class of the foreground preference, None when the rule is off.
        size: (min, max) int (H, W) of the set size; used when ``max_set_size`` > 0.
    Returns:
        (label uint8 (H, W), undetermined bool (H, W)); undetermined pixels are 255 in label.
    """
    shape = lo.shape
    cls = np.broadcast_to(cls, shape)
    elig = np.ones(shape, bool) if background is None else cls != background
    cand = din & elig
    best = np.where(cand, lo, np.float32(-1.0)).max(axis=0)
    has = best >= 0
    ckey = np.where(cand & (lo == best), cls, _NONE).min(axis=0)
    cslot = cls == ckey
    c_top = (cslot & np.broadcast_to(top, shape)).any(axis=0)
    # a slot threatens the candidate if it may be in the set, may be more probable, and is not
    # known to rank below it
    threat = pin & elig & ~cslot & ~(np.broadcast_to(low, shape) & c_top)
    beats = (hi > best) | ((hi == best) & (cls < ckey))
    win = has & ~(threat & beats).any(axis=0)
    label = np.where(win, ckey, IGNORE_INDEX).astype(np.uint8)
    unsure = has & ~win
    maybe_elig = (pin & elig).any(axis=0)
    unsure |= ~has & maybe_elig
    if background is not None:
        is_bg = cls == background
        bg_in, bg_maybe = (din & is_bg).any(axis=0), (pin & is_bg).any(axis=0)
        only_bg = ~has & ~maybe_elig
        label = np.where(only_bg & bg_in, np.uint8(background), label)
        unsure |= only_bg & bg_maybe & ~bg_in
    if max_set_size > 0 and size is not None:
        drop = size[0] > max_set_size
        unsure = (unsure | (size[1] > max_set_size)) & ~drop
        label = np.where(drop, np.uint8(IGNORE_INDEX), label)
    return np.where(unsure, np.uint8(IGNORE_INDEX), label), unsure


def bounds_cp_label(
    b: Bounds, qhat: np.ndarray, score: str, background: int | None, max_set_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """CP pseudo-label from per-class bounds (resized top-k entries; LAC only).

    Returns:
        (label uint8 (H, W), undetermined bool (H, W)).
    """
    if score != "lac":
        raise UserError(
            "score 'aps' cannot be computed exactly on top-k cache entries stored at a "
            "resolution other than the image's; expected score 'lac', or a cache annotated "
            "with resolution = 'image' or topk = 0"
        )
    q = np.asarray(qhat, dtype=np.float32).reshape(-1, 1, 1)
    one = np.float32(1.0)
    din, pin = one - b.lo <= q, one - b.hi <= q
    size = None
    if max_set_size > 0:
        n_din = din.sum(axis=0)
        extra = pin & ~din
        # classes beyond the sure ones need p_j ≥ 1 − max q̂ each, out of what the others leave
        budget = 1.0 - b.lo.sum(axis=0, dtype=np.float64)
        budget += np.where(extra, b.lo, 0).sum(axis=0, dtype=np.float64) + float(SLACK)
        need = 1.0 - float(q.max()) - 2 * _F32_HALF_ULP_1
        n_extra = extra.sum(axis=0)
        cap = n_extra if need <= 0 else np.minimum(n_extra, np.floor(budget / need).astype(int))
        size = (n_din, n_din + cap)
    cls = np.arange(b.lo.shape[0]).reshape(-1, 1, 1)
    return decide(b.lo, b.hi, din, pin, cls, b.top, b.low, background, size, max_set_size)


def bounds_argmax(b: Bounds) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The annotator's argmax from per-class bounds.

    Returns:
        (label uint8 (H, W), undetermined bool (H, W), lower float32 (H, W) and upper
        float32 (H, W) bounds of the maximum probability).
    """
    every = np.ones(b.lo.shape, bool)
    cls = np.arange(b.lo.shape[0]).reshape(-1, 1, 1)
    label, unsure = decide(b.lo, b.hi, every, every, cls, b.top, b.low, None, None, 0)
    return label, unsure, b.lo.max(axis=0), b.hi.max(axis=0)
