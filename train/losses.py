"""The losses of a training step and the Stage II targets.

* :func:`masked_ce`: cross-entropy over the pixels that are not ignored (255), optionally
  weighted per pixel (a confidence mask) and divided by a given pixel count.
* :func:`self_training_targets`: Stage II targets, the model's own argmax on the weak view
  (eval mode, no gradient) and the pixels confident enough to count.
* :func:`cutmix`: UniMatch's CutMix within a batch, images and targets alike.
* :func:`mixed_loss`: (1 − λ)·L_s + λ·L_u (λ from :mod:`train.schedule`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = 255


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


@torch.no_grad()
def self_training_targets(
    model: nn.Module,
    x_u: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage II targets: the model's argmax on ``x_u`` in eval mode, as UniMatch's weak view.

    Args:
        model: the bare model (not the DDP wrapper: no gradient synchronisation here).
        x_u: float32 (B, 3, H, W) normalised unlabeled images (the weak view).
        valid: bool (B, H, W), False on padding.
        threshold: pixels whose softmax confidence is below it get weight 0.
        autocast: the training step's autocast context (None: full precision).
    Returns:
        ``(target, weight)``: int64 (B, H, W) with 255 outside ``valid``, and bool (B, H, W)
        = confident and valid. The model is left in training mode.
    """
    model.eval()
    with autocast or contextlib.nullcontext():
        probs = model(x_u).float().softmax(1)
    model.train()
    conf, target = probs.max(1)
    weight = (conf >= threshold) & valid
    target = torch.where(valid, target, torch.full_like(target, IGNORE))
    return target, weight


def cutmix(
    images: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix within a batch: each sample, with probability ``prob``, receives a random box
    (2-40 % of its area, aspect 0.3-3.3, UniMatch's ``obtain_cutmix_box``) from the next sample
    in the batch, targets alike.

    Shapes: images (B, 3, H, W); target int64 (B, H, W); weight (B, H, W).
    """
    b, _, h, w = images.shape
    src_images, src_target, src_weight = images, target, weight
    images, target, weight = images.clone(), target.clone(), weight.clone()
    src = torch.roll(torch.arange(b), 1)
    draws = torch.rand((b, 4), generator=gen).tolist()
    for i in range(b):
        use, area, ratio, pos = draws[i]
        if use >= prob or b < 2:
            continue
        area = 0.02 + area * 0.38
        ratio = math.exp(math.log(0.3) + ratio * (math.log(1 / 0.3) - math.log(0.3)))
        bh = min(h, max(1, round(math.sqrt(area * h * w / ratio))))
        bw = min(w, max(1, round(math.sqrt(area * h * w * ratio))))
        top = int(pos * (h - bh + 1)) % (h - bh + 1)
        left = int((pos * 7919) % 1 * (w - bw + 1)) % (w - bw + 1)
        j = int(src[i])
        box = (slice(top, top + bh), slice(left, left + bw))
        images[i, :, box[0], box[1]] = src_images[j, :, box[0], box[1]]
        target[i, box[0], box[1]] = src_target[j, box[0], box[1]]
        weight[i, box[0], box[1]] = src_weight[j, box[0], box[1]]
    return images, target, weight
