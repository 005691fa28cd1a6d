"""Tiny datasets and configs for the train tests: coloured shapes on noisy backgrounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_manifest.io import encode_label_png
from data_manifest.manifest import Manifest, Meta, Row

CLASSES = ["background", "red", "blue"]
PALETTE = [[0, 0, 0], [200, 30, 30], [30, 30, 200]]
# Two cores are shared by several test processes: one thread each avoids OpenMP contention.
torch.set_num_threads(1)
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_MODEL = {"aspp_channels": 16, "low_proj": 8, "decoder_channels": 16}


def _sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
    lab = np.zeros((size, size), np.uint8)
    for cls in (1, 2):
        h, w = rng.integers(size // 4, size // 2, 2)
        top, left = rng.integers(0, size - h), rng.integers(0, size - w)
        lab[top : top + h, left : left + w] = cls
    for cls in (1, 2):
        img[lab == cls] = np.array(PALETTE[cls]) + rng.integers(-20, 20, 3)
    return img, lab


def make_dataset(
    root: Path,
    n_labeled: int = 4,
    n_unlabeled: int = 6,
    n_val: int = 2,
    size: int = 32,
    seed: int = 0,
    pseudo_dir: Path | None = None,
) -> Path:
    """Write a VOC-style tiny dataset (and pseudo-labels = GT with a few ignored pixels).

    Returns the manifest path.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled), ("val", n_val)):
        for i in range(n):
            iid = f"{split}_{i:03d}"
            img, lab = _sample(rng, size)
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.png")
            label_rel = None
            if split != "unlabeled":
                label_rel = f"SegmentationClass/{iid}.png"
                (root / label_rel).write_bytes(encode_label_png(lab, PALETTE))
            elif pseudo_dir is not None:
                pseudo = lab.copy()
                pseudo[:2] = 255
                pseudo_dir.mkdir(parents=True, exist_ok=True)
                (pseudo_dir / f"{iid}.png").write_bytes(encode_label_png(pseudo, PALETTE))
            rows.append(Row(iid, f"JPEGImages/{iid}.png", label_rel, split, size, size))
    meta = Meta(
        dataset="tiny",
        classes=list(CLASSES),
        palette=[list(p) for p in PALETTE],
        background_index=0,
    )
    path = root / "manifest.jsonl"
    Manifest(meta=meta, rows=rows).save(path)
    return path


def write_config(path: Path, run_dir: Path, **train: object) -> Path:
    """A run config with a tiny, fast [train] section; ``train`` overrides keys (None
    leaves a key out)."""
    keys: dict[str, object] = {
        "arch": "deeplabv3plus_effl0",
        "pretrained": False,
        "model_kwargs": TINY_MODEL,
        "length_unit": "iters",
        "stage1_length": 4,
        "stage2_length": 2,
        "batch_size": 2,
        "crop": 32,
        "scale_min": 0.75,
        "scale_max": 1.25,
        "lr": 0.01,
        "workers": 0,
        "eval_every": 3,
        "device": "cpu",
    }
    keys.update(train)

    def val(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = [f'run_dir = "{run_dir}"', "seed = 3", "", "[train]"]
    lines += [f"{k} = {val(v)}" for k, v in keys.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


# A tiny MiT encoder, saved the way nvidia/mit-b5 is published: an image-classification
# checkpoint ("architectures": ["SegformerForImageClassification"], keys segformer.* +
# classifier.*) whose encoder SegformerForSemanticSegmentation takes (transformers'
# models/segformer/modeling_segformer.py). MiT-B5 itself: depths [3, 6, 40, 3], hidden sizes
# [64, 128, 320, 512], heads [1, 2, 5, 8].
TINY_SEGFORMER = {
    "depths": [1, 1, 1, 1],
    "hidden_sizes": [8, 16, 24, 32],
    "num_attention_heads": [1, 1, 2, 2],
    "decoder_hidden_size": 16,
    "num_labels": 10,
}


def save_tiny_mit(folder: Path, seed: int = 0) -> Path:
    """Write a random tiny MiT classification checkpoint with ``save_pretrained``."""
    from transformers import SegformerConfig, SegformerForImageClassification

    torch.manual_seed(seed)
    SegformerForImageClassification(SegformerConfig(**TINY_SEGFORMER)).save_pretrained(folder)
    return folder
