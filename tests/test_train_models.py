"""Models of the train package: weight layouts, real ImageNet weights, output shapes."""

from __future__ import annotations

import json
import sys

import _train_fixtures  # noqa: F401  (one thread per test process)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _train_fixtures import save_tiny_mit

from train.models import BUILDERS, NORMALIZATION, build_model
from train.models.efficientnet_lite import EfficientNetLite0, load_lite0_weights
from train.models.resnet import ResNet, load_weight_file

R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)
# Parameter counts of torchvision's resnet50 / resnet101 (ImageNet classifier included).
TORCHVISION_PARAMS = {R50: 25_557_032, R101: 44_549_160}
FC_PARAMS = 2048 * 1000 + 1000


def _bn(prefix: str, ch: int, tracked: bool = True) -> dict[str, tuple[int, ...]]:
    keys = {f"{prefix}.{n}": (ch,) for n in ("weight", "bias", "running_mean", "running_var")}
    if tracked:
        keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def upstream_keys(layers: tuple[int, ...], stem: str, tracked: bool = True) -> dict:
    """Key → shape of the ImageNet files, written out from the upstream module definitions.

    "deep": UniMatch's model/backbone/resnet.py (LiheYoung/UniMatch): ``conv1`` is
    Sequential(conv 3→64 s2, BN, ReLU, conv 64→64, BN, ReLU, conv 64→128), ``bn1`` BN(128),
    ``inplanes`` 128, no ``fc``. "torchvision": torchvision/models/resnet.py: 7×7 ``conv1``
    3→64, ``bn1`` BN(64), ``fc`` 2048→1000. Bottleneck: conv1 1×1, conv2 3×3, conv3 1×1, bn1-3,
    ``downsample.0`` 1×1 conv + ``downsample.1`` BN on the first block of each stage.
    """
    keys: dict[str, tuple[int, ...]] = {}
    if stem == "deep":
        keys["conv1.0.weight"] = (64, 3, 3, 3)
        keys.update(_bn("conv1.1", 64, tracked))
        keys["conv1.3.weight"] = (64, 64, 3, 3)
        keys.update(_bn("conv1.4", 64, tracked))
        keys["conv1.6.weight"] = (128, 64, 3, 3)
        keys.update(_bn("bn1", 128, tracked))
        inplanes = 128
    else:
        keys["conv1.weight"] = (64, 3, 7, 7)
        keys.update(_bn("bn1", 64, tracked))
        keys["fc.weight"], keys["fc.bias"] = (1000, 2048), (1000,)
        inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for b in range(blocks):
            p = f"layer{i + 1}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            for j, ch in ((1, planes), (2, planes), (3, planes * 4)):
                keys.update(_bn(f"{p}.bn{j}", ch, tracked))
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4, tracked))
            inplanes = planes * 4
    return keys


def _random_state(keys: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
        for k, s in keys.items()
    }


@pytest.mark.parametrize("layers", [R50, R101])
def test_resnet_has_torchvision_parameter_count(layers):
    model = ResNet(layers, stem="torchvision")
    n = sum(p.numel() for p in model.parameters())
    assert n + FC_PARAMS == TORCHVISION_PARAMS[layers]


def test_deep_stem_parameter_count():
    """v1c = torchvision's count − fc − the 7×7 stem + three 3×3 convs and their BNs, with 128
    channels into layer1 (bn1 and layer1.0's conv1 and downsample grow)."""
    n = sum(p.numel() for p in ResNet(R101, stem="deep").parameters())
    stem = 64 * 3 * 9 + 64 * 64 * 9 + 128 * 64 * 9 + 2 * (2 * 64)
    growth = 2 * 64 + 64 * 64 + 256 * 64  # bn1 128 vs 64, conv1 and downsample from 128 ch
    assert n == TORCHVISION_PARAMS[R101] - FC_PARAMS - 64 * 3 * 49 + stem + growth


@pytest.mark.parametrize("stem", ["deep", "torchvision"])
def test_upstream_key_layouts_are_the_modules_own(stem):
    own = {k: tuple(v.shape) for k, v in ResNet(R101, stem=stem).state_dict().items()}
    upstream = upstream_keys(R101, stem)
    upstream.pop("fc.weight", None), upstream.pop("fc.bias", None)
    assert own == upstream


def test_unimatch_resnet101_file_loads(tmp_path):
    """UniMatch's pretrained/resnet101.pth layout (deep stem), as a DataParallel-saved file."""
    state = _random_state(upstream_keys(R101, "deep"))
    path = tmp_path / "resnet101.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = build_model("deeplabv3plus_r101", 21, weights=str(path))
    assert model.build_kwargs["stem"] == "deep" and model.backbone.stem == "deep"
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_torchvision_file_without_num_batches_tracked_loads(tmp_path):
    """Files saved before PyTorch 0.4.1 (e.g. resnet101-5d3b4d8f.pth) lack the counters."""
    state = _random_state(upstream_keys(R50, "torchvision", tracked=False))
    assert not any("num_batches_tracked" in k for k in state)
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(state, path)
    model = build_model("deeplabv3plus_r50", 4, weights=str(path))
    assert model.build_kwargs["stem"] == "torchvision"
    for key, value in model.backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == 0  # what load_state_dict gives such files
        else:
            assert torch.equal(value, state[key]), key
    # with the counters, as torchvision writes files today
    state = _random_state(upstream_keys(R50, "torchvision"))
    torch.save(state, path)
    backbone = ResNet(R50, stem="torchvision")
    load_weight_file(backbone, path)
    assert int(backbone.state_dict()["bn1.num_batches_tracked"]) == 7


