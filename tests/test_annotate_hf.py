"""The ``hf`` backend with tiny randomly initialised transformers models saved to tmp folders,
their image processors saved beside them (transformers' PIL-backend processors, which also
serve as the independent reference for the preprocessing), on non-square images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _annotate_fixtures import make_dataset, write_config

import data_manifest
from annotate import open_cache
from annotate.common import IMAGENET_MEAN
from annotate.config import AnnotateConfig
from annotate.hf import NO_PROMPT, Preprocessing, load_hf_annotator, read_preprocessing
from annotate.run import run_annotation
from data_manifest.errors import UserError

transformers = pytest.importorskip("transformers")
from transformers.models.mask2former import image_processing_pil_mask2former as m2f_proc  # noqa: E402
from transformers.models.oneformer import image_processing_pil_oneformer as oneformer_proc  # noqa: E402
from transformers.models.segformer import image_processing_pil_segformer as segformer_proc  # noqa: E402
from transformers.models.vit import image_processing_pil_vit as vit_proc  # noqa: E402

MEAN, STD = [0.45, 0.4, 0.35], [0.2, 0.22, 0.24]
LABELS = {0: "wall", 1: "cat", 2: "dog", 3: "sky"}
SIZES = [(45, 70), (45, 70), (61, 38), (61, 38)]  # non-square, both orientations
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _save(model, folder, processor=None):
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def _pixels(processor, imgs):
    """transformers' own preprocessing (PIL backend): float32 (B, 3, h, w)."""
    return processor(images=list(imgs), return_tensors="pt")["pixel_values"]


def _batch(imgs):
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    man = make_dataset(root / "ds", 2, 2, 0, sizes=SIZES)
    return root, data_manifest.load(man)


def _annotator(folder, m, **kw):
    return load_hf_annotator(AnnotateConfig(annotator="hf", model=str(folder), **kw), m)


