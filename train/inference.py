"""Checkpoints as annotators, and whole-image / sliding-window prediction.

    >>> from train.inference import load_checkpoint_model
    >>> model, info = load_checkpoint_model("data/demo/annotator/best.pt")
    >>> x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std
    >>> logits = model(x)                         # (1, K, H, W) float32

A checkpoint is a dict readable with ``torch.load(..., weights_only=True)``::

    {"model": state_dict, "info": {"schema", "arch", "num_classes", "classes", "palette",
     "mean", "std", "model_kwargs", "iteration", "miou"}, "train_state": {...}}

``train_state`` (optimizer, counters) is present in ``latest.pt`` only.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_manifest.cli_support import load_torch_file, state_dict_mismatch
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_bytes
from train.models import BUILDERS, build_model

CHECKPOINT_SCHEMA = 1


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True`` and check its structure.

    Raises:
        UserError: missing file, not a checkpoint of this project, unknown architecture.
    """
    path = Path(path)
    ckpt = load_torch_file(path, map_location, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("info"), dict):
        raise UserError(
            f"{path}: not a checkpoint of this trainer; expected a dict with "
            "'model' and 'info' (written by python -m train fit)"
        )
    info = ckpt["info"]
    if info.get("schema") != CHECKPOINT_SCHEMA:
        raise UserError(
            f"{path}: info.schema = {info.get('schema')!r}; this version reads "
            f"schema {CHECKPOINT_SCHEMA}"
        )
    if info.get("arch") not in BUILDERS:
        raise UserError(
            f"{path}: info.arch = {info.get('arch')!r}; expected one of {', '.join(BUILDERS)}"
        )
    missing = [k for k in ("num_classes", "classes", "mean", "std") if k not in info]
    if missing:
        raise UserError(
            f"{path}: info.{missing[0]} is missing; expected the info a checkpoint written "
            "by python -m train fit holds"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> nn.Module:
    """Build the architecture named in ``ckpt["info"]`` and load its weights (strict)."""
    info = ckpt["info"]
    try:
        model = build_model(
            info["arch"],
            int(info["num_classes"]),
            pretrained=False,
            **dict(info.get("model_kwargs") or {}),
        )
    except ImportError as exc:  # an optional package the architecture needs ([hf])
        raise UserError(f"{path}: arch {info['arch']!r}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{path}: info describes no model this trainer can build ({type(exc).__name__}: "
            f"{exc}); expected a checkpoint written by python -m train fit"
        ) from None
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise UserError(f"{path}: 'model' is not a state dict; expected tensors by name")
    differ = state_dict_mismatch(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in weights.items()},
    )
    if differ:
        raise UserError(
            f"{path}: weights do not fit arch {info['arch']!r} with {info['num_classes']} "
            f"classes: {differ}; expected a checkpoint written for this architecture"
        )
    model.load_state_dict(weights, strict=True)
    return model


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


def checkpoint_info(
    arch: str,
    classes: list[str],
    palette: list[list[int]],
    model_kwargs: dict[str, Any] | None = None,
    iteration: int = 0,
    miou: float | None = None,
) -> dict[str, Any]:
    """The ``info`` dict stored in every checkpoint (plain Python values only)."""
    from train.models import NORMALIZATION

    mean, std = NORMALIZATION[arch]
    return {
        "schema": CHECKPOINT_SCHEMA,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "palette": [list(map(int, c)) for c in palette],
        "mean": list(mean),
        "std": list(std),
        "model_kwargs": dict(model_kwargs or {}),
        "iteration": int(iteration),
        "miou": None if miou is None else float(miou),
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    info: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (``model`` may be wrapped in DistributedDataParallel)."""
    module = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    ckpt: dict[str, Any] = {"model": state, "info": info}
    if train_state is not None:
        ckpt["train_state"] = train_state
    # Through memory: torch.save names the archive after the file, and the temporary name is
    # random; a buffer gives identical bytes for identical checkpoints.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())


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


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    mean: Any,
    std: Any,
    mode: str = "whole",
    crop: int = 512,
    stride: int = 341,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Class probabilities for one RGB uint8 (H, W, 3) image → float32 (K, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)
    logits = predict_logits(model, normalize(x, mean, std), mode, crop, stride)
    return logits.softmax(1)[0].cpu().numpy()
