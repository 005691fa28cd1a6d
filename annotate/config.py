"""The ``[annotate]`` section of the run config (documented in ``configs/demo.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_manifest.manifest import SPLITS

DEFAULT_SPLITS = ("labeled", "unlabeled", "val")
# Upper bounds of values that size what is held in memory at once (a typo such as 100000x100000
# must fail here, not by exhausting the machine): a model input side, images per forward pass,
# image loading threads (each keeps two batches in flight), Dask shards (each builds a model).
MAX_SIDE = 8192
MAX_BATCH = 1024
MAX_WORKERS = 64
MAX_SHARDS = 1024
DEMO_MODEL = "data/demo/annotator/best.pt"
DEMO_TRAIN_CONFIG = "configs/demo_annotator.toml"


@dataclass
class AnnotateConfig:
    """Settings of ``python -m annotate run``; every field is a key of ``[annotate]``."""

    annotator: Literal["demo", "torch", "hf", "seem"] = "demo"
    model: str = ""
    seem_config: str = ""
    seem_root: str = ""
    seem_tokenizer: str = ""
    input_short_side: int = 512
    cache: str = ""
    splits: tuple[str, ...] = DEFAULT_SPLITS
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    topk: int = -1
    resolution: Literal["native", "image"] = "native"
    input_size: tuple[int, ...] = ()
    model_classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    normalization: Literal["", "softmax", "sum", "probs"] = ""
    prompts: dict[str, list[str]] = field(default_factory=dict)
    vocabulary: dict[str, list[str]] = field(default_factory=dict)
    unmapped: Literal["error", "drop", "background"] = "error"
    skip_bad: bool = False
    demo_train_config: str = DEMO_TRAIN_CONFIG
    scheduler: str = ""
    shards: int = 0

    def __post_init__(self) -> None:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(
                f"splits = {list(self.splits)!r}: expected distinct names from {', '.join(SPLITS)}"
            )
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(
                f"batch_size = {self.batch_size}: expected an integer in [1, {MAX_BATCH}]"
            )
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers = {self.workers}: expected an integer in [0, {MAX_WORKERS}]")
        if self.topk < -1 or self.topk > 255:
            raise ValueError(f"topk = {self.topk}: expected -1 (auto), 0 (off) or 1..255")
        if self.input_size and (
            len(self.input_size) != 2
            or not 8 <= min(self.input_size) <= max(self.input_size) <= MAX_SIDE
        ):
            raise ValueError(
                f"input_size = {list(self.input_size)!r}: expected [] (each image "
                f"at its own size) or [height, width], both in [8, {MAX_SIDE}]"
            )
        if self.input_short_side != 0 and not 32 <= self.input_short_side <= MAX_SIDE:
            raise ValueError(
                f"input_short_side = {self.input_short_side}: expected 0 (each image at its "
                f"own size) or a number of pixels in [32, {MAX_SIDE}] (SEEM's default: 512)"
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"
        ):
            raise ValueError(
                f'device = {self.device!r}: expected "auto", "cpu", "cuda", "cuda:N" or "mps"'
            )
        if self.scheduler and not (
            self.scheduler.startswith(("tcp://", "tls://")) or _local_workers(self.scheduler) > 0
        ):
            raise ValueError(
                f'scheduler = {self.scheduler!r}: expected "" (this process), '
                '"local:N" (N worker processes here) or a Dask scheduler '
                "address tcp://HOST:PORT"
            )
        if not 0 <= self.shards <= MAX_SHARDS:
            raise ValueError(
                f"shards = {self.shards}: expected 0 (one per Dask worker) to {MAX_SHARDS}"
            )
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v and (len(v) != 3 or (name == "std" and min(v) <= 0)):
                raise ValueError(
                    f"{name} = {list(v)!r}: expected [] or three numbers on the 0-1 "
                    "scale" + (" (all > 0)" if name == "std" else "")
                )


def _local_workers(scheduler: str) -> int:
    """N of "local:N" (0 when it is not of that form)."""
    head, _, n = scheduler.partition(":")
    return int(n) if head == "local" and n.isdigit() else 0


#: the largest class count for which ``topk = -1`` (auto) stores full scores
FULL_SCORES_MAX_CLASSES = 12
#: k of ``topk = -1`` (auto) above that
AUTO_K = 4


def auto_topk(num_classes: int) -> int:
    """The top-k storage of ``topk = -1`` (auto): 0 (full scores) for K <= 12 classes, top-4
    above.

    Why full scores when K is small: a top-k entry keeps probabilities in float16, whose step
    just below 1 is 2^-11, so whether a pixel passes the LAC threshold 1 − q̂ is unknown when
    its p lies within half a step (2^-12 ≈ 0.00024) of it; a confident annotator puts the
    threshold near 1 at large α, where its probabilities crowd (the demo at α = 0.3: q̂ ≈
    0.002; in class mode background's own q̂ is that small from α = 0.2 on). `calibrate`
    leaves such pixels open (255) and refuses above
    ``topk_undetermined_max``: on the demo's top-2 cache, α = 0.3 left 1.1 % of the unlabeled
    pixels open in pixel mode, and α ≥ 0.2 left 61 % open in class mode. No k helps; full
    scores (float16 raw scores, as labeled images are stored) give every later α, mode and
    set rule exactly. Their cost: 2K bytes per pixel before compression, against 3k for top-k
    (uint8 index + float16 probability), and logits compress less than saturated
    probabilities: on the demo (K = 7) an unlabeled image takes 188 KB instead of 31 KB as
    top-2 (6.1x; 0.41 of float32 logits instead of 0.067; docs/annotate.md). Above 12 classes
    (Cityscapes 19, VOC 21, ADE20K 150: 38-300 bytes per pixel) top-4 (12 bytes) stays the
    default; annotate the unlabeled split again with ``topk = 0`` if calibrate refuses an α.
    """
    if num_classes <= FULL_SCORES_MAX_CLASSES:
        return 0
    return AUTO_K
