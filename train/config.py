"""The ``[train]`` section of the run config.

Defaults follow UniMatch's DeepLabV3+ recipe for PASCAL VOC (SGD, lr 0.001, 10x on the head,
momentum 0.9, weight decay 1e-4, poly power 0.9, crop 321, scale 0.5-2.0, confidence 0.95 and
a constant weight 1/2 for the "fixmatch" and "unimatch" Stage II modes), which AllSpark's
SegFormer MiT-B5 runs share (its ``train_allspark.py`` and ``configs/pascal_allspark.yaml``: the
same SGD recipe, crop 513), and the paper's schedule (60 epochs Stage I + 20 epochs Stage II on
VOC). The "self" mode's weight schedule λ(t) = lambda0 · exp(−lambda_decay · t), the
pseudo-label weight, the per-stage batch composition and the evaluation cadence are this
project's choices; the paper does not give them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from train.models import BUILDERS

# Stage II modes: what the unlabeled loss is (docs/train.md, "Stage II modes").
STAGE2_MODES = ("self", "fixmatch", "unimatch")
# stage2_threshold when unset: UniMatch's conf_thresh (configs/pascal.yaml) for its two modes,
# none for "self".
DEFAULT_THRESHOLD = {"self": 0.0, "fixmatch": 0.95, "unimatch": 0.95}
# lambda_decay when unset: the self-reliance decay for "self"; UniMatch's constant
# (loss_x + loss_u) / 2 (λ = lambda0 = 1/2) for its two modes.
DEFAULT_LAMBDA_DECAY = {"self": 3.0, "fixmatch": 0.0, "unimatch": 0.0}
RENAMED_MODES = {
    "weak_strong": (
        'stage2_mode = "weak_strong" was renamed "fixmatch" when it became FixMatch as '
        "UniMatch's fixmatch.py runs it (targets from the training forward pass, CutMix "
        'from a second unlabeled batch); expected "self", "fixmatch" or "unimatch"'
    )
}


@dataclass
class TrainConfig:
    """Every key of ``[train]``; see ``configs/demo.toml`` for one documented line per key."""

    out: str = ""
    pseudo_dir: str = ""
    labeled_only: bool = False
    arch: str = "deeplabv3plus_r101"
    pretrained: bool = True
    backbone_weights: str = ""
    model_kwargs: dict[str, int | str] | None = None
    length_unit: Literal["epochs", "iters"] = "epochs"
    stage1_length: int = 60
    stage2: bool = True
    stage2_length: int = 20
    stage2_mode: str = "self"
    stage2_threshold: float | None = None
    lambda0: float = 0.5
    lambda_decay: float | None = None
    pseudo_weight: float = 1.0
    batch_size: int = 8
    accum_steps: int = 1
    crop: int = 321
    scale_min: float = 0.5
    scale_max: float = 2.0
    cutmix_prob: float = 0.5
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.001
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    workers: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    eval_every: int = 0
    eval_mode: Literal["whole", "sliding"] = "whole"
    eval_crop: int = 0
    eval_stride: int = 0
    save_every: int = 0
    check_labels: bool = True

    def __post_init__(self) -> None:
        if self.arch not in BUILDERS:
            raise ValueError(f"arch = {self.arch!r}: expected one of {', '.join(BUILDERS)}")
        positive = {
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
            "crop": self.crop,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} = {value}: expected a positive integer")
        for key in (
            "stage2_length",
            "eval_every",
            "save_every",
            "workers",
            "eval_crop",
            "eval_stride",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)}: expected an integer >= 0")
        if self.stage1_length < 0:
            raise ValueError(f"stage1_length = {self.stage1_length}: expected an integer >= 0")
        if self.stage1_length + (self.stage2_length if self.stage2 else 0) < 1:
            raise ValueError(
                "stage1_length + stage2_length = 0: expected a run of at least "
                "one epoch or iteration"
            )
        if self.stage2_mode in RENAMED_MODES:
            raise ValueError(RENAMED_MODES[self.stage2_mode])
        if self.stage2_mode not in STAGE2_MODES:
            raise ValueError(
                f"stage2_mode = {self.stage2_mode!r}: expected one of "
                + ", ".join(f'"{m}"' for m in STAGE2_MODES)
            )
        if self.stage2_threshold is None:
            self.stage2_threshold = DEFAULT_THRESHOLD[self.stage2_mode]
        if self.lambda_decay is None:
            self.lambda_decay = DEFAULT_LAMBDA_DECAY[self.stage2_mode]
        if not 0.0 <= self.stage2_threshold < 1.0:
            raise ValueError(
                f"stage2_threshold = {self.stage2_threshold}: expected a number in [0, 1)"
            )
        if not 0.0 <= self.lambda0 <= 1.0:
            raise ValueError(f"lambda0 = {self.lambda0}: expected a number in [0, 1]")
        if self.lambda_decay < 0:
            raise ValueError(f"lambda_decay = {self.lambda_decay}: expected a number >= 0")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"scale_min = {self.scale_min}, scale_max = {self.scale_max}: "
                "expected 0 < scale_min <= scale_max"
            )
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"cutmix_prob = {self.cutmix_prob}: expected a number in [0, 1]")
        for key in ("lr", "head_lr_mult", "poly_power"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} = {getattr(self, key)}: expected a positive number")
        for key in ("momentum", "weight_decay", "pseudo_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)}: expected a number >= 0")

    @property
    def uses_pseudo(self) -> bool:
        """Stage I reads pseudo-label PNGs (not for the labeled-only baseline)."""
        return not self.labeled_only and self.stage1_length > 0

    @property
    def uses_unlabeled(self) -> bool:
        """Stage II runs (needs the unlabeled images, not their PNGs)."""
        return not self.labeled_only and self.stage2 and self.stage2_length > 0
