"""Models of the train package: weight layouts, real ImageNet weights, output shapes."""

from __future__ import annotations

import _train_fixtures  # noqa: F401  (one thread per test process)
import numpy as np
import pytest
import torch

from train.models import BUILDERS, NORMALIZATION, build_model
from train.models.efficientnet_lite import EfficientNetLite0, load_lite0_weights
from train.models.resnet import ResNet, load_torchvision_weights

# Parameter counts of torchvision's resnet50 / resnet101 (ImageNet classifier included).
TORCHVISION_PARAMS = {(3, 4, 6, 3): 25_557_032, (3, 4, 23, 3): 44_549_160}
FC_PARAMS = 2048 * 1000 + 1000


@pytest.mark.parametrize("layers", [(3, 4, 6, 3), (3, 4, 23, 3)])
def test_resnet_has_torchvision_parameter_count(layers):
    model = ResNet(layers)
    n = sum(p.numel() for p in model.parameters())
    assert n + FC_PARAMS == TORCHVISION_PARAMS[layers]


def _torchvision_style_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ResNet-50 state dict with torchvision's names, fc included."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in ResNet((3, 4, 6, 3)).state_dict().items()
    }
    state["fc.weight"] = torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_resnet_loads_torchvision_layout_file(tmp_path):
    state = _torchvision_style_state()
    # names that torchvision's resnet50 uses, with their shapes
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_model("deeplabv3plus_r50", 4, pretrained=True, weights=str(path))
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    # a DataParallel-style "module." prefix loads too
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    load_torchvision_weights(ResNet((3, 4, 6, 3)), str(path))


def test_resnet_rejects_wrong_file(tmp_path):
    state = _torchvision_style_state()
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv1\.weight' has shape \(3, 3, 1, 1\)"):
        load_torchvision_weights(ResNet((3, 4, 6, 3)), str(path))
    with pytest.raises(ValueError, match="needs an ImageNet weight file"):
        build_model("deeplabv3plus_r101", 4, pretrained=True)


def test_efficientnet_lite0_loads_every_key_and_recognises_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    import cv2

    model = EfficientNetLite0(output_stride=32, classifier=True)
    load_lite0_weights(model)  # strict: every key of the published file, no extra
    assert len(model.state_dict()) == 296
    model.eval()
    img = cv2.resize(skimage_data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy((img.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        top = int(model.classify(x).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cat classes (tabby ... Egyptian cat)


def test_segmentation_backbone_takes_the_same_weights():
    full = EfficientNetLite0(output_stride=32, classifier=True)
    load_lite0_weights(full)
    seg = build_model("deeplabv3plus_effl0", 3)  # pretrained by default
    own = seg.backbone.state_dict()
    assert len(own) == 296 - 8  # all but _conv_head (1), _bn1 (5) and _fc (2)
    for key, value in own.items():
        assert torch.equal(value, full.state_dict()[key]), key


def test_efficientnet_lite0_feature_strides():
    model = EfficientNetLite0(output_stride=16).eval()
    with torch.no_grad():
        low, high = model(torch.zeros(1, 3, 64, 96))
    assert low.shape == (1, 24, 16, 24)
    assert high.shape == (1, 320, 4, 6)


@pytest.mark.parametrize("arch", ["deeplabv3plus_effl0", "deeplabv3plus_r50"])
def test_deeplab_output_at_input_resolution(arch):
    kwargs = {"aspp_channels": 16, "low_proj": 8, "decoder_channels": 16}
    model = build_model(arch, 5, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 37, 53))
    assert out.shape == (2, 5, 37, 53) and out.dtype == torch.float32
    head = {id(p) for p in model.head_parameters()}
    assert head.isdisjoint(id(p) for p in model.backbone_parameters())
    assert len(head) + len(model.backbone_parameters()) == len(list(model.parameters()))


def test_builder_dict_and_normalization_agree():
    assert set(BUILDERS) == set(NORMALIZATION)
    with pytest.raises(ValueError, match="arch = 'segformer': expected one of"):
        build_model("segformer", 3)
