"""Tiny datasets and caches for the calibrate tests (and the calibrate bench)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from annotate.cache import CacheMeta, create_or_open, resize_chw
from data_manifest import Manifest, Meta, Row
from data_manifest.io import write_label_png

CLASSES = ["background", "cat", "dog", "tree"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 200]]


def label_map(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """A blocky ground-truth map: background with a few rectangles, some ignore pixels."""
    lab = np.zeros((h, w), np.uint8)
    for _ in range(3):
        c = int(rng.integers(1, k))
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        lab[
            y0 : y0 + int(rng.integers(4, h // 2 + 5)), x0 : x0 + int(rng.integers(4, w // 2 + 5))
        ] = c
    lab[0, : w // 4] = 255
    return lab


def annotator_logits(
    rng: np.random.Generator, lab: np.ndarray, k: int, strength: float = 2.5, smooth: int = 1
) -> np.ndarray:
    """Annotator-like float32 logits (K, H, W): the true class gets a random margin, so the
    annotator is right on most pixels, unsure on some, wrong on a few. ``smooth`` > 1 draws
    the noise on a grid that many times coarser and resizes it (spatially smooth scores, like a
    real network's)."""
    h, w = lab.shape
    if smooth > 1:
        hs, ws = max(h // smooth, 2), max(w // smooth, 2)
        coarse = rng.normal(0.0, 1.0, size=(k, hs, ws)).astype(np.float32)
        logits = 1.5 * resize_chw(coarse, h, w)
        margin = 1.5 * resize_chw(rng.gamma(2.0, strength / 2.0, size=(1, hs, ws)), h, w)[0]
    else:
        logits = rng.normal(0.0, 1.0, size=(k, h, w)).astype(np.float32)
        margin = rng.gamma(2.0, strength / 2.0, size=(h, w))
    margin = margin.astype(np.float32)
    y = np.where(lab == 255, 0, lab).astype(np.int64)
    np.put_along_axis(logits, y[None], np.take_along_axis(logits, y[None], 0) + margin, 0)
    return logits


def make_dataset(
    root: Path,
    n_labeled: int = 6,
    n_unlabeled: int = 5,
    n_val: int = 3,
    h: int = 24,
    w: int = 32,
    seed: int = 0,
    cache_splits: tuple[str, ...] = ("labeled", "unlabeled", "val"),
    topk: int = 0,
    classes: list[str] | None = None,
    smooth: int = 1,
    native_scale: int = 1,
    strength: float = 2.5,
    write_images: bool = True,
) -> tuple[Path, Path]:
    """Write images, labels, a manifest and a cache under ``root``.

    ``smooth``, ``strength``: see :func:`annotator_logits`; ``native_scale`` > 1 stores every
    image's scores at that many times less resolution (an annotator with a coarser output,
    resolution "native"). The same seed gives the same scores whatever ``topk``.
    ``write_images`` False writes no image files (calibrate reads them only for plots).

    Returns:
        (manifest path, cache path).
    """
    classes = classes or CLASSES
    k = len(classes)
    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled), ("val", n_val)):
        for i in range(n):
            iid = f"{split[:3]}{i:03d}" if split != "unlabeled" or i % 2 else f"sub u{i:03d}"
            img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
            img_rel = f"images/{iid}.png"
            if write_images:
                Image.fromarray(img).save(root / img_rel)
            lab = label_map(rng, h, w, k)
            labels[iid] = lab
            lab_rel = None
            if split != "unlabeled":
                lab_rel = f"labels/{iid}.png"
                write_label_png(root / lab_rel, lab, PALETTE[:k] + [[9, 9, 9]] * (k - 4))
            rows.append(Row(id=iid, image=img_rel, label=lab_rel, split=split, height=h, width=w))
    m = Manifest(
        meta=Meta(
            dataset="tiny",
            classes=list(classes),
            palette=(PALETTE + [[9, 9, 9]] * k)[:k],
            background_index=0,
        ),
        rows=rows,
    )
    mpath = m.save(root / "manifest.jsonl")
    cpath = root / "cache.zarr"
    writer = create_or_open(
        cpath,
        CacheMeta(
            classes=tuple(classes),
            annotator="synthetic",
            model_sha256="0" * 64,
            manifest_fingerprint=m.fingerprint,
            normalization="softmax",
            topk=topk,
        ),
    )
    for r in rows:
        if r.split in cache_splits:
            logits = annotator_logits(rng, labels[r.id], k, strength, smooth)
            if native_scale > 1:
                logits = resize_chw(logits, h // native_scale, w // native_scale)
            writer.write(r.id, logits, h, w, topk=r.split == "unlabeled")
    return mpath, cpath
