"""The losses of a training step and the Stage II targets.

* :func:`masked_ce`: cross-entropy over the pixels that are not ignored (255), optionally
  weighted per pixel (a confidence mask) and divided by a given pixel count.
* :class:`Targets`, :func:`predicted_targets`: the model's own argmax, confidence and valid
  (not padding) pixels: the Stage II targets.
* :func:`mix_targets`: CutMix of targets (the box from the CutMix source's targets).
* :func:`confident_ce`: UniMatch's unlabeled loss: cross-entropy on the confident pixels,
  divided by the number of valid pixels.
* :func:`mixed_loss`: (1 − λ)·L_s + λ·L_u (λ from :mod:`train.schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.augment import IGNORE, paste


def masked_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels (0 when there are none).

    Args:
        logits: (B, K, H, W); target: int64 (B, H, W) with 255 = ignore.
        weight: optional float/bool (B, H, W) per-pixel weight (e.g. a confidence mask).
        denominator: pixel count to divide by (default: the non-ignored pixels).
    Returns:
        float32 scalar.
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    if weight is not None:
        ce = ce * weight.float()
    den = (target != IGNORE).sum() if denominator is None else denominator
    return ce.sum() / den.clamp(min=1)


def mixed_loss(l_s: torch.Tensor, l_u: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 − λ)·L_s + λ·L_u: the loss of every iteration (λ = 0 for the labeled-only baseline)."""
    return (1.0 - lam) * l_s + lam * l_u


@dataclass(frozen=True)
class Targets:
    """The model's own predictions as targets, all (B, H, W): ``label`` int64 (argmax),
    ``conf`` float32 (max softmax probability), ``valid`` bool (False on padding)."""

    label: torch.Tensor
    conf: torch.Tensor
    valid: torch.Tensor

    def mask_ratio(self, threshold: float) -> torch.Tensor:
        """Fraction of the valid pixels confident enough to count (UniMatch's "mask ratio")."""
        keep = (self.conf >= threshold) & self.valid
        return keep.sum() / self.valid.sum().clamp(min=1)


@torch.no_grad()
def predicted_targets(logits: torch.Tensor, valid: torch.Tensor) -> Targets:
    """Targets from logits (B, K, H, W) (detached): argmax and softmax confidence, as UniMatch's
    ``pred.argmax(dim=1)`` and ``pred.softmax(dim=1).max(dim=1)[0]``; ``valid`` bool (B, H, W)."""
    logits = logits.detach().float()
    return Targets(logits.argmax(1), logits.softmax(1).max(1)[0], valid)


def mix_targets(t: Targets, source: Targets, box: torch.Tensor) -> Targets:
    """CutMix of targets: inside ``box`` (bool (B, H, W)) label, confidence and validity come
    from ``source`` (the CutMix source batch's own targets), as UniMatch's ``*_cutmixed``."""
    return Targets(
        paste(t.label, source.label, box),
        paste(t.conf, source.conf, box),
        paste(t.valid, source.valid, box),
    )


def confident_ce(logits: torch.Tensor, t: Targets, threshold: float) -> torch.Tensor:
    """UniMatch's unlabeled loss (``criterion_u`` in ``fixmatch.py``/``unimatch.py``): per-pixel
    cross-entropy against ``t.label`` where ``t.conf >= threshold`` and the pixel is valid,
    summed and divided by the number of valid pixels (not of confident ones). Float32 scalar."""
    target = torch.where(t.valid, t.label, torch.full_like(t.label, IGNORE))
    return masked_ce(logits, target, (t.conf >= threshold) & t.valid, t.valid.sum())
