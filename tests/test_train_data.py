"""Input pipeline, label checks, schedules and metrics of the train package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _train_fixtures import PALETTE, make_dataset
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from data_manifest.errors import UserError
from data_manifest.io import encode_label_png
from data_manifest.manifest import Manifest, Meta, Row, load
from train.config import TrainConfig
from train.data import (
    STREAM_UNLABELED,
    Augment,
    SegDataset,
    StreamSampler,
    check_labels,
    make_joint_loader,
)
from train.losses import masked_ce
from train.metrics import confusion, iou_per_class, summarize
from train.schedule import lambda_at, make_plan, poly_factor, unlabeled_weight


def test_sampler_positions_do_not_depend_on_world_size():
    one = list(StreamSampler(10, 2, seed=1, stream=0, start=0, stop=6))
    r0 = list(StreamSampler(10, 1, seed=1, stream=0, start=0, stop=6, rank=0, world=2))
    r1 = list(StreamSampler(10, 1, seed=1, stream=0, start=0, stop=6, rank=1, world=2))
    assert [b[0] for b in one] == [a[0] for a in r0]
    assert [b[1] for b in one] == [a[0] for a in r1]
    positions = [p for b in one for _, p in b]
    assert positions == list(range(12))
    # each epoch of 10 positions visits every index once
    first_epoch = sorted(i for b in one for i, p in b if p < 10)
    assert first_epoch == list(range(10))
    # a sampler started at iteration 3 continues the same sequence
    assert list(StreamSampler(10, 2, seed=1, stream=0, start=3, stop=6)) == one[3:]


def test_accumulation_steps_take_consecutive_positions():
    s = list(StreamSampler(7, 2, seed=0, stream=1, start=1, stop=2, accum=3))
    assert [[p for _, p in b] for b in s] == [[6, 7], [8, 9], [10, 11]]


def test_augmentation_is_a_function_of_position(tmp_path):
    path = make_dataset(tmp_path / "ds", pseudo_dir=tmp_path / "pseudo")
    m = load(path)
    ds = SegDataset(
        m,
        m.split("unlabeled"),
        "pseudo",
        Augment(24, 0.5, 2.0, strong_views=2),
        seed=5,
        stream=STREAM_UNLABELED,
        pseudo_dir=tmp_path / "pseudo",
    )
    a, b, c = ds[(2, 17)], ds[(2, 17)], ds[(2, 18)]
    for key in ("image", "label", "strong", "box"):
        assert torch.equal(a[key], b[key])
    assert a["image"].shape == (3, 24, 24) and a["image"].dtype == torch.uint8
    assert a["label"].dtype == torch.int64
    assert a["strong"].shape == (2, 3, 24, 24) and a["box"].shape == (2, 24, 24)
    assert a["box"].dtype == torch.bool
    # a second draw of the same position: the same image, augmented independently
    again = SegDataset(
        m, m.split("unlabeled"), "pseudo", ds.aug, 5, STREAM_UNLABELED, tmp_path / "pseudo", draw=1
    )
    assert torch.equal(again[(2, 17)]["image"], again[(2, 17)]["image"])
    assert not torch.equal(again[(2, 17)]["image"], a["image"])
    assert not torch.equal(a["image"], c["image"])
    assert set(torch.unique(a["label"]).tolist()) <= {0, 1, 2, 255}
    # workers or not, the loader yields the same batches
    kw = dict(batch=2, start=1, stop=3, accum=1, rank=0, world=1)
    b0 = list(make_joint_loader([ds], workers=0, **kw))
    b1 = list(make_joint_loader([ds], workers=1, **kw))
    for x, y in zip(b0, b1, strict=True):
        assert torch.equal(x[0]["image"], y[0]["image"])
        assert torch.equal(x[0]["label"], y[0]["label"])


def test_unlabeled_source_marks_padding_as_ignored(tmp_path):
    m = load(make_dataset(tmp_path / "ds"))
    ds = SegDataset(m, m.split("unlabeled"), "none", Augment(64, 1.0, 1.0), 0, 1)
    item = ds[(0, 0)]
    lab = item["label"].numpy()
    assert (lab[:32, :32] == 0).all() and (lab[32:] == 255).all() and (lab[:, 32:] == 255).all()
    assert (item["image"][:, 32:].numpy() == 0).all()


def test_check_labels_reports_each_bad_input(tmp_path):
    pseudo = tmp_path / "pseudo"
    m = load(make_dataset(tmp_path / "ds", pseudo_dir=pseudo))
    unl = m.split("unlabeled")
    check_labels(m, unl, pseudo)
    check_labels(m, m.split("labeled"), None)
    (pseudo / "unlabeled_002.png").unlink()
    with pytest.raises(
        UserError,
        match=r"unlabeled_002\.png: pseudo-label for unlabeled image "
        r"'unlabeled_002' not found",
    ):
        check_labels(m, unl, pseudo)
    (pseudo / "unlabeled_002.png").write_bytes(
        encode_label_png(np.zeros((20, 32), np.uint8), PALETTE)
    )
    with pytest.raises(
        UserError,
        match=r"unlabeled_002\.png: pseudo-label is 20x32 \(HxW\); "
        r"expected 32x32 like image 'unlabeled_002'",
    ):
        check_labels(m, unl, pseudo, read_values=False)
    lab = np.zeros((32, 32), np.uint8)
    lab[3, 4] = 9
    (pseudo / "unlabeled_002.png").write_bytes(encode_label_png(lab, PALETTE))
    with pytest.raises(
        UserError,
        match=r"pseudo-label value 9 is out of range; expected class "
        r"ids 0-2 or 255",
    ):
        check_labels(m, unl, pseudo)
    gt = m.label_path(m.split("labeled")[1])
    gt.write_bytes(encode_label_png(lab, PALETTE))
    with pytest.raises(UserError, match=r"labeled_001\.png: label value 9 is out of range"):
        check_labels(m, m.split("labeled"), None)


def test_lambda_schedule_and_poly():
    assert lambda_at(0.0, 0.5, 3.0) == 0.5
    assert lambda_at(1.0, 0.5, 3.0) == pytest.approx(0.5 * math.exp(-3.0))
    values = [lambda_at(t / 10, 0.8, 2.0) for t in range(11)]
    ratios = np.array(values[1:]) / np.array(values[:-1])
    np.testing.assert_allclose(ratios, math.exp(-0.2))  # exponential: constant ratio
    assert lambda_at(0.7, 0.3, 0.0) == 0.3
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)


def _unimatch_iters_per_epoch(n: int, batch: int, world: int) -> int:
    """len() of a loader as UniMatch builds it: DistributedSampler, then drop_last=True."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=0, shuffle=True)
    return len(DataLoader(range(n), batch_size=batch, sampler=sampler, drop_last=True))


