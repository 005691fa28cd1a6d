"""Confusion matrices and IoU for any number of classes (255 = ignore)."""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix int64 (K, K), rows = ground truth, columns = prediction.

    Args:
        pred: integer (H, W) predicted class ids in [0, K).
        target: integer (H, W) class ids; 255 (and anything >= K) is ignored.
    """
    t = target.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = t < num_classes
    return np.bincount(
        t[keep] * num_classes + p[keep], minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU float64 (K,) from a confusion matrix; NaN for classes absent from both GT and
    prediction (they do not count in the mean)."""
    conf = conf.astype(np.float64)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def summarize(conf: np.ndarray, classes: list[str]) -> dict:
    """``{"miou", "acc", "iou": {class: value or None}}`` from a confusion matrix."""
    iou = iou_per_class(conf)
    total = conf.sum()
    valid = ~np.isnan(iou)
    return {
        "miou": float(iou[valid].mean()) if valid.any() else 0.0,
        "acc": float(np.diag(conf).sum() / total) if total else 0.0,
        "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou, strict=True)},
    }
