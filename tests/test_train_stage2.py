"""Stage II steps, CutMix, the augmentation and the process group's end, on their own (the
comparisons with UniMatch's code are in test_train_unimatch.py)."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
from _train_fixtures import TINY_MODEL, make_dataset, save_tiny_mit

from data_manifest.errors import UserError
from data_manifest.manifest import load
from train import data as tdata
from train.augment import cutmix_box, paste, rescale
from train.config import TrainConfig
from train.models import build_model
from train.steps import Unlabeled, fixmatch
from train.trainer import Trainer, fit

NO_AUTOCAST = contextlib.nullcontext


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("deeplabv3plus_effl0", 3, pretrained=False, **TINY_MODEL).train()


def _views(b: int, g: torch.Generator, rng: np.random.Generator) -> Unlabeled:
    """An unlabeled batch of 32-px crops (4 px of padding at the bottom), one strong view and
    its CutMix boxes (always drawn)."""
    label = torch.zeros(b, 32, 32, dtype=torch.int64)
    label[:, 28:] = 255
    box = torch.from_numpy(np.stack([cutmix_box(32, 1.0, rng) for _ in range(b)]))
    image, strong = torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)
    return Unlabeled(image, label, [strong], [box])


def test_fixmatch_targets_come_from_the_training_forward_pass():
    """Finding 1: fixmatch.py passes the weak view through the training forward pass together
    with the labeled batch; only the CutMix source is predicted in eval mode. The targets are
    that pass's argmax outside the box and the source's eval-mode argmax inside it; with batch
    norms an eval-mode pass of the weak view would give other targets."""
    model = _net()
    g, rng = torch.Generator().manual_seed(9), np.random.default_rng(9)
    x_l, y_l = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2, 32, 32))
    u, mix = _views(2, g, rng), _views(2, g, rng)
    twin = copy.deepcopy(model)
    out = fixmatch(model, model, x_l, y_l, u, mix, 0.5, NO_AUTOCAST)
    with torch.no_grad():
        train_pass = twin(torch.cat([x_l, u.image]))[2:].argmax(1)
        twin.eval()
        source, eval_pass = twin(mix.image).argmax(1), twin(u.image).argmax(1)
    assert torch.equal(out.targets["w"].label, train_pass)
    assert (train_pass != eval_pass).float().mean() > 0.05
    box, s1 = u.box[0], out.targets["s1"]
    assert torch.equal(s1.label[box], source[box]) and torch.equal(s1.label[~box], train_pass[~box])
    assert torch.equal(s1.valid, torch.where(box, mix.valid, u.valid))
    assert model.training


def test_paste_takes_each_sample_s_box_from_the_same_sample_of_the_source():
    images = torch.zeros(2, 3, 4, 5)
    source = torch.ones(2, 3, 4, 5)
    box = torch.zeros(2, 4, 5, dtype=torch.bool)
    box[0, 1:3, 2:4] = True
    out = paste(images, source, box)
    assert out[0, :, 1:3, 2:4].eq(1).all() and out.sum() == 3 * 4 and images.sum() == 0
    labels = paste(torch.zeros(2, 4, 5, dtype=torch.int64), torch.full((2, 4, 5), 7), box)
    assert torch.equal(labels == 7, box)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage2")
    return base, load(make_dataset(base / "ds", n_labeled=2, n_unlabeled=3, n_val=1))


def _trainer(tiny, tmp_path, **train: object) -> Trainer:
    keys: dict = dict(
        arch="deeplabv3plus_effl0",
        pretrained=False,
        model_kwargs=TINY_MODEL,
        length_unit="iters",
        stage1_length=0,
        stage2_length=2,
        crop=32,
        workers=0,
        device="cpu",
    )
    cfg = TrainConfig(**{**keys, **train})
    return Trainer(cfg, tiny[1], out=tmp_path / "run", pseudo_dir=tmp_path, seed=1)


@pytest.mark.parametrize("mode,views", [("fixmatch", 1), ("unimatch", 2)])
def test_cutmix_mixes_at_batch_size_one(tiny, tmp_path, mode, views):
    """Finding 2: one image per process used to leave CutMix with nothing to mix (it rolled
    the batch). The source is a second batch of the same images augmented again, as
    fixmatch.py's zip of the unlabeled loader with itself, so one image mixes too."""
    trainer = _trainer(tiny, tmp_path, stage2_mode=mode, batch_size=2, cutmix_prob=1.0)
    loader = tdata.make_joint_loader(trainer._streams(2), 1, 0, 6, 1, 0, 1, 0)
    mixed = 0
    for lb, ub, mb in loader:
        assert ub["strong"].shape == (1, views, 3, 32, 32)
        assert ub["box"].shape == (1, views, 32, 32)
        u, mix = trainer._unlabeled(ub), trainer._unlabeled(mb)
        assert not torch.equal(u.image, mix.image)  # another draw of the augmentation
        for j in range(views):
            box = u.box[j]
            pasted = paste(u.strong[j], mix.strong[j], box)
            inside = box[:, None].expand_as(pasted)
            assert torch.equal(pasted[inside], mix.strong[j][inside])
            mixed += int(box.any() and not torch.equal(pasted, u.strong[j]))
        if mode == "unimatch":  # fixmatch at batch 1 needs SyncBatchNorm (next test)
            out = trainer.micro_batch_loss(2, (lb, ub, mb))
            assert torch.isfinite(out.loss_u) and 0 <= float(out.mask_ratio) <= 1
    assert mixed == 6 * views  # p = 1: every strong view of every step got a box