def test_plan_counts_epochs_over_the_unlabeled_split():
    cfg = TrainConfig(batch_size=4, accum_steps=2, stage1_length=3, stage2_length=2)
    plan = make_plan(cfg, n_labeled=5, n_unlabeled=33, world=2)
    assert plan.iters_per_epoch == _unimatch_iters_per_epoch(33, 4 * 2, 2) == 2
    assert (plan.stage1_iters, plan.stage2_iters) == (6, 4)
    for n, batch, world in [(92, 2, 4), (95, 2, 4), (10_490, 8, 1), (1_323, 2, 3), (7, 8, 1)]:
        got = make_plan(TrainConfig(batch_size=batch), 4, n, world).iters_per_epoch
        assert got == max(1, _unimatch_iters_per_epoch(n, batch, world)), (n, batch, world)
    off = make_plan(TrainConfig(stage1_length=3, stage2=False, length_unit="iters"), 5, 33)
    assert (off.stage1_iters, off.stage2_iters) == (3, 0)
    lo = make_plan(
        TrainConfig(stage1_length=3, stage2_length=2, length_unit="iters", labeled_only=True), 5, 33
    )
    assert (lo.stage1_iters, lo.stage2_iters) == (5, 0)


def test_masked_ce_ignores_255_and_weights():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0] = 255
    keep = target != 255
    ref = -torch.log_softmax(logits, 1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    torch.testing.assert_close(masked_ce(logits, target), ref[keep].mean())
    w = torch.rand(2, 4, 5)
    torch.testing.assert_close(masked_ce(logits, target, w), (ref * w)[keep].sum() / keep.sum())
    assert masked_ce(logits, torch.full_like(target, 255)).item() == 0.0


def test_confusion_and_iou_against_hand_counts():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion(pred, target, 4)
    assert conf[0, 0] == 1 and conf[0, 1] == 1 and conf[1, 1] == 2 and conf[1, 2] == 1
    assert conf[2, 2] == 1 and conf[2, 0] == 1 and conf.sum() == 7
    iou = iou_per_class(conf)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 4, 1 / 3])
    assert np.isnan(iou[3])  # absent class: not counted
    s = summarize(conf, ["a", "b", "c", "d"])
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert s["acc"] == pytest.approx(4 / 7) and s["iou"]["d"] is None


