"""DeepLabV3+ (Chen et al., 2018): ASPP on high-level features, a decoder fusing low-level ones."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_ch: int, out_ch: int, k: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches, image pooling.

    Forward: (B, in_ch, h, w) → (B, out_ch, h, w).
    """

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch, 1)] + [_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self.project = _conv_bn_relu(out_ch * (len(rates) + 2), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x)
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on any backbone whose forward returns (low, high) feature maps.

    The backbone must expose ``low_channels`` and ``high_channels``. Parameters of the backbone
    are ``backbone.*``; everything else is the head (``head_parameters``), which the trainer
    gives a higher learning rate. ``align_corners`` is that of both bilinear upsamplings
    (UniMatch's ``model/semseg/deeplabv3plus.py`` uses True; the EfficientNet-Lite0 demo False).

    Forward: float32 (B, 3, H, W) normalised images → logits float32 (B, num_classes, H, W);
    with ``need_fp`` also the logits of UniMatch's feature perturbation (see :meth:`forward`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        aspp_channels: int = 256,
        low_proj: int = 48,
        decoder_channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.align_corners = align_corners
        self.build_kwargs: dict[str, Any] = {}  # set by the builder (see train.models)
        self.aspp = ASPP(backbone.high_channels, aspp_channels, rates)
        self.reduce = _conv_bn_relu(backbone.low_channels, low_proj, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_proj, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(
        self, x: torch.Tensor, need_fp: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, H, W); with ``need_fp`` the pair ``(logits, logits_fp)``.

        ``logits_fp`` is UniMatch's feature perturbation (``model/semseg/deeplabv3plus.py``):
        the decoder also runs on the backbone's features after channel dropout (p 0.5, the
        low-level map first, then the high-level one, from torch's generator), in one pass
        over the clean and the dropped features together (its batch norms see both).
        """
        h, w = x.shape[-2:]
        low, high = self.backbone(x)
        if need_fp:
            low = torch.cat([low, F.dropout2d(low, 0.5, training=True)])
            high = torch.cat([high, F.dropout2d(high, 0.5, training=True)])
        out = self._decode(low, high)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=self.align_corners)
        return tuple(out.chunk(2)) if need_fp else out  # type: ignore[return-value]

    def _decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """(B, low_ch, h4, w4) and (B, high_ch, h16, w16) features → logits at stride 4."""
        high = self.aspp(high)
        ac = self.align_corners
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=ac)
        return self.classifier(self.fuse(torch.cat([self.reduce(low), high], dim=1)))

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (ASPP, decoder, classifier)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())