def _close(got, want, rel=0.02):
    """Outputs from inputs that differ by at most one grey level (torch's resize against PIL's):
    mean error within ``rel`` of the mean magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() <= rel * np.abs(want).mean() + 1e-6


# -- models and processors --------------------------------------------------------------------


def _segformer():
    torch.manual_seed(0)
    conf = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 1],
        patch_sizes=[7, 3],
        strides=[4, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=4,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    return transformers.SegformerForSemanticSegmentation(conf).eval()


def _swin():
    return transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def _mask2former():
    torch.manual_seed(0)
    conf = transformers.Mask2FormerConfig(
        backbone_config=_swin(),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=16,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=1,
        dim_feedforward=16,
        num_queries=5,
        num_labels=4,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    return transformers.Mask2FormerForUniversalSegmentation(conf).eval()


def _word_tokenizer(words):
    """A tiny word-level tokenizer (offline stand-in for the model's own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


CLIP_WORDS = ["[PAD]", "[UNK]", "background", "cat", "dog", "kitten", "sky"]


def _clipseg():
    torch.manual_seed(0)
    conf = transformers.CLIPSegConfig(
        text_config={
            "vocab_size": len(CLIP_WORDS),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "max_position_embeddings": 8,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
        extract_layers=[1, 2],
        reduce_dim=8,
        decoder_num_attention_heads=1,
        decoder_intermediate_size=8,
    )
    return transformers.CLIPSegForImageSegmentation(conf).eval()


@pytest.fixture(scope="module")
def segformer(data):
    root, _ = data
    net = _segformer()
    proc = segformer_proc.SegformerImageProcessorPil(
        size={"height": 64, "width": 48}, image_mean=MEAN, image_std=STD
    )
    return net, proc, _save(net, root / "segformer", proc)


@pytest.fixture(scope="module")
def clipseg(data):
    root, _ = data
    net = _clipseg()
    proc = vit_proc.ViTImageProcessorPil(
        size={"height": 48, "width": 48}, image_mean=MEAN, image_std=STD
    )
    folder = _save(net, root / "clipseg", proc)
    _word_tokenizer(CLIP_WORDS).save_pretrained(folder)
    return net, proc, folder


# -- preprocessing: geometry and pixel values as transformers' processors -------------------


@pytest.mark.parametrize(
    ("processor", "kwargs"),
    [
        (segformer_proc.SegformerImageProcessorPil, {"size": {"height": 64, "width": 48}}),
        (segformer_proc.SegformerImageProcessorPil, {"size": {"shortest_edge": 40}}),
        (
            m2f_proc.Mask2FormerImageProcessorPil,
            {"size": {"shortest_edge": 64, "longest_edge": 96}, "size_divisor": 32},
        ),
        (m2f_proc.Mask2FormerImageProcessorPil, {}),
        (oneformer_proc.OneFormerImageProcessorPil, {"size": {"shortest_edge": 50}}),
        (vit_proc.ViTImageProcessorPil, {"size": {"height": 352, "width": 352}}),
        (vit_proc.ViTImageProcessorPil, {"do_resize": False, "do_normalize": False}),
    ],
)
def test_preprocessing_equals_the_image_processor(tmp_path, processor, kwargs):
    proc = processor(**kwargs)
    proc.save_pretrained(tmp_path)
    pre = read_preprocessing(tmp_path)
    rng = np.random.default_rng(0)
    for h, w in [(45, 70), (70, 45), (375, 500), (500, 375), (64, 64), (33, 400)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = _pixels(proc, [img])
        assert pre.output_size(h, w) == tuple(want.shape[-2:]), (h, w)
        got = pre(_batch([img]))
        # resizing differs from PIL's by at most one grey level (in the processor's units)
        scale = 1 / 255 / min(pre.std) if pre.std else 1 / 255
        assert (got - want).abs().max() <= 1.01 * scale * (1 if pre.rescale_factor else 255)


def test_preprocessing_defaults_and_refusals(tmp_path):
    # keys the file leaves out take the processor class's defaults
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Mask2FormerImageProcessorFast", "size": 384})
    )
    pre = read_preprocessing(tmp_path)
    assert (pre.shortest_edge, pre.longest_edge, pre.size_divisor) == (384, 0, 32)
    assert pre.resample == "bilinear" and pre.rescale_factor == pytest.approx(1 / 255)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "Mask2FormerImageProcessor", "size": 384, "max_size": 600}
        )
    )
    assert read_preprocessing(tmp_path).output_size(100, 300) == (224, 608)  # 200x600 -> /32
    none = read_preprocessing(tmp_path / "none", "Mask2FormerImageProcessor")  # no file
    assert none.output_size(45, 70) == (45, 70) and none.mean == tuple(IMAGENET_MEAN)
    for d, msg in [
        ({"do_center_crop": True}, "do_center_crop = True is not supported"),
        ({"resample": 4}, "resample = 4 is not supported"),
        ({"size": {"max_height": 4, "max_width": 4}}, "size = {'max_height': 4"),
        ({"do_pad": True}, "do_pad = True is not supported"),
    ]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
        with pytest.raises(UserError, match=msg):
            read_preprocessing(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(UserError, match="preprocessor_config.json: not valid JSON"):
        read_preprocessing(tmp_path)


# -- per-pixel and mask-classification models --------------------------------------------------


def test_segformer_resizes_like_its_processor_and_maps_back(data, segformer):
    root, m = data
    net, proc, folder = segformer
    ann = _annotator(folder, m)
    assert ann.classes == ("wall", "cat", "dog", "sky") and ann.normalization == "softmax"
    assert ann.pre == Preprocessing(height=64, width=48, mean=tuple(MEAN), std=tuple(STD))
    imgs = [m.read_image(r) for r in m.rows[:2]]
    with torch.no_grad():
        want = net(pixel_values=_pixels(proc, imgs)).logits
        got = ann.predict(_batch(imgs))
    assert got.shape == (2, 4, 16, 12)
    _close(got, want)
    cfg = AnnotateConfig(
        annotator="hf",
        model=str(folder),
        device="cpu",
        topk=0,
        vocabulary={"background": ["wall", "sky"]},
    )
    run_annotation(cfg, m, root / "seg.zarr")
    cache = open_cache(root / "seg.zarr")
    assert cache.meta.annotator == "hf" and cache.meta.normalization == "probs"
    assert cache.meta.extra["model"]["model_type"] == "segformer"
    assert cache.meta.extra["settings"]["preprocessing"]["height"] == 64
    p = torch.softmax(want, dim=1)[0].numpy()
    native = np.stack([p[0] + p[3], p[1], p[2]])
    assert cache.stored(m.rows[0].id)["scores"].shape == (3, 16, 12)
    _close(cache.stored(m.rows[0].id)["scores"].astype(np.float32), native)
    assert cache.probs(m.rows[0].id).shape == (3, 45, 70)  # back at the image's size


def test_upernet_without_processor_settings(data):
    root, m = data
    torch.manual_seed(0)
    bc = transformers.ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    conf = transformers.UperNetConfig(
        backbone_config=bc,
        hidden_size=16,
        num_labels=4,
        use_auxiliary_head=False,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    net = transformers.UperNetForSemanticSegmentation(conf).eval()
    folder = _save(net, root / "upernet")
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": MEAN, "image_std": STD})
    )
    ann = _annotator(folder, m)
    img = m.read_image(m.rows[2])  # 61 x 38: no resize, so exactly the model on the image
    x = (torch.from_numpy(img).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    with torch.no_grad():
        want = net(pixel_values=x.permute(2, 0, 1)[None]).logits
        got = ann.predict(_batch([img]))
    assert got.shape == (1, 4, 61, 38)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _semantic(proc, out):
    """The image processor's own semantic scores: ``post_process_semantic_segmentation`` without
    a target size, float32 (B, K, h, w) (Mask2Former's at 384 x 384)."""
    res = proc.post_process_semantic_segmentation(out, return_segmentation_scores=True)
    return np.stack([r.segmentation_scores.numpy() for r in res])


def test_mask2former_semantic_non_square(data, monkeypatch):
    root, m = data
    net = _mask2former()
    proc = m2f_proc.Mask2FormerImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96},
        size_divisor=32,
        image_mean=MEAN,
        image_std=STD,
    )
    ann = _annotator(_save(net, root / "m2f", proc), m)
    assert ann.normalization == "sum" and ann.pre.size_divisor == 32
    assert ann.extra["mask_logits_resized_to"] == [384, 384]
    for rows in (m.rows[:2], m.rows[2:]):
        imgs = [m.read_image(r) for r in rows]
        with torch.no_grad():
            out = net(pixel_values=_pixels(proc, imgs))
            got = ann.predict(_batch(imgs))
        want = _semantic(proc, out)
        assert got.shape == want.shape == (2, 4, 384, 384)
        _close(got.numpy(), want)
        # on the same model outputs, equal to transformers' to float32 rounding
        with torch.no_grad():
            monkeypatch.setattr(ann.model, "forward", lambda out=out, **kw: out)
            same = ann.predict(_batch(imgs))
            monkeypatch.undo()
        np.testing.assert_allclose(same.numpy(), want, rtol=1e-5, atol=1e-6)


