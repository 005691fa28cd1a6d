"""Checkpoint round-trip and prediction helpers of the train package."""

from __future__ import annotations

import pytest
import torch

from data_manifest.errors import UserError
from train.checkpoint import checkpoint_info, save_checkpoint
from train.inference import load_checkpoint_model, predict_logits
from train.models import build_model

TINY = {"aspp_channels": 16, "low_proj": 8, "decoder_channels": 16}
CLASSES = ["background", "a", "b"]
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]


def _tiny(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("deeplabv3plus_effl0", num_classes, pretrained=False, **TINY).eval()


def test_load_checkpoint_model_round_trip(tmp_path):
    model = _tiny()
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        model,
        checkpoint_info("deeplabv3plus_effl0", CLASSES, PALETTE, TINY, iteration=7, miou=0.5),
    )
    loaded, info = load_checkpoint_model(path)
    assert not loaded.training
    assert info["classes"] == CLASSES and info["arch"] == "deeplabv3plus_effl0"
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]
    assert info["iteration"] == 7 and info["miou"] == 0.5
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = model(x)
        got = loaded(x)
    assert got.shape == (2, 3, 40, 56)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # readable with weights_only=True by anyone
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "info"}


def test_checkpoint_of_other_class_count_is_rejected(tmp_path):
    model = _tiny(num_classes=5)
    path = tmp_path / "x.pt"
    info = checkpoint_info("deeplabv3plus_effl0", CLASSES, PALETTE, TINY)  # says 3 classes
    save_checkpoint(path, model, info)
    with pytest.raises(
        UserError,
        match=r"x\.pt: weights do not fit arch 'deeplabv3plus_effl0' "
        r"with 3 classes",
    ):
        load_checkpoint_model(path)


def test_checkpoint_of_unknown_arch_and_garbage_rejected(tmp_path):
    model = _tiny()
    path = tmp_path / "y.pt"
    info = checkpoint_info("deeplabv3plus_effl0", CLASSES, PALETTE, TINY)
    info["arch"] = "segformer_b9"
    save_checkpoint(path, model, info)
    with pytest.raises(UserError, match=r"y\.pt: info\.arch = 'segformer_b9'; expected one of"):
        load_checkpoint_model(path)
    bad = tmp_path / "z.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"z\.pt: cannot read checkpoint"):
        load_checkpoint_model(bad)
    with pytest.raises(UserError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint_model(tmp_path / "missing.pt")


def test_sliding_window_equals_whole_image_when_image_fits_one_window():
    model = _tiny()
    x = torch.randn(1, 3, 48, 64)
    whole = predict_logits(model, x, "whole")
    sliding = predict_logits(model, x, "sliding", crop=64, stride=32)
    torch.testing.assert_close(sliding, whole, rtol=0, atol=0)


def test_sliding_window_averages_overlaps():
    """With a per-pixel model, sliding-window logits equal whole-image logits exactly."""

    class PerPixel(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :1] * 2.0, x[:, 1:2] - 1.0], dim=1)

    x = torch.randn(2, 3, 50, 77)
    out = predict_logits(PerPixel(), x, "sliding", crop=32, stride=20)
    torch.testing.assert_close(out, PerPixel()(x))
