"""Dilated ResNet-50/101 trunks for DeepLabV3+, in UniMatch's and torchvision's weight layouts.

Two stems, each matching the parameter names of the ImageNet files that users have:

* ``"deep"`` (ResNet-v1c, UniMatch's ``model/backbone/resnet.py``): three 3×3 convolutions
  ``conv1.0`` (3→64, stride 2), ``conv1.3`` (64→64), ``conv1.6`` (64→128) with batch norms
  ``conv1.1`` and ``conv1.4``, then ``bn1`` over 128 channels; ``layer1`` takes 128 channels.
  UniMatch's ``pretrained/resnet101.pth`` loads into it.
* ``"torchvision"``: one 7×7 convolution ``conv1`` (3→64, stride 2) and ``bn1``; torchvision's
  ``resnet50-*.pth`` / ``resnet101-*.pth`` load into it (old files without
  ``num_batches_tracked`` too).

Dilation follows ``replace_stride_with_dilation`` of torchvision and UniMatch: a dilated stage
keeps the previous dilation in its first block and dilates the others, so output stride 16 is
``[False, False, True]`` (layer4: 1, 2, 2) and 8 is ``[False, True, True]`` (layer3: 1, 2, ...;
layer4: 2, 4, 4). Bottlenecks are v1.5 (the stride sits on the 3×3 convolution).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

Stem = Literal["deep", "torchvision"]


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _deep_stem() -> nn.Sequential:
    """UniMatch's v1c stem; indices 2 and 5 are the ReLUs (no parameters), as upstream."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, 3, stride=1, padding=1, bias=False),
    )


class ResNet(nn.Module):
    """A dilated ResNet trunk returning (low-level, high-level) features.

    Args:
        layers: blocks per stage, (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101.
        output_stride: 16 (layer4 dilated) or 8 (layer3 and layer4 dilated).
        stem: "deep" (UniMatch's v1c) or "torchvision" (7×7), see the module docstring.

    Forward: float32 (B, 3, H, W) → (low (B, 256, H/4, W/4), high (B, 2048, H/os, W/os)).
    """

    low_channels = 256
    high_channels = 2048

    def __init__(
        self, layers: tuple[int, int, int, int], output_stride: int = 16, stem: Stem = "deep"
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride = {output_stride}: expected 8 or 16")
        if stem not in ("deep", "torchvision"):
            raise ValueError(f"stem = {stem!r}: expected 'deep' or 'torchvision'")
        self.stem = stem
        if stem == "deep":
            self.conv1: nn.Module = _deep_stem()
            self.in_ch = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.in_ch = 64
        self.bn1 = nn.BatchNorm2d(self.in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dilation = 1
        dilate3 = output_stride == 8
        self.layer1 = self._stage(64, layers[0], 1, False)
        self.layer2 = self._stage(128, layers[1], 2, False)
        self.layer3 = self._stage(256, layers[2], 2, dilate3)
        self.layer4 = self._stage(512, layers[3], 2, True)

    def _stage(self, width: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        mods = [Bottleneck(self.in_ch, width, stride, previous)]
        self.in_ch = width * Bottleneck.expansion
        mods += [Bottleneck(self.in_ch, width, 1, self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


def read_resnet_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An ImageNet ResNet state dict from a file, unwrapped: a ``state_dict`` or ``model``
    entry is taken, ``module.`` prefixes are stripped and the classifier ``fc.*`` dropped.

    Raises:
        ValueError: the file holds no state dict.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a ResNet state dict (expected parameter names → tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def detect_stem(state: dict[str, torch.Tensor]) -> Stem:
    """ "deep" for UniMatch's v1c layout (``conv1.0.weight``), "torchvision" for a 7×7
    ``conv1.weight``.

    Raises:
        ValueError: neither stem's first convolution is in ``state``.
    """
    if "conv1.0.weight" in state:
        return "deep"
    if "conv1.weight" in state:
        return "torchvision"
    raise ValueError(
        "no stem convolution in the weight file; expected conv1.0.weight (UniMatch's "
        "resnet101.pth, deep stem) or conv1.weight (torchvision's layout)"
    )


def load_resnet_weights(model: ResNet, state: dict[str, torch.Tensor]) -> None:
    """Copy an ImageNet state dict (see :func:`read_resnet_weights`) into ``model``.

    ``num_batches_tracked`` buffers may be absent (files saved before PyTorch 0.4.1);
    ``load_state_dict`` then starts them at 0, as it does for such files.

    Raises:
        ValueError: a key missing or of another shape, or a key the model does not have
            (names the first one).
    """
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise ValueError(f"backbone key {key!r} missing from the weight file")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"backbone key {key!r} has shape {tuple(state[key].shape)}; "
                f"expected {tuple(value.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"weight file has key {extra[0]!r} that this ResNet does not have")
    model.load_state_dict(state, strict=False)


def load_weight_file(model: ResNet, path: str | os.PathLike) -> None:
    """Load a weight file of either layout into ``model`` (whose stem must match it).

    Raises:
        ValueError: another stem than the model's, or any mismatch :func:`load_resnet_weights`
            reports.
    """
    state = read_resnet_weights(path)
    stem = detect_stem(state)
    if stem != model.stem:
        raise ValueError(f"the weight file has the {stem} stem; the model has the {model.stem} one")
    load_resnet_weights(model, state)
