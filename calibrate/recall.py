"""Method "recall": per-class thresholds with a certified recall floor for every object class.

Label rule (class-separable foreground preference). For a pixel, let f be its most probable
non-background class and π = p_f (rounded to float16 on top-k caches, as method "risk" does).
With one threshold t_c per non-background class::

    label = f            if π ≥ t_f
            background   else, if the background is the argmax
            255          otherwise

A pixel can take class c only when c is its most probable foreground class, so whether a pixel
of true class c is labeled c depends on t_c alone. The paper's rule with one q̂ is the special
case t_c = 1 − q̂ for every c (on a LAC set the most probable foreground class in the set is f
whenever f is in it). Without a background class (``background`` None), f is the argmax and
a pixel is kept where π ≥ t_f.

Certified quantity, for each non-background class c. Of an image's labeled pixels of class
c, the rule can label c only those whose most probable foreground class is c: call them the
image's *reachable* pixels of c (r_c of them; the others, where the annotator ranks another
object class higher, are lost to every threshold). If tp_c(t) of them get label c, the
image's miss rate is ℓ_c(t) = 1 − tp_c(t) / r_c ∈ [0, 1]: non-increasing as t_c decreases,
and 0 at t_c = 0. Conformal risk control (Angelopoulos et al. 2022) over the N_c labeled
images with r_c > 0: t̂_c = the strictest grid threshold with
(Σ_i ℓ_{i,c}(t) + 1) / (N_c + 1) ≤ ε. Guarantee: if the labeled and the unlabeled images are
exchangeable, E[ℓ_c(t_c)] ≤ ε for a new image with r_c > 0, for any t_c ≤ t̂_c chosen from
the calibration data, in expectation over the calibration images and the new image (CRC's
theorem: ℓ is monotone, bounded by B = 1, and 0 at the most lenient threshold; a smaller t_c
gives a pointwise smaller loss). Because ℓ_c is monotone, no envelope is needed and the
search does not stop at the first confidently wrong pixel: its statistic is the plain mean
loss. Within the certified range, t_c is the threshold with the highest intersection-over-
union of class c on the calibration images (pooled over all their pixels of c): as many
foreground pixels as the floor needs, more where they pay in IoU, none that cost it.

A class is *not certified* when it has too few images: (0 + 1)/(N_c + 1) > ε, i.e.
N_c < 1/ε − 1 (9 images for ε = 0.1, 4 for ε = 0.2), none included. It then gets the
paper's threshold, 1 − q̂ of the pixel-wise conformal step at the run's α (rounded down to
the grid, so it labels c at least where the paper's rule would), without a guarantee: where
the labeled images cannot certify a class, the rule does what the paper's rule does. The
report lists such classes.

Counted in one Dask pass (:func:`calibrate.tasks.labeled_stats`): every labeled image
contributes, per class and grid threshold, its pixel counts and its miss rate in fixed point
(units of 2⁻³², rounded up), so sums are exact integers, identical in any order, and never
below the true sum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from calibrate import risk as R
from calibrate import sets as S
from calibrate import topk as T
from data_manifest.errors import UserError
from data_manifest.manifest import IGNORE_INDEX

GUARANTEE = (
    "for every certified non-background class c: E[miss rate of c on a new image] <= "
    "epsilon, the miss rate being 1 - (pixels of c labeled c) / (pixels of c whose most "
    "probable foreground class is c) over images with such pixels; in expectation over the "
    "calibration images and the new image (conformal risk control per class); assumes "
    "labeled and unlabeled images are exchangeable"
)
_Z_MAX, _Z_STEP = 16.0, 0.1


def class_grid() -> np.ndarray:
    """The per-class thresholds, float32, strictly decreasing from 1 − 1.1e-7 to 0.

    Evenly spaced in logit, logit(t) from 16 down to −16 in steps of 0.1 (dense near both 0
    and 1, where the paper's rule puts its threshold 1 − q̂ when q̂ is near 1), then 0.
    Fixed in advance, never from data.
    """
    n = int(round(2 * _Z_MAX / _Z_STEP)) + 1
    z = np.linspace(_Z_MAX, -_Z_MAX, n)
    t = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return np.ascontiguousarray(np.unique(np.append(t, np.float32(0.0)))[::-1])


def first_kept(conf: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """For each value, the first grid index whose threshold it reaches (len(grid): none).

    Args:
        conf: float32 (n,); grid: float32 (G,) strictly decreasing.
    Returns:
        intp (n,) in [0, G].
    """
    return grid.size - np.searchsorted(grid[::-1], conf, side="right")


def foreground(
    probs: np.ndarray, background: int | None, quantize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most probable foreground class f, its probability π and whether the background is the
    argmax.

    Args:
        probs: float32 (K, H, W).
        background: the background class (None: f is the argmax).
        quantize: round π to float16 (top-k caches store probabilities in float16).
    Returns:
        (f uint8 (H, W), π float32 (H, W), bg_top bool (H, W)).
    """
    if background is None:
        f, pi = S.argmax0(probs)
        bg_top = np.zeros(f.shape, bool)
    else:
        f, pi = S.argmax0(probs, skip=background)
        bg_top = S.argmax0(probs)[0] == background
    if quantize:
        pi = pi.astype(np.float16).astype(np.float32)
    return f, pi, bg_top


def apply(
    f: np.ndarray,
    pi: np.ndarray,
    bg_top: np.ndarray,
    thresholds: np.ndarray,
    background: int | None,
) -> np.ndarray:
    """The rule from (f, π, bg_top) and the thresholds float32 (K,) (values above 1: the class
    is never labeled; the background's entry is unused). uint8 (H, W)."""
    t = np.asarray(thresholds, np.float32)
    claimed = pi >= t[f]
    out = np.where(claimed, f, np.uint8(IGNORE_INDEX))
    if background is not None:
        out = np.where(~claimed & bg_top, np.uint8(background), out)
    return out.astype(np.uint8)


def label(
    probs: np.ndarray, thresholds: np.ndarray, background: int | None, quantize: bool
) -> np.ndarray:
    """The pseudo-label of one image with full probabilities float32 (K, H, W). uint8 (H, W)."""
    f, pi, bg_top = foreground(probs, background, quantize)
    return apply(f, pi, bg_top, thresholds, background)


def top_foreground(x: np.ndarray | T.TopK, background: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The most probable foreground class of every pixel and its probability rounded to
    float16, from probabilities (K, H, W) or from a top-k entry at image resolution (the first
    stored non-background class and its stored value; 255 and −1 where k = 1 and the
    background is on top, so that it is not stored).

    Returns:
        (f uint8 (H, W), π float32 (H, W)).
    """
    if isinstance(x, np.ndarray):
        f, pi, _ = foreground(x, background, True)
        return f, pi
    idx = x.index
    value = ((x.lo + x.hi) / np.float32(2)).astype(np.float16).astype(np.float32)
    if background is None:
        return idx[0].copy(), value[0]
    bg_first = idx[0] == background
    if idx.shape[0] < 2:
        f = np.where(bg_first, np.uint8(IGNORE_INDEX), idx[0]).astype(np.uint8)
        return f, np.where(bg_first, np.float32(-1.0), value[0])
    return np.where(bg_first, idx[1], idx[0]).astype(np.uint8), np.where(
        bg_first, value[1], value[0]
    )


def topk_label(
    x: T.TopK | T.Bounds, thresholds: np.ndarray, background: int | None, quantize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The rule on a top-k entry at image resolution: exact where the stored classes decide.

    The stored classes are the k most probable in the rule's order, so the argmax is the first
    and f is the first stored non-background class (k ≥ 2 always stores one); π is its stored
    float16 value, which is π rounded to float16 (``quantize`` is always on for such caches;
    without it π lies within the value's rounding step, and pixels whose step straddles t_f
    are undetermined). With k = 1 and the background on top, f is not stored: the pixel is
    background when no hidden class can reach its threshold, else undetermined.

    Raises:
        UserError: a top-k entry stored at another resolution than the image's (resized
            entries blend the rankings of several stored pixels).
    Returns:
        (label uint8 (H, W), undetermined bool (H, W)).
    """
    if not isinstance(x, T.TopK):
        raise UserError(
            "method 'recall' needs the ranking of the classes at every pixel, which top-k "
            "cache entries stored at a resolution other than the image's do not give; "
            "expected a cache annotated with resolution = 'image' or topk = 0"
        )
    idx, lo, hi = x.index, x.lo, x.hi
    t_all = np.asarray(thresholds, np.float32)
    bg_first = np.zeros(idx.shape[1:], bool) if background is None else idx[0] == background
    slot = bg_first.astype(np.intp)
    hidden_f = bg_first & (idx.shape[0] < 2)  # k = 1, background on top: f is not stored
    slot[hidden_f] = 0
    f = np.take_along_axis(idx, slot[None], 0)[0]
    p_lo = np.take_along_axis(lo, slot[None], 0)[0]
    p_hi = np.take_along_axis(hi, slot[None], 0)[0]
    if quantize:  # lo, hi = v ∓ half a step (hi clipped at 1): the midpoint rounds to v
        p_lo = p_hi = ((p_lo + p_hi) / np.float32(2)).astype(np.float16).astype(np.float32)
    t = t_all[f]
    sure, maybe = (p_lo >= t) & ~hidden_f, (p_hi >= t) & ~hidden_f
    if hidden_f.any():  # f hidden: claimed only if some hidden class may reach its threshold
        fg = np.ones(t_all.size, bool)
        if background is not None:
            fg[background] = False
        maybe |= hidden_f & (x.hidden_hi >= t_all[fg].min(initial=np.float32(2.0)))
    unsure = maybe & ~sure
    out = np.where(sure, f, np.uint8(IGNORE_INDEX))
    if background is not None:
        out = np.where(~maybe & bg_first, np.uint8(background), out)
    out = np.where(unsure, np.uint8(IGNORE_INDEX), out)
    return out.astype(np.uint8), unsure


def image_stats(
    probs: np.ndarray,
    labels: np.ndarray,
    grid: np.ndarray,
    background: int | None,
    quantize: bool,
) -> dict:
    """One labeled image's contribution to the recall pass (all values add across images).

    Args:
        probs: float32 (K, H, W); labels: uint8 (H, W), 255 = ignore; grid: float32 (G,).
    Returns:
        ``{"images": 1, "present": int64 (K,) 1 where the image has reachable pixels of c,
        "pixels": int64 (K,) n_c, "reachable": int64 (K,) r_c, "tp": int64 (K, G) pixels of
        c labeled c at each threshold, "claimed": int64 (K, G) pixels labeled c at each
        threshold, "loss": int64 (K, G) the miss rate 1 − tp/r in fixed point (0 where
        r_c = 0)}``. The background's entries stay 0.
    """
    f, pi, _ = foreground(probs, background, quantize)
    return stats_from(f, pi, labels, grid, probs.shape[0], background)


def stats_from(
    f: np.ndarray,
    pi: np.ndarray,
    labels: np.ndarray,
    grid: np.ndarray,
    k: int,
    background: int | None,
) -> dict:
    """:func:`image_stats` from an image's most probable foreground class f uint8 (H, W) and
    its probability π float32 (H, W) (as :func:`foreground` or :func:`top_foreground` give
    them; f = 255 where it is unknown: such pixels are neither reachable nor claimed)."""
    g = grid.size
    valid = labels != IGNORE_INDEX
    n = np.bincount(labels[valid], minlength=k)[:k].astype(np.int64)
    valid &= f < k
    y = labels[valid].astype(np.intp)
    fv = f[valid].astype(np.intp)
    j = first_kept(pi[valid], grid)
    hit = fv == y
    r = np.bincount(y[hit], minlength=k).astype(np.int64)
    code = fv * (g + 1) + j
    claimed = np.bincount(code, minlength=k * (g + 1)).reshape(k, g + 1)[:, :g]
    tp = np.bincount(code[hit], minlength=k * (g + 1)).reshape(k, g + 1)[:, :g]
    claimed, tp = np.cumsum(claimed, axis=1), np.cumsum(tp, axis=1)
    if background is not None:
        n[background] = r[background] = 0
        claimed[background] = tp[background] = 0
    loss = R.fixed_ratio(r[:, None] - tp, np.broadcast_to(r[:, None], tp.shape))
    return {
        "images": 1,
        "present": (r > 0).astype(np.int64),
        "pixels": n,
        "reachable": r,
        "tp": tp.astype(np.int64),
        "claimed": claimed.astype(np.int64),
        "loss": loss,
    }


@dataclass(frozen=True)
class ClassSelection:
    """One class's threshold and what certifies it.

    Attributes:
        cls: class name; images: N_c, the calibration images with reachable pixels of it.
        certified: whether its floor is certified at ``tau``.
        bound_index / bound_tau: the strictest certified grid threshold t̂_c (−1 / None when
            infeasible); ``tau`` is at or below it when certified.
        index / tau: the threshold used (−1 / above 1: the class is never labeled).
        statistic: (Σ ℓ + 1)/(N_c + 1) at ``tau`` (≤ ε when certified; None if N_c = 0).
        miss: mean miss rate (of reachable pixels) over the N_c images at ``tau``; recall /
            precision / iou: pooled over the calibration images' pixels of the class at ``tau``
            (None where undefined); reachable: the fraction of its pixels that are reachable.
        note: why the class is not certified.
    """

    cls: str
    images: int
    certified: bool
    bound_index: int
    bound_tau: float | None
    index: int
    tau: float
    statistic: float | None
    miss: float | None
    recall: float | None
    precision: float | None
    iou: float | None
    reachable: float | None
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _ratio(a: float, b: float) -> float | None:
    return round(float(a) / float(b), 6) if b else None


def select(
    stats: dict,
    grid: np.ndarray,
    eps: float,
    classes: list[str],
    background: int | None,
    fallback: float,
) -> list[ClassSelection]:
    """Per non-background class: the certified range and the threshold in it (see the module
    docstring), from the summed :func:`image_stats` of the calibration images. ``fallback``:
    the threshold of a class that cannot be certified (the paper's 1 − q̂), rounded down to
    the grid.

    Returns:
        One :class:`ClassSelection` per class, the background's omitted.
    """
    out = []
    for c, name in enumerate(classes):
        if c == background:
            continue
        n_img = int(stats["present"][c])
        tp, claimed, px = stats["tp"][c], stats["claimed"][c], int(stats["pixels"][c])
        union = px + claimed - tp
        iou = np.where(union > 0, tp / np.maximum(union, 1), 0.0)
        stat = (stats["loss"][c].astype(np.float64) / R.SCALE + 1.0) / (n_img + 1)
        ok = np.flatnonzero(stat <= eps)  # non-increasing along the grid, ≤ ε at t = 0 if any
        if ok.size:
            bound = int(ok[0])
            j = bound + int(np.argmax(iou[bound:]))  # IoU-best within the certified range
            note = ""
        else:
            bound = -1
            j = int(np.flatnonzero(grid <= np.float32(fallback))[0])
            note = (
                f"not certified: N = {n_img} images give at best 1/(N+1) = "
                f"{1 / (n_img + 1):.4g} > ε = {eps}; it takes the paper's threshold 1 − q̂"
            )
        keep = j >= 0
        out.append(
            ClassSelection(
                cls=name,
                images=n_img,
                certified=bound >= 0,
                bound_index=bound,
                bound_tau=float(grid[bound]) if bound >= 0 else None,
                index=j,
                tau=float(grid[j]) if keep else R.KEEP_NOTHING,
                statistic=round(float(stat[j]), 6) if keep and n_img else None,
                miss=round(float(stats["loss"][c][j]) / R.SCALE / n_img, 6)
                if keep and n_img
                else None,
                recall=_ratio(tp[j], px) if keep else None,
                precision=_ratio(tp[j], claimed[j]) if keep else None,
                iou=round(float(iou[j]), 6) if keep and union[j] else None,
                reachable=_ratio(stats["reachable"][c], px),
                note=note,
            )
        )
    return out


def at(stats: dict | None, selection: list[ClassSelection], classes: list[str]) -> dict:
    """Per class, figures of a role's summed :func:`image_stats` at the selected thresholds:
    ``{class: {"images" (with reachable pixels of it), "mean_miss" (the certified quantity's
    estimate), "recall", "precision" (pooled over pixels)}}``; rates are None where
    undefined."""
    if not stats:
        return {}
    out = {}
    for s in selection:
        c, j = classes.index(s.cls), s.index
        n_img, px = int(stats["present"][c]), int(stats["pixels"][c])
        tp = int(stats["tp"][c][j]) if j >= 0 else 0
        claimed = int(stats["claimed"][c][j]) if j >= 0 else 0
        miss = float(stats["loss"][c][j]) / R.SCALE if j >= 0 else float(n_img)
        out[s.cls] = {
            "images": n_img,
            "mean_miss": round(miss / n_img, 6) if n_img else None,
            "recall": _ratio(tp, px),
            "precision": _ratio(tp, claimed),
        }
    return out


def thresholds(selection: list[ClassSelection], classes: list[str]) -> tuple[float, ...]:
    """The rule's thresholds, one per class in class order (the background's: 0, unused)."""
    by_name = {s.cls: s.tau for s in selection}
    return tuple(float(by_name.get(c, 0.0)) for c in classes)
