"""Training augmentation, as UniMatch's ``dataset/transform.py`` and ``dataset/semi.py`` do it.

* :func:`weak`: random rescale (the long side drawn as an integer in ``[scale_min, scale_max]``
  × the image's long side; image PIL-bilinear, anti-aliased when shrinking; label PIL-nearest),
  pad to ``crop`` (image 0, label 255), random crop, horizontal flip.
* :func:`strong`: colour jitter (p 0.8), greyscale (p 0.2), Gaussian blur (p 0.5), on top of
  the weak view (image only).
* :func:`cutmix_box`: UniMatch's ``obtain_cutmix_box``: with probability ``prob`` a box of
  2-40 % of the crop, aspect ratio uniform in [0.3, 1/0.3], placed by rejection so that it fits.
* :func:`paste`: CutMix, the box of each sample taken from the CutMix source batch.

Every random draw comes from the ``numpy.random.Generator`` passed in, which the dataset seeds
from (seed, stream, position[, draw]), so a sample is a pure function of its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

IGNORE = 255


@dataclass(frozen=True)
class Augment:
    """Augmentation settings of one stream.

    ``strong_views``: strongly augmented copies of the weak view, each with its own CutMix box
    (0: weak only; 1: FixMatch; 2: UniMatch). ``cutmix_prob``: probability of a box per view.
    """

    crop: int
    scale_min: float = 0.5
    scale_max: float = 2.0
    strong_views: int = 0
    cutmix_prob: float = 0.5


def rescale(image: np.ndarray, label: np.ndarray, long_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so that the long side is ``long_side`` px, the short side rounded as UniMatch's
    ``resize`` rounds it. Image: PIL bilinear (a filter as wide as the scale factor when
    shrinking, so no aliasing); label: PIL nearest (centre-aligned, like the image).

    Shapes: image uint8 (H, W, 3), label uint8 (H, W) → the same dtypes at the new size.
    """
    h, w = label.shape
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    size = (max(1, ow), max(1, oh))
    image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.array(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def weak(
    image: np.ndarray, label: np.ndarray, aug: Augment, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The weak view: rescale, pad, crop ``aug.crop``², flip. Shapes: uint8 (H, W, 3) and
    uint8 (H, W) → uint8 (crop, crop, 3) and uint8 (crop, crop), 255 on the padding."""
    long = max(label.shape)
    lo = max(1, int(long * aug.scale_min))
    hi = max(lo, int(long * aug.scale_max))
    image, label = rescale(image, label, int(rng.integers(lo, hi, endpoint=True)))
    h, w = label.shape
    ph, pw = max(aug.crop - h, 0), max(aug.crop - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    h, w = label.shape
    left = int(rng.integers(0, w - aug.crop, endpoint=True))
    top = int(rng.integers(0, h - aug.crop, endpoint=True))
    image = image[top : top + aug.crop, left : left + aug.crop]
    label = label[top : top + aug.crop, left : left + aug.crop]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def strong(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter (p 0.8: brightness, contrast, saturation in [0.5, 1.5], hue in ±0.25, in
    random order), greyscale (p 0.2), Gaussian blur (p 0.5, σ in [0.1, 2]): the photometric
    changes of UniMatch's strong view. uint8 (H, W, 3) RGB → uint8 (H, W, 3)."""
    img = image.astype(np.float32)
    if rng.random() < 0.8:
        ops = rng.permutation(4)
        b, c, s = (rng.uniform(0.5, 1.5) for _ in range(3))
        hue = rng.uniform(-0.25, 0.25)
        for op in ops:
            if op == 0:
                img = img * b
            elif op == 1:
                grey = (img @ _GREY).mean()
                img = (img - grey) * c + grey
            elif op == 2:
                grey = img @ _GREY
                img = (img - grey[..., None]) * s + grey[..., None]
            else:
                hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
                shifted = (hsv[..., 0].astype(np.int16) + int(hue * 180)) % 180
                hsv[..., 0] = shifted.astype(np.uint8)
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
            img = np.clip(img, 0, 255)
    if rng.random() < 0.2:
        img = np.repeat((img @ _GREY)[..., None], 3, axis=2)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.1, 2.0))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def cutmix_box(size: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    """A CutMix box for a ``size``² crop, drawn as UniMatch's ``obtain_cutmix_box``: none with
    probability 1 − ``prob``; else an area uniform in [0.02, 0.4]·size², then aspect ratios
    r uniform in [0.3, 1/0.3] (width √(area/r), height √(area·r), truncated) and top-left
    corners uniform over the crop until the box fits. Returns bool (size, size), True inside.

    The draws are in upstream's order (the gate, the area, then per attempt the ratio, x, y),
    so a generator shared with upstream's ``random``/``np.random`` calls gives the same boxes.
    """
    box = np.zeros((size, size), dtype=bool)
    if rng.random() > prob:
        return box
    area = rng.uniform(0.02, 0.4) * size * size
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if x + w <= size and y + h <= size:
            break
    box[y : y + h, x : x + w] = True
    return box


def paste(images: torch.Tensor, source: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """CutMix: ``images`` with each sample's box taken from the same sample of ``source``.

    Shapes: images and source (B, C, H, W) (or (B, H, W) for targets), box bool (B, H, W).
    Returns a new tensor; the inputs are unchanged.
    """
    mask = box if images.dim() == 3 else box[:, None].expand_as(images)
    return torch.where(mask, source, images)