def test_resnet_rejects_wrong_files(tmp_path):
    state = _random_state(upstream_keys(R50, "torchvision"))
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv1\.weight' has shape \(3, 3, 1, 1\)"):
        build_model("deeplabv3plus_r50", 4, weights=str(path))
    torch.save(_random_state(upstream_keys(R50, "deep")), path)
    with pytest.raises(ValueError, match="model_kwargs.stem = 'torchvision' but the weight file"):
        build_model("deeplabv3plus_r50", 4, weights=str(path), stem="torchvision")
    with pytest.raises(ValueError, match="the weight file has the deep stem; the model has"):
        load_weight_file(ResNet(R50, stem="torchvision"), path)
    with pytest.raises(ValueError, match="needs an ImageNet weight file"):
        build_model("deeplabv3plus_r101", 4, pretrained=True)


def _dilations(stage: torch.nn.Sequential) -> list[int]:
    return [block.conv2.dilation[0] for block in stage]


def test_resnet_dilation_is_unimatch_s():
    """replace_stride_with_dilation keeps the previous dilation in a stage's first block."""
    os16 = ResNet(R101, output_stride=16)
    assert _dilations(os16.layer3) == [1] * 23 and os16.layer3[0].conv2.stride == (2, 2)
    assert _dilations(os16.layer4) == [1, 2, 2] and os16.layer4[0].conv2.stride == (1, 1)
    os8 = ResNet(R50, output_stride=8)
    assert _dilations(os8.layer3) == [1, 2, 2, 2, 2, 2] and os8.layer3[0].conv2.stride == (1, 1)
    assert _dilations(os8.layer4) == [2, 4, 4]
    with torch.no_grad():
        low, high = os8.eval()(torch.zeros(1, 3, 64, 96))
    assert low.shape == (1, 256, 16, 24) and high.shape == (1, 2048, 8, 12)


def test_resnet_deeplab_upsamples_with_align_corners_like_unimatch():
    """The forward equals UniMatch's DeepLabV3Plus._decode + final upsampling (both
    ``align_corners=True``, model/semseg/deeplabv3plus.py), computed from the same modules."""
    kwargs = {"aspp_channels": 16, "low_proj": 8, "decoder_channels": 16}
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_r50", 5, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        c1, c4 = model.backbone(x)
        c4 = F.interpolate(model.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        out = model.classifier(model.fuse(torch.cat([model.reduce(c1), c4], dim=1)))
        ref = F.interpolate(out, size=(45, 61), mode="bilinear", align_corners=True)
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


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
    rebuilt = build_model(arch, 5, pretrained=False, **model.build_kwargs)
    rebuilt.load_state_dict(model.state_dict())  # build_kwargs rebuild the same network


def test_segformer_from_a_save_pretrained_folder(tmp_path):
    from transformers import SegformerForImageClassification

    folder = save_tiny_mit(tmp_path / "mit")
    encoder = SegformerForImageClassification.from_pretrained(folder).segformer.state_dict()
    model = build_model("segformer", 4, weights=str(folder)).eval()
    for key, value in model.model.segformer.state_dict().items():
        assert torch.equal(value, encoder[key]), key  # the encoder is the folder's
    with torch.no_grad():
        out = model(torch.randn(2, 3, 45, 61))
        quarter = model.model(pixel_values=torch.randn(1, 3, 45, 61)).logits
    assert out.shape == (2, 4, 45, 61) and out.dtype == torch.float32
    assert quarter.shape == (1, 4, 12, 16)  # transformers' logits come at 1/4 resolution
    head = {id(p) for p in model.head_parameters()}
    assert head.isdisjoint(id(p) for p in model.backbone_parameters())
    assert len(head) + len(model.backbone_parameters()) == len(list(model.parameters()))
    assert all(
        n.startswith("model.decode_head.") for n, p in model.named_parameters() if id(p) in head
    )
    # a checkpoint rebuilds it from build_kwargs alone (no folder)
    rebuilt = build_model("segformer", 4, pretrained=False, **model.build_kwargs).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_segformer_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="^folder not found; expected a folder written by"):
        build_model("segformer", 4, weights=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^no config.json in the folder"):
        build_model("segformer", 4, weights=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs backbone_weights = a folder"):
        build_model("segformer", 4)
    other = save_tiny_mit(tmp_path / "other")  # weights that do not fit their config.json
    config = json.loads((other / "config.json").read_text())
    config["hidden_sizes"][-1] = 48
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"encoder keys missing or of another shape \(first: "):
        build_model("segformer", 4, weights=str(other))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the [hf] extra were absent
    with pytest.raises(ImportError, match=r"^transformers is not installed; expected the \[hf\]"):
        build_model("segformer", 4, weights=str(tmp_path / "nope"))


def test_builder_dict_and_normalization_agree():
    assert set(BUILDERS) == set(NORMALIZATION)
    with pytest.raises(ValueError, match="arch = 'segformer_b9': expected one of"):
        build_model("segformer_b9", 3)
