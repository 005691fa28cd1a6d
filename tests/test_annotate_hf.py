"""The ``hf`` backend with tiny randomly initialised transformers models saved to tmp folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _annotate_fixtures import make_dataset

import data_manifest
from annotate import open_cache
from annotate.config import AnnotateConfig
from annotate.hf import load_hf_annotator
from annotate.run import run_annotation
from data_manifest.errors import UserError

transformers = pytest.importorskip("transformers")
MEAN, STD = [0.45, 0.4, 0.35], [0.2, 0.22, 0.24]
LABELS = {0: "wall", 1: "cat", 2: "dog", 3: "sky"}


def _save(model, folder, mean=MEAN, std=STD):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    return folder


def _pixels(img, mean=MEAN, std=STD):
    x = (img.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    man = make_dataset(root / "ds", 2, 2, 0, size=(32, 32))
    return root, data_manifest.load(man)


def _annotator(folder, m, **kw):
    return load_hf_annotator(AnnotateConfig(annotator="hf", model=str(folder), **kw), m)


def test_segformer_end_to_end_with_vocabulary(data):
    root, m = data
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
    net = transformers.SegformerForSemanticSegmentation(conf).eval()
    folder = _save(net, root / "segformer")
    ann = _annotator(folder, m)
    assert ann.classes == ("wall", "cat", "dog", "sky") and ann.normalization == "softmax"
    img = m.read_image(m.rows[0])
    with torch.no_grad():
        want = net(pixel_values=_pixels(img)).logits
        got = ann.predict(torch.from_numpy(img).permute(2, 0, 1)[None])
    assert got.shape == (1, 4, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
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
    p = torch.softmax(want, dim=1)[0].numpy()
    native = np.stack([p[0] + p[3], p[1], p[2]])
    assert cache.stored(m.rows[0].id)["scores"].shape == (3, 8, 8)
    np.testing.assert_allclose(
        cache.stored(m.rows[0].id)["scores"].astype(np.float32), native, atol=1e-3
    )


def test_upernet(data):
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
    ann = _annotator(_save(net, root / "upernet"), m)
    img = m.read_image(m.rows[1])
    with torch.no_grad():
        want = net(pixel_values=_pixels(img)).logits
        got = ann.predict(torch.from_numpy(img).permute(2, 0, 1)[None])
    assert got.shape == (1, 4, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mask2former_semantic(data):
    root, m = data
    torch.manual_seed(0)
    bc = transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    conf = transformers.Mask2FormerConfig(
        backbone_config=bc,
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
    net = transformers.Mask2FormerForUniversalSegmentation(conf).eval()
    ann = _annotator(_save(net, root / "m2f"), m)
    assert ann.normalization == "sum"
    imgs = np.stack([m.read_image(r) for r in m.rows[:2]])
    with torch.no_grad():
        out = net(pixel_values=torch.cat([_pixels(i) for i in imgs]))
        got = ann.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    cls = out.class_queries_logits.softmax(-1).numpy()[..., :4]  # drop "no object"
    masks = 1 / (1 + np.exp(-out.masks_queries_logits.numpy()))
    want = np.einsum("bqc,bqhw->bchw", cls, masks)
    assert got.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def _word_tokenizer(words):
    """A tiny word-level tokenizer (offline stand-in for the model's own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def test_oneformer_semantic_task(data):
    root, m = data
    torch.manual_seed(0)
    bc = transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    conf = transformers.OneFormerConfig(
        backbone_config=bc,
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
    folder = _save(net, root / "oneformer")
    _word_tokenizer(
        ["[PAD]", "[UNK]", "the", "task", "is", "semantic", "panoptic"]
    ).save_pretrained(folder)
    ann = _annotator(folder, m)
    assert ann.normalization == "sum"
    task = torch.tensor([[2, 3, 4, 5, 0, 0]])  # "the task is semantic" + padding
    imgs = np.stack([m.read_image(r) for r in m.rows[:2]])
    with torch.no_grad():
        out = net(pixel_values=torch.cat([_pixels(i) for i in imgs]), task_inputs=task.repeat(2, 1))
        got = ann.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    cls = out.class_queries_logits.softmax(-1).numpy()[..., :4]
    masks = 1 / (1 + np.exp(-out.masks_queries_logits.numpy()))
    np.testing.assert_allclose(
        got.numpy(), np.einsum("bqc,bqhw->bchw", cls, masks), rtol=1e-4, atol=1e-5
    )


def test_clipseg_with_class_name_prompts(data):
    root, m = data
    words = ["[PAD]", "[UNK]", "background", "cat", "dog", "kitten"]
    fast = _word_tokenizer(words)
    torch.manual_seed(0)
    conf = transformers.CLIPSegConfig(
        text_config={
            "vocab_size": len(words),
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
    net = transformers.CLIPSegForImageSegmentation(conf).eval()
    folder = _save(net, root / "clipseg")
    fast.save_pretrained(folder)
    ann = _annotator(folder, m, prompts={"cat": ["cat", "kitten"]})
    assert ann.classes == ("background", "cat", "kitten", "dog")
    assert ann.groups == {"background": ["background"], "cat": ["cat", "kitten"], "dog": ["dog"]}
    imgs = np.stack([m.read_image(r) for r in m.rows[:2]])
    ids = torch.tensor([[2], [3], [5], [4]])
    with torch.no_grad():
        got = ann.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2))
        for b in range(2):
            want = net(input_ids=ids, pixel_values=_pixels(imgs[b]).repeat(4, 1, 1, 1)).logits
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-5)
    cfg = AnnotateConfig(
        annotator="hf", model=str(folder), device="cpu", topk=0, prompts={"cat": ["cat", "kitten"]}
    )
    run_annotation(cfg, m, root / "clip.zarr")
    p = torch.softmax(got[0], dim=0).numpy()
    want = np.stack([p[0], p[1] + p[2], p[3]])
    np.testing.assert_allclose(open_cache(root / "clip.zarr").probs(m.rows[0].id), want, atol=2e-3)


def test_missing_folder_is_a_user_error(data):
    root, m = data
    with pytest.raises(UserError, match="expected a folder with a transformers config.json"):
        _annotator(root / "nothing", m)