def test_oneformer_semantic_task(data):
    root, m = data
    torch.manual_seed(0)
    conf = transformers.OneFormerConfig(
        backbone_config=_swin(),
        num_queries=5,
        task_seq_len=6,
        text_encoder_width=32,
        text_encoder_context_length=6,
        text_encoder_num_layers=1,
        text_encoder_vocab_size=10,
        text_encoder_proj_layers=1,
        text_encoder_n_ctx=2,
        conv_dim=32,
        mask_dim=32,
        hidden_dim=32,
        encoder_feedforward_dim=16,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=1,
        dim_feedforward=16,
        query_dec_layers=1,
        num_labels=4,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        is_training=False,
    )
    net = transformers.OneFormerForUniversalSegmentation(conf).eval()
    proc = oneformer_proc.OneFormerImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96}, image_mean=MEAN, image_std=STD
    )
    folder = _save(net, root / "oneformer", proc)
    with pytest.raises(UserError, match="OneFormer needs its tokenizer in the model folder"):
        _annotator(folder, m)
    _word_tokenizer(
        ["[PAD]", "[UNK]", "the", "task", "is", "semantic", "panoptic"]
    ).save_pretrained(folder)
    ann = _annotator(folder, m)
    assert ann.normalization == "sum"
    task = torch.tensor([[2, 3, 4, 5, 0, 0]])  # "the task is semantic" + padding
    imgs = [m.read_image(r) for r in m.rows[2:]]
    with torch.no_grad():
        out = net(pixel_values=_pixels(proc, imgs), task_inputs=task.repeat(2, 1))
        got = ann.predict(_batch(imgs))
    _close(got.numpy(), _semantic(proc, out))


