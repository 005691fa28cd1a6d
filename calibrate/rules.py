"""The pseudo-label rule of every method, from the parameters recorded in calibration.json.

``calibrate run`` writes its PNGs through :func:`label_image`, and ``calibrate evaluate``
re-applies the same rule to labeled images (with the parameters calibrated without them), so
the two can never drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from calibrate import sets as S
from calibrate import topk as T
from data_manifest.errors import UserError
from data_manifest.manifest import IGNORE_INDEX

METHODS = ("cp", "raw", "threshold", "risk", "recall")


@dataclass(frozen=True)
class Rule:
    """How one method turns probabilities into a pseudo-label.

    Attributes:
        method: "cp", "raw", "threshold", "risk" or "recall".
        score: cp: "lac" or "aps".
        qhat: cp: the set threshold q̂_j of every class (K,).
        tau: threshold, risk: the confidence threshold (above 1: nothing is kept).
        background: cp, recall: the class the foreground preference applies to (None: rule
            off).
        max_set_size: cp: larger sets become 255 (0: no limit).
        quantize: risk, recall: threshold the confidence rounded to float16 (top-k caches).
        informative: cp: per class, whether its set membership takes part in the foreground
            preference (None: every class does, the paper's rule).
        thresholds: recall: the threshold t_c of every class (K,) (see :mod:`calibrate.recall`).
    """

    method: str
    score: str = "lac"
    qhat: tuple[float, ...] | None = None
    tau: float | None = None
    background: int | None = None
    max_set_size: int = 0
    quantize: bool = False
    informative: tuple[bool, ...] | None = None
    thresholds: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("qhat", "informative", "thresholds"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rule:
        d = dict(d)
        for k in ("qhat", "informative", "thresholds"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def confidence(probs: np.ndarray, quantize: bool) -> tuple[np.ndarray, np.ndarray]:
    """The annotator's argmax and its probability.

    Args:
        probs: float32 (K, H, W).
        quantize: round the confidence to float16, the precision in which a top-k cache stores
            it, so that labeled images (full scores) and unlabeled images (top-k) are thresholded
            on the same statistic.
    Returns:
        (uint8 (H, W) argmax, float32 (H, W) max probability).
    """
    idx, best = S.argmax0(probs)
    if quantize:
        best = best.astype(np.float16).astype(np.float32)
    return idx, best


def label_image(probs: np.ndarray, rule: Rule) -> np.ndarray:
    """The pseudo-label of one image under ``rule``.

    Args:
        probs: float32 (K, H, W) probabilities.
    Returns:
        uint8 (H, W), 255 where the rule drops the pixel.
    """
    if rule.method == "raw":
        return S.raw_label(probs)
    if rule.method in ("threshold", "risk"):
        idx, conf = confidence(probs, rule.quantize)
        keep = conf >= np.float32(rule.tau)
        return np.where(keep, idx, np.uint8(IGNORE_INDEX)).astype(np.uint8)
    if rule.method == "recall":
        from calibrate import recall as C  # recall → risk → rules: imported where used

        return C.label(
            probs, np.asarray(rule.thresholds, np.float32), rule.background, rule.quantize
        )
    if rule.method == "cp":
        q = np.asarray(rule.qhat, np.float32)
        sets = S.prediction_sets(probs, q, rule.score)
        fg = None if rule.informative is None else np.asarray(rule.informative, bool)
        return S.pseudo_label(probs, sets, rule.background, rule.max_set_size, informative=fg)
    raise ValueError(f"unknown method {rule.method!r}; expected one of {METHODS}")


def risk_label(
    x: np.ndarray | T.TopK | T.Bounds, tau: float, quantize: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Method "risk" on an unlabeled image: the argmax where the confidence is ≥ ``tau``.

    Full probabilities: exact. Top-k entries at image resolution: the stored top-1 class and
    its float16 value, which is the confidence rounded to float16 (``quantize`` is always on for
    such caches), so exact too. Resized top-k entries: bounds of the argmax and of the maximum
    probability; pixels they leave open are 255 and marked undetermined.

    Returns:
        (label uint8 (H, W), undetermined bool (H, W) or None).
    """
    t32 = np.float32(tau)
    if isinstance(x, np.ndarray):
        idx, conf = confidence(x, quantize)
        return np.where(conf >= t32, idx, np.uint8(IGNORE_INDEX)).astype(np.uint8), None
    if isinstance(x, T.TopK):
        lo, hi = x.lo[0], x.hi[0]
        if quantize:  # lo, hi = v ∓ half a step (hi clipped at 1): the midpoint rounds to v
            v = ((lo + hi) / np.float32(2)).astype(np.float16).astype(np.float32)
            lo = hi = v
        keep = lo >= t32
        unsure = ~keep & (hi >= t32)
    else:
        label, unsure, low, high = T.bounds_argmax(x)
        if quantize:
            low, high = (a.astype(np.float16).astype(np.float32) for a in (low, high))
        keep = ~unsure & (low >= t32)
        unsure = unsure | (~keep & (high >= t32))
        return np.where(keep, label, np.uint8(IGNORE_INDEX)).astype(np.uint8), unsure
    label = np.where(keep, x.index[0], np.uint8(IGNORE_INDEX)).astype(np.uint8)
    return label, unsure


def informative_topk_label(
    x: T.TopK | T.Bounds,
    qhat: np.ndarray,
    score: str,
    background: int | None,
    max_set_size: int,
    informative: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The class-mode rule of :func:`calibrate.sets.pseudo_label` on a top-k entry: at image
    resolution :func:`calibrate.topk.topk_informative_label`; resized entries (LAC only) from
    the bounds of every class's probability. A pixel whose label the entry leaves open is 255
    and marked undetermined.

    Returns:
        (label uint8 (H, W), undetermined bool (H, W)).
    """
    if isinstance(x, T.TopK):
        return T.topk_informative_label(x, qhat, score, background, max_set_size, informative)
    if score != "lac":
        raise UserError(
            "score 'aps' cannot be computed exactly on top-k cache entries stored at a "
            "resolution other than the image's; expected score 'lac', or a cache annotated "
            "with resolution = 'image' or topk = 0"
        )
    lo, hi, top, low = x.lo, x.hi, x.top, x.low
    arg, arg_unsure, _, _ = T.bounds_argmax(x)
    k = lo.shape[0]
    q = np.asarray(qhat, dtype=np.float32).reshape(-1, 1, 1)
    one = np.float32(1.0)
    din, pin = one - lo <= q, one - hi <= q  # surely / possibly in the set
    cls = np.arange(k).reshape(-1, 1, 1)
    # the argmax rule: the argmax if it is in its set, else 255
    a = np.where(arg_unsure, 0, arg).astype(np.intp)[None]  # undetermined argmax: 255
    a_in, a_maybe = np.take_along_axis(din, a, 0)[0], np.take_along_axis(pin, a, 0)[0]
    label = np.where(a_in, arg, np.uint8(IGNORE_INDEX))
    unsure = arg_unsure | (a_maybe & ~a_in)
    if background is not None:
        fg = (np.asarray(informative, bool) & (np.arange(k) != background)).reshape(-1, 1, 1)
        sw, sw_unsure = T.decide(lo, hi, din & fg, pin & fg, cls, top, low, None, None, 0)
        none = (sw == IGNORE_INDEX) & ~sw_unsure  # surely no informative foreground in the set
        bg_in, bg_maybe = din[background], pin[background]
        switch = bg_in & ~none & ~sw_unsure
        label = np.where(switch, sw, label)
        unsure = np.where(switch, False, unsure | (bg_maybe & ~none))
    if max_set_size > 0:
        drop = din.sum(axis=0) > max_set_size
        unsure = (unsure | (pin.sum(axis=0) > max_set_size)) & ~drop
        label = np.where(drop, np.uint8(IGNORE_INDEX), label)
    return np.where(unsure, np.uint8(IGNORE_INDEX), label).astype(np.uint8), unsure
