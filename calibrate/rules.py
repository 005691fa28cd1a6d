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
from data_manifest.manifest import IGNORE_INDEX

METHODS = ("cp", "raw", "threshold", "risk")


@dataclass(frozen=True)
class Rule:
    """How one method turns probabilities into a pseudo-label.

    Attributes:
        method: "cp", "raw", "threshold" or "risk".
        score: cp: "lac" or "aps".
        qhat: cp: the set threshold q̂_j of every class (K,).
        tau: threshold, risk: the confidence threshold (above 1: nothing is kept).
        background: cp: the class the foreground preference applies to (None: rule off).
        max_set_size: cp: larger sets become 255 (0: no limit).
        quantize: risk: threshold the confidence rounded to float16 (top-k caches).
        informative: cp: per class, whether its set membership takes part in the foreground
            preference (None: every class does, the paper's rule).
    """

    method: str
    score: str = "lac"
    qhat: tuple[float, ...] | None = None
    tau: float | None = None
    background: int | None = None
    max_set_size: int = 0
    quantize: bool = False
    informative: tuple[bool, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("qhat", "informative"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rule:
        d = dict(d)
        for k in ("qhat", "informative"):
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
    if rule.method == "cp":
        q = np.asarray(rule.qhat, np.float32)
        sets = S.prediction_sets(probs, q, rule.score)
        fg = None if rule.informative is None else np.asarray(rule.informative, bool)
        return S.pseudo_label(probs, sets, rule.background, rule.max_set_size, informative=fg)
    raise ValueError(f"unknown method {rule.method!r}; expected one of {METHODS}")