# -- CLIPSeg ------------------------------------------------------------------------------------


def _clipseg_reference(net, proc, img, prompt_ids):
    """CLIPSeg's own forward, one (image, prompt) pair at a time: float (P, h, w) logits."""
    with torch.no_grad():
        x = _pixels(proc, [img])
        return torch.cat(
            [net(input_ids=torch.tensor([[i]]), pixel_values=x).logits for i in prompt_ids]
        )


def test_clipseg_non_square_images(data, clipseg):
    """48x64 raised, 32x128 came out scrambled, before: the decoder assumes a square grid."""
    _, m = data
    net, proc, folder = clipseg
    ann = _annotator(folder, m)
    rng = np.random.default_rng(1)
    for h, w in [(48, 64), (32, 128), (61, 38)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        with torch.no_grad():
            got = ann.predict(_batch([img]))[0]
        logits = _clipseg_reference(net, proc, img, [3, 4])  # cat, dog
        assert got.shape == (3, 48, 48)  # the processor's square, mapped back by the cache
        _close(got[1:].numpy(), logits.sigmoid().numpy())


def test_clipseg_scores_are_prompt_sigmoids_and_no_prompt_background(clipseg, tmp_path):
    # images at the processor's size: no resize, so the scores are exactly comparable
    root, m = tmp_path, data_manifest.load(make_dataset(tmp_path / "ds", 2, 1, 0, size=(48, 48)))
    net, proc, folder = clipseg
    prompts = {"cat": ["cat", "kitten"]}
    ann = _annotator(folder, m, prompts=prompts)
    assert ann.classes == (NO_PROMPT, "cat", "kitten", "dog")
    assert ann.groups == {"background": [NO_PROMPT], "cat": ["cat", "kitten"], "dog": ["dog"]}
    assert ann.normalization == "sum"
    cfg = AnnotateConfig(annotator="hf", model=str(folder), device="cpu", topk=0, prompts=prompts)
    run_annotation(cfg, m, root / "clip.zarr")
    cache = open_cache(root / "clip.zarr")
    for row in m.rows:
        img = m.read_image(row)
        s = _clipseg_reference(net, proc, img, [3, 5, 4]).sigmoid().numpy()  # cat kitten dog
        none = np.prod(1 - s, axis=0)  # no prompt present
        total = none + s.sum(0)
        want = np.stack([none, s[0] + s[1], s[2]]) / total  # at the model's 48x48 grid
        got = cache.stored(row.id)["scores"]
        assert got.shape == (3, 48, 48)
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-4)
        assert cache.probs(row.id).shape == (3, row.height, row.width)


