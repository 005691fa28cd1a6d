"""Checkpoints as annotators, and whole-image / sliding-window prediction.

    >>> from train.inference import load_checkpoint_model
    >>> model, info = load_checkpoint_model("data/demo/annotator/best.pt")
    >>> x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std
    >>> logits = model(x)                         # (1, K, H, W) float32

The checkpoint file itself (what it holds, writing and reading it) is :mod:`train.checkpoint`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from train.checkpoint import model_from_checkpoint, read_checkpoint


def load_checkpoint_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trainer checkpoint as a ready model.

    Returns:
        ``(model, info)``: the model in eval mode on ``map_location``, mapping float32
        (B, 3, H, W) RGB images normalised as (x/255 − mean)/std to logits (B, K, H, W) at input
        resolution; ``info`` has ``classes`` (list[str]), ``mean`` and ``std`` (3 floats each,
        0-1 scale), ``arch`` (str), ``num_classes``, ``palette``, ``iteration`` and ``miou``.
    Raises:
        UserError: missing or unreadable file, unknown architecture, weights that do not fit.
    """
    ckpt = read_checkpoint(path, map_location)
    model = model_from_checkpoint(ckpt, path).to(map_location).eval()
    info = dict(ckpt["info"])
    info["classes"] = list(info["classes"])
    info["mean"] = [float(v) for v in info["mean"]]
    info["std"] = [float(v) for v in info["std"]]
    return model, info


def normalize(images: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """uint8 or float (B, 3, H, W) in 0-255 → float32 (x/255 − mean)/std."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, mode: str = "whole", crop: int = 512, stride: int = 341
) -> torch.Tensor:
    """Logits for normalised images, whole-image or by sliding window.

    Args:
        x: float32 (B, 3, H, W) normalised images.
        mode: "whole" (one forward pass) or "sliding" (crop×crop windows every ``stride`` px,
            logits averaged where windows overlap; a side shorter than ``crop`` is taken whole,
            so an image that fits one window gives exactly the whole-image logits).
    Returns:
        float32 (B, K, H, W) logits.
    """
    if mode == "whole":
        return model(x).float()
    if mode != "sliding":
        raise ValueError(f"mode = {mode!r}: expected 'whole' or 'sliding'")
    b, _, h, w = x.shape
    ch, cw = min(crop, h), min(crop, w)
    out: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    for top in _window_starts(h, ch, stride):
        for left in _window_starts(w, cw, stride):
            logits = model(x[:, :, top : top + ch, left : left + cw]).float()
            if out is None:
                out = torch.zeros((b, logits.shape[1], h, w), device=x.device)
            out[:, :, top : top + ch, left : left + cw] += logits
            count[:, :, top : top + ch, left : left + cw] += 1
    return out / count  # type: ignore[operator]