@pytest.mark.parametrize("keys", [{"stage2_mode": "fixmatch"}, {"labeled_only": True}])
def test_one_image_through_deeplab_batch_norm_is_refused_in_one_line(tiny, tmp_path, keys):
    with pytest.raises(UserError, match=r"\[train\] batch_size = 1: .* expected batch_size >= 2"):
        _trainer(tiny, tmp_path, batch_size=1, **keys)
    _trainer(tiny, tmp_path, batch_size=1, stage2_mode="unimatch")  # strong views: 2 images


def _p_taller(size: int) -> float:
    """P(box taller than wide) for UniMatch's box: area a uniform in [0.02, 0.4]·size², then
    ratios r uniform in [0.3, 1/0.3] (h = ⌊√(a·r)⌋, w = ⌊√(a/r)⌋) redrawn with the corner until
    the box fits, which a corner does with probability (size − w + 1)(size − h + 1)/size²:
    given a, the accepted r has density ∝ that probability. Integrated on a fine grid."""
    a = np.linspace(0.02, 0.4, 801)[:, None] * size * size
    r = np.linspace(0.3, 1 / 0.3, 4001)[None, :]
    w, h = np.floor(np.sqrt(a / r)), np.floor(np.sqrt(a * r))
    fits = np.clip(size - w + 1, 0, None) * np.clip(size - h + 1, 0, None)
    return float(((fits * (h > w)).sum(1) / fits.sum(1)).mean())


def test_cutmix_box_aspect_ratio_is_uniform_as_unimatch_s():
    """Finding 2: UniMatch's ratio is uniform in [0.3, 1/0.3]: 77 % of the ratios make a box
    taller than wide, 73 % of the boxes that fit a 321 crop (the old log-uniform ratio: 48 %).
    Over n = 4000 boxes the fraction lies within 4·√(p(1−p)/n) (+ 0.002 for the grid) of the
    integral; half the draws at p = 0.5 have a box."""
    rng = np.random.default_rng(0)
    boxes = [cutmix_box(321, 1.0, rng) for _ in range(4000)]
    tall = np.mean([b.any(1).sum() > b.any(0).sum() for b in boxes])
    p = _p_taller(321)
    assert 0.72 < p < 0.74
    assert abs(tall - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 0.002
    areas = np.array([b.mean() for b in boxes])
    assert areas.min() >= 0.015 and areas.max() <= 0.4  # 2-40 % (truncated sides)
    some = [cutmix_box(321, 0.5, rng).any() for _ in range(4000)]
    assert abs(np.mean(some) - 0.5) < 4 * math.sqrt(0.25 / 4000)


def test_shrinking_is_anti_aliased_like_pil():
    """Finding 5: UniMatch shrinks with PIL's bilinear filter, which widens with the scale, so
    every output pixel averages at least the 4x4 input pixels it covers when shrinking by 4: on
    uniform noise (sd 73.9) the output's sd is then at most 73.9 / 4 (a 4x4 box mean); OpenCV's
    bilinear samples 2x2 pixels and keeps about twice that (37)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 452, 3), dtype=np.uint8)
    small, _ = rescale(noise, np.zeros((300, 452), np.uint8), 113)
    assert small.shape == (75, 113, 3)
    assert small.std() < 73.9 / 4


@pytest.mark.parametrize("arch", ["deeplabv3plus_effl0", "segformer"])
def test_feature_perturbation_decodes_clean_and_dropped_features(arch, tmp_path):
    """need_fp: the first output is the plain forward pass (eval mode: batch composition does
    not matter), the second the decoder on features after channel dropout."""
    if arch == "segformer":
        pytest.importorskip("transformers")
        from train.models import build_segformer

        model = build_segformer(3, weights=save_tiny_mit(tmp_path / "mit"))
    else:
        model = _net()
    model.eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out, out_fp = model(x, need_fp=True)
        assert out.shape == out_fp.shape == (2, 3, 40, 56)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, out_fp)


def test_fit_under_torchrun_leaves_no_process_group(tiny, tmp_path, monkeypatch):
    """Finding 6: a run under torchrun ends its process group (NCCL warns at exit otherwise);
    one that the caller created stays."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    trainer = _trainer(tiny, tmp_path, stage2_mode="unimatch", stage2_length=1)
    cfg, manifest = trainer.cfg, tiny[1]
    dist.destroy_process_group()  # the one the trainer above joined
    fit(
        cfg, manifest=manifest, out=tmp_path / "a", pseudo_dir=tmp_path, seed=1, show_progress=False
    )
    assert not dist.is_initialized()
    dist.init_process_group("gloo")
    try:
        fit(
            cfg,
            manifest=manifest,
            out=tmp_path / "b",
            pseudo_dir=tmp_path,
            seed=1,
            show_progress=False,
        )
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_the_renamed_mode_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from train.cli import app

    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nstage2_mode = "weak_strong"\n')
    r = CliRunner().invoke(app, ["fit", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert f'{cfg}: [train] stage2_mode = "weak_strong" was renamed "fixmatch"' in r.output
    r = CliRunner().invoke(
        app, ["fit", "--config", str(cfg), "--stage2-mode", "mean_teacher", "--out", str(tmp_path)]
    )
    assert r.exit_code == 1 and "--stage2-mode = 'mean_teacher': expected one of" in r.output
