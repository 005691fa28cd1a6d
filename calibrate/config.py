"""The ``[calibrate]`` section of the run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MODES = ("pixel", "class", "image")
METHODS = ("cp", "raw", "threshold", "risk", "recall")
RISK_CONTROLS = ("crc", "ltt")
BACKGROUND_RULES = ("auto", "prefer_foreground", "most_probable")
DEFAULT_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
MAX_WORKERS = 256  # threads or processes started here; a larger number exhausts the machine
MAX_OVERLAYS = 64  # rows of one figure
MAX_GALLERY = 200  # images embedded in report.html


@dataclass(frozen=True)
class CalibrateConfig:
    """Settings of ``python -m calibrate run`` (documented in ``configs/demo.toml``).

    Attributes:
        alpha: miscoverage level α in (0, 1); the sets cover the true class with prob. ≥ 1 − α.
        mode: "pixel" (one q̂ over all labeled pixels), "class" (one q̂ per true class) or
            "image" (one score per labeled image, q̂ over images).
        score: "lac" (1 − p_y) or "aps" (mass of the classes ranked at or above y).
        method: which pseudo-labels to write: "cp", "raw" (annotator argmax), "threshold",
            "risk" (the confidence threshold whose kept-pixel error is controlled at ``risk``)
            or "recall" (per-class thresholds, each object class's miss rate certified at
            ``miss``).
        background_rule: "auto" (prefer foreground when the manifest names a background class),
            "prefer_foreground" (requires one) or "most_probable" (rule off).
        max_set_size: method "cp": pixels whose set holds more classes than this become 255
            too; 0 = no limit (the paper's rule: only empty sets are dropped). Ours, off by
            default: with an overconfident annotator q̂ can exceed 1 − 1/K, and then no LAC set
            is ever empty, so the paper's rule keeps every pixel.
        threshold: confidence threshold of method "threshold"; unset = keep as many pixels as CP.
        risk: method "risk": ε in (0, 1), the error of the kept pixels to control.
        risk_control: method "risk": "crc" (conformal risk control, a guarantee in expectation)
            or "ltt" (Learn then Test, a guarantee with probability ≥ 1 − delta).
        delta: method "risk" with "ltt": δ in (0, 1).
        miss: method "recall": ε in (0, 1), the miss rate of every object class to certify
            (the fraction of a class's pixels in an image not labeled with it).
        class_min_pixels: in mode "class", classes with fewer calibration pixels use the pooled
            pixel-wise q̂; 0 = always the class's own q̂ (1 when its rank exceeds its count).
        topk_undetermined_max: on a top-k cache, pixels whose label the stored classes leave
            open become 255; the run refuses (before writing) when more than this fraction of
            the unlabeled pixels would. 1 = never refuse.
        held_out_fraction: fraction of the labeled images held out for the report, in [0, 1).
        alphas: the α grid of the coverage-against-α plot.
        scheduler: "threads", "processes" (a LocalCluster), "synchronous", or a scheduler
            address "tcp://HOST:PORT".
        workers: threads or worker processes; 0 = one per CPU core.
        batch: images per Dask task.
        plots: draw the PNG plots (off saves a few seconds per run in sweeps).
        overlays: how many unlabeled images the overlay plot shows (worst first).
        gallery: how many unlabeled images report.html shows (worst first).
        cache: the cache to read; unset = ``[annotate] cache``, else ``{run_dir}/cache.zarr``.
        out_dir: the output folder; unset = ``{run_dir}/pseudo/{method}``.
    """

    alpha: float = 0.05
    mode: Literal["pixel", "class", "image"] = "pixel"
    score: Literal["lac", "aps"] = "lac"
    method: Literal["cp", "raw", "threshold", "risk", "recall"] = "cp"
    background_rule: Literal["auto", "prefer_foreground", "most_probable"] = "auto"
    threshold: float | None = None
    max_set_size: int = 0
    risk: float = 0.1
    risk_control: Literal["crc", "ltt"] = "crc"
    delta: float = 0.1
    miss: float = 0.2
    class_min_pixels: int = 100
    topk_undetermined_max: float = 0.001
    held_out_fraction: float = 0.5
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    scheduler: str = "threads"
    workers: int = 0
    batch: int = 8
    plots: bool = True
    overlays: int = 4
    gallery: int = 12
    cache: str | None = None
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha = {self.alpha!r}: expected a number in (0, 1)")
        for a in self.alphas:
            if not 0.0 < a < 1.0:
                raise ValueError(f"alphas = {list(self.alphas)!r}: expected numbers in (0, 1)")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold = {self.threshold!r}: expected a number in (0, 1]")
        if not 0.0 < self.risk < 1.0:
            raise ValueError(f"risk = {self.risk!r}: expected a number in (0, 1)")
        if not 0.0 < self.miss < 1.0:
            raise ValueError(f"miss = {self.miss!r}: expected a number in (0, 1)")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta = {self.delta!r}: expected a number in (0, 1)")
        if self.max_set_size < 0:
            raise ValueError(f"max_set_size = {self.max_set_size!r}: expected >= 0 (0 = no limit)")
        if self.class_min_pixels < 0:
            raise ValueError(f"class_min_pixels = {self.class_min_pixels!r}: expected >= 0")
        if not 0.0 <= self.topk_undetermined_max <= 1.0:
            raise ValueError(
                f"topk_undetermined_max = {self.topk_undetermined_max!r}: expected a number "
                "in [0, 1]"
            )
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(
                f"held_out_fraction = {self.held_out_fraction!r}: expected a number in [0, 1)"
            )
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(
                f"workers = {self.workers!r}: expected >= 0 (0 = one per core) and at most "
                f"{MAX_WORKERS}"
            )
        if self.batch < 1:
            raise ValueError(f"batch = {self.batch!r}: expected >= 1")
        if not 0 <= self.overlays <= MAX_OVERLAYS:
            raise ValueError(f"overlays = {self.overlays!r}: expected 0 to {MAX_OVERLAYS}")
        if not 0 <= self.gallery <= MAX_GALLERY:
            raise ValueError(f"gallery = {self.gallery!r}: expected 0 to {MAX_GALLERY}")
        s = self.scheduler
        if s not in ("threads", "processes", "synchronous") and not s.startswith("tcp://"):
            raise ValueError(
                f"scheduler = {s!r}: expected 'threads', 'processes', "
                "'synchronous' or an address 'tcp://HOST:PORT'"
            )
