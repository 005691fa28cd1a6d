"""What the annotate benches share: the data set and the annotator they run on.

The data set is the demo's target domain (generated from ``configs/demo.toml`` if absent). The
annotator is the demo annotator ``data/demo/annotator/best.pt`` when it exists; otherwise the
same architecture (DeepLabV3+ on EfficientNet-Lite0 with its ImageNet backbone weights and an
untrained head) saved as a trainer checkpoint in a temporary folder, so the forward cost is the
real one even before the demo annotator is trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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

    from train.inference import checkpoint_info
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
