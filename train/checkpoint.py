"""The checkpoint file: what it holds, how it is written and read back.

A checkpoint is a dict readable with ``torch.load(..., weights_only=True)``::

    {"model": state_dict, "info": {"schema", "arch", "num_classes", "classes", "palette",
     "mean", "std", "model_kwargs", "iteration", "miou"}, "train_state": {...}}

``train_state`` (optimizer, counters, the run's identity) is present in ``latest.pt`` only.
:func:`train.inference.load_checkpoint_model` turns a checkpoint into a ready model.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_manifest.cli_support import load_torch_file, state_dict_mismatch
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_bytes
from train.models import BUILDERS, NORMALIZATION, build_model

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


def checkpoint_info(
    arch: str,
    classes: list[str],
    palette: list[list[int]],
    model_kwargs: dict[str, Any] | None = None,
    iteration: int = 0,
    miou: float | None = None,
) -> dict[str, Any]:
    """The ``info`` dict stored in every checkpoint (plain Python values only)."""
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
