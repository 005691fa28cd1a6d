"""Small pieces shared by the annotator backends and the registry (``annotate.annotators``).

They live here, not in the registry, because the registry imports the backends: a backend that
imported them from the registry would close an import circle.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors that quote a library's complaint."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_folder(path: str | os.PathLike) -> str:
    """Hex sha256 over the relative names and sha256 of every file below ``path``."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def resize_images(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize uint8 (B, 3, H, W) images to float32 (B, 3, *size) with the 0-255 values rounded,
    as an image library resizing uint8 pixels does (antialiased when shrinking, like PIL)."""
    import torch.nn.functional as F

    x = images.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("nearest", "nearest-exact"):
        return F.interpolate(x, size=size, mode=mode)
    x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255)
