"""ResNet-50/101 backbones in torchvision's parameter layout, dilated for segmentation.

The parameter names match torchvision's ``resnet50``/``resnet101`` state dicts (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so the ImageNet weight files that
users already have load directly (the classifier ``fc`` is ignored).
"""

from __future__ import annotations

import torch
from torch import nn


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


class ResNet(nn.Module):
    """A dilated ResNet trunk returning (low-level, high-level) features.

    Args:
        layers: blocks per stage, (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101.
        output_stride: 16 (layer4 dilated) or 8 (layer3 and layer4 dilated).

    Forward: float32 (B, 3, H, W) → (low (B, 256, H/4, W/4), high (B, 2048, H/os, W/os)).
    """

    low_channels = 256
    high_channels = 2048

    def __init__(self, layers: tuple[int, int, int, int], output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride = {output_stride}: expected 8 or 16")
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dil3 = 2 if output_stride == 8 else 1
        dil4 = 4 if output_stride == 8 else 2
        self.in_ch = 64
        self.layer1 = self._stage(64, layers[0], 1, 1)
        self.layer2 = self._stage(128, layers[1], 2, 1)
        self.layer3 = self._stage(256, layers[2], 1 if dil3 > 1 else 2, dil3)
        self.layer4 = self._stage(512, layers[3], 1, dil4)

    def _stage(self, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        mods = []
        for i in range(blocks):
            mods.append(Bottleneck(self.in_ch, width, stride if i == 0 else 1, dilation))
            self.in_ch = width * Bottleneck.expansion
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


def load_torchvision_weights(model: ResNet, path: str) -> None:
    """Load an ImageNet ResNet state dict in torchvision's layout (``fc.*`` is skipped).

    Raises:
        ValueError: a backbone key is missing or has another shape (names the first one).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"backbone key {key!r} missing from the weight file")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"backbone key {key!r} has shape {tuple(state[key].shape)}; "
                f"expected {tuple(value.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"weight file has key {extra[0]!r} that a ResNet does not have")
    model.load_state_dict(state, strict=True)
