"""Atomic writes and label PNG reading/writing (data_manifest/io.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_manifest.errors import UserError
from data_manifest.io import (
    atomic_path,
    atomic_write_text,
    colorize,
    encode_label_png,
    read_image,
    read_label_png,
    write_label_png,
)

PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_label_png_round_trip_is_palette_and_deterministic(tmp_path):
    lab = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)
    path = tmp_path / "a" / "x.png"
    assert write_label_png(path, lab, PALETTE) is True
    assert write_label_png(path, lab, PALETTE) is False  # same bytes: not rewritten
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.getpalette()[3:6] == [128, 0, 0]
    np.testing.assert_array_equal(read_label_png(path), lab)
    assert path.read_bytes() == encode_label_png(lab, PALETTE)


def test_colorize_maps_ignore_to_white():
    lab = np.array([[1, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(colorize(lab, PALETTE), [[[128, 0, 0], [255, 255, 255]]])


def test_read_label_rejects_rgb(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(UserError, match="mode 'RGB'; expected a palette"):
        read_label_png(path)


def test_read_image_errors(tmp_path):
    with pytest.raises(UserError, match="image file not found"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot decode image"):
        read_image(bad)
    import cv2

    ok = tmp_path / "ok.jpg"
    cv2.imwrite(str(ok), np.full((16, 16, 3), 90, np.uint8))
    rgb = read_image(ok)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(ok.read_bytes()[:-40])
    with pytest.raises(UserError, match="truncated JPEG|cannot decode"):
        read_image(cut)
