"""Evaluation on a labeled split: a confusion matrix over the images (sharded over DDP ranks),
summarised as mIoU, pixel accuracy and per-class IoU (:mod:`train.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_manifest.cli_support import console, table
from data_manifest.manifest import Manifest, Row
from train.distributed import Dist, all_reduce_sum
from train.inference import normalize, predict_logits
from train.metrics import confusion


@dataclass(frozen=True)
class EvalSettings:
    """How images are fed to the model: input normalisation (0-1 scale, 3 values each) and
    "whole"-image or "sliding"-window prediction (``crop``-px windows every ``stride`` px)."""

    mean: Sequence[float]
    std: Sequence[float]
    mode: str = "whole"
    crop: int = 512
    stride: int = 341


def evaluate_rows(
    model: nn.Module,
    manifest: Manifest,
    rows: Sequence[Row],
    settings: EvalSettings,
    device: torch.device,
    d: Dist = Dist(),
) -> np.ndarray:
    """Confusion matrix int64 (K, K) of ``model`` on ``rows``, rows = ground truth.

    Each process evaluates every world-th image; the matrices are summed over processes (a CPU
    tensor: gloo carries it, on CUDA runs too). The model's training mode is restored.
    """
    k = manifest.num_classes
    conf = np.zeros((k, k), dtype=np.int64)
    was_training = model.training
    model.eval()
    for row in rows[d.rank :: d.world]:
        x = torch.from_numpy(manifest.read_image(row)).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            x = normalize(x, settings.mean, settings.std)
            pred = predict_logits(model, x, settings.mode, settings.crop, settings.stride)
        conf += confusion(pred.argmax(1)[0].cpu().numpy(), manifest.read_label(row), k)
    model.train(was_training)
    return all_reduce_sum(torch.from_numpy(conf), d).numpy()


def print_iou_table(title: str, summary: dict) -> None:
    """Per-class IoU and the mean, in percent, as a table on the console."""
    rows = [[name, "-" if v is None else round(100 * v, 2)] for name, v in summary["iou"].items()]
    rows.append(["mean", round(100 * summary["miou"], 2)])
    console.print(table(title, ["class", "IoU %"], rows))
