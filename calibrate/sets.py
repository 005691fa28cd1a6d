"""Nonconformity scores, prediction sets and the pseudo-label rule, for one image at a time.

Scores are float32 in [0, 1]; a class j is in the prediction set of a pixel when its score is at
most the class's threshold q̂_j. The calibration score of a labeled pixel is the score of its
true class, computed by the very same function, so "the true class is in the set" and
"the calibration score is ≤ q̂" are the same event.

- LAC: s_j = 1 − p_j.
- APS: s_j = the total probability of the classes ranked at or above j when the classes are
  sorted by decreasing probability (ties broken by class index); the non-randomised APS score.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from data_manifest.manifest import IGNORE_INDEX

Score = Literal["lac", "aps"]
SCORES = ("lac", "aps")


def class_scores(probs: np.ndarray, score: Score) -> np.ndarray:
    """Scores of every class at every pixel.

    Args:
        probs: float32 (K, H, W) probabilities.
    Returns:
        float32 (K, H, W) in [0, 1].
    """
    p = np.asarray(probs, dtype=np.float32)
    if score == "lac":
        s = np.float32(1.0) - p
    elif score == "aps":
        order = np.argsort(-p, axis=0, kind="stable")
        cum = np.cumsum(np.take_along_axis(p, order, axis=0), axis=0, dtype=np.float32)
        s = np.empty_like(p)
        np.put_along_axis(s, order, cum, axis=0)
    else:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    return np.clip(s, np.float32(0.0), np.float32(1.0)) + np.float32(0.0)


def true_class_scores(probs: np.ndarray, labels: np.ndarray, score: Score) -> np.ndarray:
    """Calibration scores of the labeled pixels.

    Args:
        probs: float32 (K, H, W); labels: uint8 (H, W), 255 = ignore.
    Returns:
        (scores float32 (n,), classes int64 (n,)) for the n pixels whose label is not 255,
        in row-major pixel order.
    """
    valid = labels != IGNORE_INDEX
    yy = np.where(valid, labels, 0).astype(np.intp)[None]
    if score == "lac":
        p_y = np.take_along_axis(np.asarray(probs, dtype=np.float32), yy, 0)[0][valid]
        s = np.clip(np.float32(1.0) - p_y, np.float32(0.0), np.float32(1.0)) + np.float32(0.0)
    else:
        s = np.take_along_axis(class_scores(probs, score), yy, 0)[0][valid]
    return s.astype(np.float32, copy=False), labels[valid].astype(np.int64)


def prediction_sets(probs: np.ndarray, qhat: np.ndarray, score: Score) -> np.ndarray:
    """bool (K, H, W): class j is in the set of a pixel when its score is ≤ qhat[j].

    Args:
        probs: float32 (K, H, W); qhat: float32 (K,) threshold per class.
    """
    q = np.asarray(qhat, dtype=np.float32).reshape(-1, 1, 1)
    if score == "lac":  # the same test as class_scores(...) <= q without the clip: q ∈ [0, 1]
        return np.float32(1.0) - np.asarray(probs, dtype=np.float32) <= q
    return class_scores(probs, score) <= q


def argmax0(
    a: np.ndarray, mask: np.ndarray | None = None, skip: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Index and value of the maximum over axis 0, the lowest index winning ties.

    Vectorised over classes and pixels without ``a.argmax(axis=0)``, whose reduction runs
    across the slow axis of a (K, H, W) array: a max-reduction over axis 0 (contiguous rows),
    then the first class that reaches it, found as a max-reduction of uint8 weights 255 − k.
    Large arrays go in blocks of rows small enough to stay in the CPU cache.

    Args:
        a: float32 (K, H, W) with values ≥ 0, K ≤ 255; mask: bool (K, H, W), classes allowed
            per pixel (None: all); skip: a class left out (None: none).
    Returns:
        (uint8 (H, W) index, float32 (H, W) value); value −1 where no class is allowed.
    """
    k = a.shape[0]
    if k > 255:
        raise ValueError(f"argmax0 takes at most 255 classes, got {k}")
    rows = max(1, _BLOCK // max(k * int(np.prod(a.shape[2:], dtype=np.int64)), 1))
    if a.ndim >= 3 and a.shape[1] > rows:  # blocks of rows that stay in the CPU cache
        parts = [
            _argmax0(a[:, y : y + rows], None if mask is None else mask[:, y : y + rows], skip)
            for y in range(0, a.shape[1], rows)
        ]
        return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])
    return _argmax0(a, mask, skip)