def test_clipseg_encodes_each_image_once(data, clipseg):
    _, m = data
    net, _, folder = clipseg
    ann = _annotator(folder, m, prompts={"cat": ["cat", "kitten"]})
    batches = []
    hook = ann.model.clip.vision_model.register_forward_hook(
        lambda mod, args, kwargs, out: batches.append(kwargs["pixel_values"].shape[0]),
        with_kwargs=True,
    )
    imgs = [m.read_image(r) for r in m.rows[:2]]
    with torch.no_grad():
        ann.predict(_batch(imgs))
    hook.remove()
    assert batches == [2]  # two images, three prompts: one pass of the vision encoder


def test_clipseg_bad_folders(data, clipseg, tmp_path):
    _, m = data
    net, proc, _ = clipseg
    folder = _save(net, tmp_path / "notok", proc)
    with pytest.raises(UserError) as exc:
        _annotator(folder, m)
    assert str(exc.value) == (
        f"{folder}: CLIPSeg needs its tokenizer in the model folder (tokenizer.json, or "
        "vocab.json and merges.txt); none found; save it there with "
        "tokenizer.save_pretrained(folder)"
    )
    vit_proc.ViTImageProcessorPil(size={"height": 48, "width": 64}).save_pretrained(folder)
    _word_tokenizer(CLIP_WORDS).save_pretrained(folder)
    with pytest.raises(UserError, match="CLIPSeg needs a square input size"):
        _annotator(folder, m)


def test_missing_folder_is_a_user_error(data):
    root, m = data
    with pytest.raises(UserError, match="expected a folder with a transformers config.json"):
        _annotator(root / "nothing", m)


# -- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["segformer", "mask2former", "clipseg"])
def test_hf_backends_on_cuda_with_amp(data, segformer, clipseg, model, tmp_path):
    root, m = data
    if model == "segformer":
        folder = segformer[2]
    elif model == "clipseg":
        folder = clipseg[2]
    else:
        proc = m2f_proc.Mask2FormerImageProcessorPil(
            size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32
        )
        folder = _save(_mask2former(), tmp_path / "m2f", proc)
    caches = {}
    vocab = {} if model == "clipseg" else {"background": ["wall", "sky"]}
    for device, amp in (("cpu", False), ("cuda", True)):
        cfg = AnnotateConfig(
            annotator="hf", model=str(folder), device=device, amp=amp, topk=0, vocabulary=vocab
        )
        run_annotation(cfg, m, tmp_path / f"{device}.zarr")
        caches[device] = open_cache(tmp_path / f"{device}.zarr")
    ann = _annotator(folder, m)
    ann.to(torch.device("cuda"))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = ann.predict(_batch([m.read_image(m.rows[0])]).cuda())
    assert out.device.type == "cuda"
    for row in m.rows:
        d = np.abs(caches["cpu"].probs(row.id) - caches["cuda"].probs(row.id))
        assert d.mean() < 5e-3 and d.max() < 0.05  # float16 autocast against float32


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_annotate_run_command_on_cuda(data, segformer, tmp_path):
    """``python -m annotate run`` in a fresh process on CUDA with AMP (hf SegFormer)."""
    man = make_dataset(tmp_path / "ds", 2, 3, 1, sizes=[(45, 70), (61, 38)] * 3)
    conf = write_config(
        tmp_path / "run.toml",
        tmp_path / "run",
        man,
        annotator="hf",
        model=str(segformer[2]),
        device="cuda",
        amp=True,
    )
    conf.write_text(conf.read_text() + '[annotate.vocabulary]\nbackground = ["wall", "sky"]\n')
    r = subprocess.run(
        [sys.executable, "-m", "annotate", "run", "--config", str(conf), "--no-progress"],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "run" / "annotate.json").read_text())
    assert report["device"].startswith("cuda") and sum(report["annotated"].values()) == 6
    cache = open_cache(tmp_path / "run" / "cache.zarr")
    p = cache.probs("l00")
    assert p.shape == (3, 45, 70)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=2e-3)
