"""Atomic file writes and image/label reading and writing shared by every stage.

Every file this project writes goes through a temporary name in the same folder followed by
``os.replace``, so a process killed at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_manifest.errors import UserError

cv2.setNumThreads(1)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    ``suffix`` defaults to ``path``'s own suffix so writers that pick a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.",
        suffix=(suffix if suffix is not None else path.suffix) + ".tmp",
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def printable_path(path: str | os.PathLike) -> str:
    """``path`` as text that can always be printed (bytes that are not UTF-8 as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_utf8_path(path: str | os.PathLike, what: str) -> None:
    """Refuse a path whose name is not UTF-8: every stage records its paths in TOML and JSON
    files, which hold text only.

    Raises:
        UserError: ``"<what> = <path>: the name is not valid UTF-8; expected ..."``.
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"{what} = {printable_path(path)}: the name is not valid UTF-8; expected a path "
            "in UTF-8 (the run's configs and reports record it as text)"
        ) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, suffix="") as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def not_found(path: Path) -> str:
    """Why ``path`` is not a file: ``"file not found"``, or a link to nothing."""
    if path.is_symlink():
        return "file is a symbolic link to nothing (a loop, or its target is gone)"
    return "file not found"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        uint8 array of shape (H, W, 3).
    Raises:
        UserError: the file is missing, unreadable or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image {not_found(path)}")
    buf = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise UserError(f"{path}: cannot decode image (corrupt, truncated or not an image)")
    if path.suffix.lower() in (".jpg", ".jpeg") and not _jpeg_complete(buf):
        raise UserError(f"{path}: truncated JPEG (no end-of-image marker)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _jpeg_complete(buf: np.ndarray) -> bool:
    # OpenCV decodes a truncated JPEG into a grey-padded image with only a warning.
    tail = buf[-64:].tobytes().rstrip(b"\x00")
    return tail.endswith(b"\xff\xd9")


# Lossless formats a label may be stored in; a lossy one (JPEG, WebP, JPEG 2000) changes class
# values where classes meet, so its "labels" are not the annotation
LOSSLESS_LABEL_FORMATS = ("PNG", "BMP", "TIFF", "GIF", "PPM")


def label_format_problem(im: Image.Image) -> str:
    """Why an opened (not yet decoded) label image cannot hold class indices ("" when it can):
    a lossy file format, or a mode other than palette ("P") or 8-bit greyscale ("L")."""
    fmt = im.format or "unknown"
    lossy = fmt not in LOSSLESS_LABEL_FORMATS or (
        fmt == "TIFF" and "jpeg" in str(im.info.get("compression", "")).lower()
    )
    if lossy:
        return (
            f"label is a {fmt} file, a lossy format that changes class values where classes "
            "meet; expected a lossless PNG of class indices (convert the original annotation, "
            "not this file)"
        )
    if im.mode not in ("P", "L"):
        return (
            f"label image has mode {im.mode!r}; expected a palette ('P') or 8-bit greyscale "
            "('L') PNG of class indices"
        )
    return ""


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as class indices, never through colour conversion.

    Palette ("P") images give their palette indices (VOC, our pseudo-labels); greyscale ("L")
    images give their values (ADE20K, Cityscapes labelTrainIds). Lossy formats (JPEG, WebP)
    are refused, whatever the file's name (see :func:`label_format_problem`).

    Returns:
        uint8 array of shape (H, W).
    Raises:
        UserError: missing, unreadable, truncated, lossy, or not a palette/greyscale 8-bit
            image.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: label {not_found(path)}")
    try:
        with Image.open(path) as im:
            problem = label_format_problem(im)
            if problem:
                raise UserError(f"{path}: {problem}")
            im.load()
            return np.asarray(im, dtype=np.uint8).copy()
    except UserError:
        raise
    except Exception as exc:  # Pillow raises several unrelated types for broken files
        raise UserError(f"{path}: cannot read label image ({exc})") from None


def encode_label_png(
    labels: np.ndarray, palette: Sequence[Sequence[int]], compress_level: int = 6
) -> bytes:
    """Encode class indices as a palette PNG (deterministic bytes for equal inputs).

    Args:
        labels: uint8 array (H, W) of class indices; 255 = ignore.
        palette: one (r, g, b) triple per class; index 255 is drawn white.
        compress_level: zlib level 0-9 (1 is ~2.5x faster than 6 for a few % more bytes).
    """
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D uint8 array, got {labels.dtype} {labels.shape}")
    flat = [0] * (256 * 3)
    for i, rgb in enumerate(palette[:255]):
        flat[3 * i : 3 * i + 3] = [int(c) for c in rgb]
    flat[255 * 3 : 256 * 3] = [255, 255, 255]
    im = Image.fromarray(labels, mode="P")
    im.putpalette(flat)
    import io as _io

    out = _io.BytesIO()
    im.save(out, format="PNG", optimize=False, compress_level=compress_level)
    return out.getvalue()


def write_label_png(
    path: str | os.PathLike,
    labels: np.ndarray,
    palette: Sequence[Sequence[int]],
    compress_level: int = 6,
) -> bool:
    """Write ``labels`` as a palette PNG atomically, unless identical bytes are already there.

    Returns:
        True when the file was (re)written, False when it already held these exact bytes.
    """
    data = encode_label_png(labels, palette, compress_level)
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Map class indices (H, W) uint8 to RGB (H, W, 3) uint8 with the palette; 255 is white."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: min(len(palette), 255)] = np.asarray(palette[:255], dtype=np.uint8)
    lut[255] = 255
    return lut[labels]
