"""What the annotate benches share: the data sets, the annotators and a sampling profiler.

The demo data set is the demo's target domain (generated from ``configs/demo.toml`` if absent).
Its annotator is the demo annotator ``data/demo/annotator/best.pt`` when it exists; otherwise
the same architecture (DeepLabV3+ on EfficientNet-Lite0 with its ImageNet backbone weights and
an untrained head) saved as a trainer checkpoint in a temporary folder, so the forward cost is
the real one even before the demo annotator is trained.

The VOC-size data set is synthetic: JPEG photographs-like images (smooth colour fields plus
texture) at a user's resolution, all in the unlabeled split, and a 1x1 convolution or a
DeepLabV3+ ResNet-101 with random weights as the annotator.

The project root is appended to ``sys.path`` (not put first), so that a ``PYTHONPATH`` given
to a bench process decides which copy of the project it measures (``--baseline``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import data_manifest  # noqa: E402
from annotate.config import DEMO_MODEL  # noqa: E402
from data_manifest.config import load_config  # noqa: E402


def demo_manifest(config: str | Path = ROOT / "configs" / "demo.toml") -> data_manifest.Manifest:
    """The demo target manifest (generated first if absent)."""
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    try:
        path = data_manifest.resolve_manifest(load_config(config))
        return data_manifest.load(path)
    finally:
        os.chdir(cwd)


def annotator_checkpoint(
    classes: list[str], palette: list[list[int]], tmp: Path
) -> tuple[Path, str]:
    """(checkpoint path, description): the demo annotator, or a stand-in of its architecture."""
    demo = ROOT / DEMO_MODEL
    if demo.is_file():
        return demo, "demo annotator (data/demo/annotator/best.pt)"
    import torch

    from train.checkpoint import checkpoint_info
    from train.models import build_model

    torch.manual_seed(0)
    net = build_model("deeplabv3plus_effl0", len(classes), pretrained=True).eval()
    path = tmp / "effl0.pt"
    torch.save(
        {
            "model": net.state_dict(),
            "info": checkpoint_info("deeplabv3plus_effl0", classes, palette),
        },
        path,
    )
    return path, "deeplabv3plus_effl0, ImageNet backbone + untrained head (no demo annotator yet)"


def synthetic_dataset(
    root: Path, images: int, width: int, height: int, classes: int, seed: int = 0
) -> Path:
    """Write ``images`` JPEGs of ``width`` x ``height`` and a manifest (all unlabeled).

    The images are smooth random colour fields with fine texture, so that JPEG decoding costs
    what it costs on photographs of that size (VOC: 500x375, quality 90).
    """
    import cv2
    import numpy as np

    from data_manifest import Manifest, Meta, Row

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.integers(-12, 13, img.shape)
        img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        rel = f"images/{i:06d}.jpg"
        cv2.imwrite(str(root / rel), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows.append(Row(f"{i:06d}", rel, None, "unlabeled", height, width))
    names = [f"class{c:03d}" for c in range(classes)]
    palette = [[(37 * c) % 256, (91 * c) % 256, (151 * c) % 256] for c in range(classes)]
    meta = Meta(dataset="synthetic", classes=names, palette=palette, background_index=0)
    return Manifest(meta=meta, rows=rows).save(root / "manifest.jsonl")


def conv1x1_model(path: Path, classes: list[str], seed: int = 0) -> tuple[Path, str]:
    """A TorchScript 1x1 convolution (3 -> K channels) at full resolution: the pipeline's
    ceiling, since the model costs almost nothing."""
    import json

    import torch

    torch.manual_seed(seed)
    net = torch.jit.script(torch.nn.Conv2d(3, len(classes), 1).eval())
    meta = {"classes": classes, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    torch.jit.save(net, str(path), _extra_files={"annotator.json": json.dumps(meta)})
    return path, f"1x1 conv, 3 -> {len(classes)} channels (TorchScript)"


def r101_model(path: Path, classes: list[str], palette: list[list[int]], seed: int = 0):
    """DeepLabV3+ ResNet-101 (output stride 16) with random weights, as a trainer checkpoint."""
    import torch

    from train.checkpoint import checkpoint_info
    from train.models import build_model

    torch.manual_seed(seed)
    net = build_model("deeplabv3plus_r101", len(classes), pretrained=False).eval()
    info = checkpoint_info("deeplabv3plus_r101", classes, palette)
    torch.save({"model": net.state_dict(), "info": info}, path)
    return path, "DeepLabV3+ ResNet-101, random weights (trainer checkpoint)"


_IDLE_FILES = ("threading.py", "queue.py", "selectors.py", "thread.py", "_base.py")


class Sampler:
    """A sampling profiler over every thread: where each busy thread is, every ``interval``.

    Each sample takes every other thread's innermost Python frame; threads waiting in
    ``threading``/``queue``/``concurrent.futures`` are idle and not counted. Work in C (numpy,
    torch, zstd) is attributed to the Python function that called it. Seconds are samples
    times the interval, so they add up over threads (they can exceed the wall time).
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.counts: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                code = frame.f_code
                if ident == me or Path(code.co_filename).name in _IDLE_FILES:
                    continue
                role = names.get(ident, "?").rsplit("_", 1)[0]
                where = f"{Path(code.co_filename).name}:{code.co_name}"
                self.counts[(role, where)] += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 15) -> list[dict[str, Any]]:
        """The ``n`` busiest (thread, function) pairs: seconds and share of all busy samples."""
        total = sum(self.counts.values()) or 1
        return [
            {
                "thread": role,
                "function": where,
                "seconds": round(c * self.interval, 3),
                "share": round(c / total, 4),
            }
            for (role, where), c in self.counts.most_common(n)
        ]


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