# elements of a (K, rows, W) block of argmax0: ~4 MB of float32, several times the work of a
# whole-image pass each, stays in the CPU cache
_BLOCK = 1 << 20


def _argmax0(
    a: np.ndarray, mask: np.ndarray | None, skip: int | None
) -> tuple[np.ndarray, np.ndarray]:
    k = a.shape[0]
    weights = np.arange(255, 255 - k, -1, dtype=np.uint8).reshape(k, *([1] * (a.ndim - 1)))
    a = np.asarray(a, dtype=np.float32)
    if mask is None and (skip is None or k > 1):
        if skip is None:
            best = a.max(axis=0)
        else:  # the maximum of the rows around the skipped one; its weight becomes 0
            parts = [a[:skip].max(axis=0)] if skip > 0 else []
            parts += [a[skip + 1 :].max(axis=0)] if skip < k - 1 else []
            best = np.maximum(parts[0], parts[-1])
            weights = weights.copy()
            weights[skip] = 0
        best = best + np.float32(0.0)  # -0.0 becomes 0.0
        first = np.multiply(a == best, weights, dtype=np.uint8).max(axis=0)
        return np.uint8(255) - first, best
    # float32 values >= 0 order like their bit patterns; key = bits + 1, 0 where not allowed
    # (integer arithmetic, so a mask costs no branches; -0.0 counts as 0.0)
    key = np.maximum(np.ascontiguousarray(a, dtype=np.float32).view(np.int32), 0)
    key += 1
    if mask is not None:
        key *= mask
    if skip is not None:
        key[skip] = 0
    top = key.max(axis=0)
    first = np.multiply(key == top, weights, dtype=np.uint8).max(axis=0)
    best = np.where(top > 0, (top - 1).view(np.float32), np.float32(-1.0))
    return np.uint8(255) - first, best


def pseudo_label(
    probs: np.ndarray,
    sets: np.ndarray,
    background: int | None,
    max_set_size: int = 0,
    one_threshold: bool = False,
) -> np.ndarray:
    """The pseudo-label of every pixel from its prediction set.

    Empty set → 255. Otherwise the most probable class in the set; when ``background`` is a
    class index and the set holds background together with another class, the most probable
    non-background class in the set wins (the paper's foreground preference). Ties go to the
    lower class index. With ``max_set_size`` > 0, sets larger than that are also 255 (our
    option, not the paper's: a large set says the annotator is unsure there).

    Args:
        probs: float32 (K, H, W); sets: bool (K, H, W); background: class index or None (rule
            off); max_set_size: largest set kept, 0 = no limit.
        one_threshold: the sets come from one q̂ for every class (LAC or APS): then a class is
            in the set whenever a more probable one is, so the most probable eligible class
            overall is the set's if any eligible class is in it, and no masked search is needed.
    Returns:
        uint8 (H, W).
    """
    if one_threshold:
        idx, _ = argmax0(probs, skip=background)
        has = np.take_along_axis(sets, idx[None].astype(np.intp), 0)[0]
    else:
        idx, val = argmax0(probs, sets, skip=background)
        has = val >= 0
    out = np.where(has, idx, np.uint8(IGNORE_INDEX))
    if background is not None:
        out = np.where(~has & sets[background], np.uint8(background), out)
    if max_set_size > 0:
        out = np.where(np.count_nonzero(sets, axis=0) > max_set_size, np.uint8(IGNORE_INDEX), out)
    return out.astype(np.uint8, copy=False)


def threshold_label(probs: np.ndarray, tau: float) -> np.ndarray:
    """The confidence-threshold baseline: argmax where max p ≥ tau, else 255. uint8 (H, W)."""
    idx, best = argmax0(probs)
    return np.where(best >= np.float32(tau), idx, IGNORE_INDEX).astype(np.uint8)


def raw_label(probs: np.ndarray) -> np.ndarray:
    """The annotator's argmax, no filtering. uint8 (H, W)."""
    return argmax0(probs)[0]
