"""Tiny datasets written in the exact layouts the data_manifest builders read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_manifest.io import encode_label_png
from data_manifest.layouts import voc_colormap


def write_jpg(path: Path, h: int, w: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def write_png_image(path: Path, h: int, w: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def label_array(h: int, w: int, k: int, seed: int = 0) -> np.ndarray:
    """Class indices in [0, k) with a 255 border row: uint8 (h, w)."""
    lab = np.random.default_rng(seed).integers(0, k, (h, w)).astype(np.uint8)
    lab[0] = 255
    return lab


def write_palette_label(path: Path, lab: np.ndarray, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_label_png(lab, voc_colormap(k)))


def write_grey_label(path: Path, lab: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lab, mode="L").save(path)


def make_voc(root: Path, train=("a1", "a2"), val=("v1",), rest=("u1",), sbd=("s1", "s2")) -> Path:
    """VOC2012 layout: JPEGImages, SegmentationClass, ImageSets/Segmentation, and an SBD folder
    SegmentationClassAug holding labels for train + val + ``sbd`` ids. Image i is 6 x (8+i)."""
    for n, i in enumerate([*train, *val, *rest, *sbd]):
        write_jpg(root / "JPEGImages" / f"{i}.jpg", 6, 8 + n, seed=n)
        lab = label_array(6, 8 + n, 21, seed=n)
        if i in train or i in val:
            write_palette_label(root / "SegmentationClass" / f"{i}.png", lab, 21)
        if i not in rest:
            write_palette_label(root / "SegmentationClassAug" / f"{i}.png", lab, 21)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(i + "\n" for i in train))
    (sets / "val.txt").write_text("".join(i + "\n" for i in val))
    return root


def make_ade(root: Path) -> Path:
    """ADEChallengeData2016 layout: two training and one validation image, labels 0-150."""
    for n, (sub, name) in enumerate(
        [
            ("training", "ADE_train_00000001"),
            ("training", "ADE_train_00000002"),
            ("validation", "ADE_val_00000001"),
        ]
    ):
        write_jpg(root / "images" / sub / f"{name}.jpg", 7, 9, seed=n)
        lab = np.random.default_rng(n).integers(0, 151, (7, 9)).astype(np.uint8)
        lab[0, 0], lab[0, 1] = 0, 150
        write_grey_label(root / "annotations" / sub / f"{name}.png", lab)
    return root


def make_cityscapes(root: Path) -> Path:
    """leftImg8bit/ + gtFine/ with *_gtFine_labelTrainIds.png, two cities."""
    items = [
        ("train", "aachen", "aachen_000000_000019"),
        ("train", "bremen", "bremen_000001_000019"),
        ("val", "frankfurt", "frankfurt_000000_000294"),
    ]
    for n, (sub, city, stem) in enumerate(items):
        write_png_image(root / "leftImg8bit" / sub / city / f"{stem}_leftImg8bit.png", 5, 10, n)
        lab = label_array(5, 10, 19, seed=n)
        write_grey_label(root / "gtFine" / sub / city / f"{stem}_gtFine_labelTrainIds.png", lab)
        # the other gtFine files exist too and must be ignored
        write_grey_label(root / "gtFine" / sub / city / f"{stem}_gtFine_labelIds.png", lab)
    return root


def make_folder(root: Path) -> Path:
    """images/ (with a sub-folder), labels/ for some, classes.txt with colours."""
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background 0 0 0\nroad 10 20 30\n# comment\ncar 1 2 3\n")
    for n, rel in enumerate(["x1", "x2", "sub/x3", "x4"]):
        write_png_image(root / "images" / f"{rel}.png", 4, 4 + n, seed=n)
        if rel != "x4":
            write_palette_label(root / "labels" / f"{rel}.png", label_array(4, 4 + n, 3, n), 3)
    return root