def test_stage2_modes_default_to_unimatch_s_threshold_and_weight():
    for mode in ("fixmatch", "unimatch"):  # conf_thresh 0.95, (loss_x + loss_u) / 2
        cfg = TrainConfig(stage2_mode=mode)
        assert (cfg.stage2_threshold, cfg.lambda0, cfg.lambda_decay) == (0.95, 0.5, 0.0)
    cfg = TrainConfig(stage2_mode="self")
    assert (cfg.stage2_threshold, cfg.lambda_decay) == (0.0, 3.0)
    cfg = TrainConfig(stage2_mode="unimatch", stage2_threshold=0.0, lambda_decay=2.0)
    assert (cfg.stage2_threshold, cfg.lambda_decay) == (0.0, 2.0)
    with pytest.raises(ValueError, match=r"stage2_threshold = 1\.0: expected a number in \[0, 1\)"):
        TrainConfig(stage2_threshold=1.0)
    with pytest.raises(ValueError, match=r'stage2_mode = "weak_strong" was renamed "fixmatch"'):
        TrainConfig(stage2_mode="weak_strong")
    with pytest.raises(ValueError, match=r"stage2_mode = 'mean_teacher': expected one of \"self\""):
        TrainConfig(stage2_mode="mean_teacher")


def test_labeled_only_baseline_follows_unimatch_supervised_schedule():
    """VOC classic 1/16: 92 labeled and 10,490 unlabeled images, 2 per GPU on 4 GPUs
    (configs/pascal.yaml). The semi-supervised run counts epochs over the unlabeled split; the
    baseline, like UniMatch's supervised.py, over the labeled one: 60 + 20 = 80 epochs of
    ⌊⌈92 / 4⌉ / 2⌋ = 11 iterations (drop_last), 880 in all (not 960)."""
    semi = make_plan(TrainConfig(batch_size=2), n_labeled=92, n_unlabeled=10_490, world=4)
    assert semi.iters_per_epoch == 1311 and semi.total == 80 * 1311
    base = make_plan(TrainConfig(batch_size=2, labeled_only=True), 92, 10_490, world=4)
    assert base.iters_per_epoch == 11 and (base.stage1_iters, base.stage2_iters) == (880, 0)
    assert base.eval_every == 11  # once per (labeled) epoch, as supervised.py evaluates
    one_gpu = make_plan(TrainConfig(batch_size=8, labeled_only=True), 92, 10_490)
    assert one_gpu == base  # 8 on one GPU is the same schedule


def test_loss_weights_sum_to_one_and_meet_at_the_stage_switch():
    cfg = TrainConfig(length_unit="iters", stage1_length=10, stage2_length=10)
    plan = make_plan(cfg, 4, 40)
    lams = [unlabeled_weight(cfg, plan, it) for it in range(plan.total)]
    assert lams[:10] == [0.5] * 10  # Stage I: the mean of L_s and L_u
    assert lams[10] == lams[9] and lams[10:] == [lambda_at(t / 10, 0.5, 3.0) for t in range(10)]
    heavy = TrainConfig(length_unit="iters", stage1_length=2, stage2_length=0, pseudo_weight=3.0)
    assert unlabeled_weight(heavy, make_plan(heavy, 4, 40), 0) == 0.75  # 3 : 1
    base = TrainConfig(length_unit="iters", labeled_only=True)
    assert {unlabeled_weight(base, make_plan(base, 4, 40), it) for it in range(80)} == {0.0}


def test_labels_are_resized_centre_aligned_like_the_image(tmp_path):
    """A column ramp (image value 8·col, label = col) scaled by 1/3: bilinear (PIL's, a
    triangle filter 3 columns wide) gives source column 3x + 1 (the destination pixel's centre)
    away from the borders; the label must come from the same column, not 3x (a half-pixel
    shift), so label·8 equals the image there."""
    w = 30
    img = np.repeat((np.arange(w) * 8).astype(np.uint8)[None, :, None], w, 0).repeat(3, 2)
    lab = np.repeat(np.arange(w, dtype=np.uint8)[None], w, 0)
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(lab).save(tmp_path / "l.png")
    meta = Meta(
        dataset="ramp",
        classes=[f"c{i}" for i in range(w)],
        palette=[[i, i, i] for i in range(w)],
        background_index=0,
    )
    Manifest(meta=meta, rows=[Row("a", "i.png", "l.png", "labeled", w, w)]).save(tmp_path / "m")
    m = load(tmp_path / "m")
    ds = SegDataset(m, m.split("labeled"), "gt", Augment(10, 1 / 3, 1 / 3), 0, 0)
    for position in range(4):  # flipped or not, label and image stay aligned
        item = ds[(0, position)]
        label, image = item["label"][:, 1:-1], item["image"][0, :, 1:-1].long()
        assert torch.equal(label * 8, image)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_has_backbone_and_head_groups(name):
    from train.models import build_model
    from train.trainer import make_optimizer

    model = build_model("deeplabv3plus_effl0", 3, pretrained=False)
    cfg = TrainConfig(optimizer=name, lr=2e-4, head_lr_mult=10.0, weight_decay=0.01)
    opt = make_optimizer(cfg, model)
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    backbone, head = opt.param_groups
    assert (backbone["base_lr"], head["base_lr"]) == (2e-4, pytest.approx(2e-3))
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head_parameters()}
    assert backbone["weight_decay"] == head["weight_decay"] == 0.01
