"""The trainer against UniMatch's own code (../shared/upstream/unimatch, imported by _unimatch):
the DeepLabV3+ networks with mapped weights, the resize and the CutMix box of its data
pipeline, and one training step of fixmatch.py and unimatch.py on the same batches."""

from __future__ import annotations

import random

import _unimatch as U
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _train_fixtures import make_dataset
from PIL import Image

from data_manifest.manifest import load
from train.augment import cutmix_box, rescale
from train.config import TrainConfig
from train.losses import mixed_loss
from train.models import build_model
from train.schedule import unlabeled_weight
from train.trainer import Trainer

pytestmark = pytest.mark.skipif(not U.UPSTREAM.is_dir(), reason=U.ABSENT)


@pytest.fixture(scope="module")
def up():
    return U.load()


def _pair(up, backbone: str, nclass: int = 5, seed: int = 0):
    """UniMatch's DeepLabV3+ (random weights, random batch-norm statistics) and ours with the
    same weights mapped across."""
    torch.manual_seed(seed)
    theirs = U.build_deeplab(up, backbone, nclass)
    U.randomize_batch_norms(theirs, seed)
    ours = build_model(f"deeplabv3plus_{backbone.replace('resnet', 'r')}", nclass, pretrained=False)
    state = U.map_weights(theirs.state_dict())
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    return theirs, ours


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_deeplabv3plus_logits_equal_unimatch_s(up, backbone):
    """Eval and train mode, and the feature perturbation under the same torch seed, at a
    non-square size with odd sides (align_corners arithmetic)."""
    theirs, ours = _pair(up, backbone)
    x = torch.randn(2, 3, 97, 129, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs.eval(), ours.eval()
        assert torch.equal(ours(x), theirs(x))
        theirs.train(), ours.train()
        assert torch.equal(ours(x), theirs(x))
        torch.manual_seed(3)
        out_t, fp_t = theirs(x, True)
        torch.manual_seed(3)
        out_o, fp_o = ours(x, need_fp=True)
    assert torch.equal(out_o, out_t) and torch.equal(fp_o, fp_t)
    assert not torch.equal(fp_o, out_o)


@pytest.mark.parametrize("long_side", [97, 226, 451, 902])
def test_rescale_is_unimatch_s_pil_resize(up, long_side, monkeypatch):
    """transform.resize with its randint fixed: the same sizes and bytes for a real photo
    (300x451) and for noise, shrinking (PIL's bilinear filter widens: no aliasing) and
    enlarging; the label by PIL's nearest."""
    from skimage import data

    rng = np.random.default_rng(0)
    for image in (data.chelsea(), rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)):
        label = rng.integers(0, 21, image.shape[:2], dtype=np.uint8)
        monkeypatch.setattr(up.transform.random, "randint", lambda a, b: long_side)
        img_t, lab_t = up.transform.resize(
            Image.fromarray(image), Image.fromarray(label), (0.5, 2.0)
        )
        img_o, lab_o = rescale(image, label, long_side)
        assert np.array_equal(img_o, np.asarray(img_t))
        assert np.array_equal(lab_o, np.asarray(lab_t))


def _shared_source(rng: np.random.Generator) -> tuple[object, object]:
    """Stand-ins for transform.py's ``random`` and ``np`` that draw from ``rng``, in the calls
    obtain_cutmix_box makes (random.random, np.random.uniform, np.random.randint, np.sqrt)."""
    from types import SimpleNamespace

    rand = SimpleNamespace(random=rng.random)
    nps = SimpleNamespace(
        random=SimpleNamespace(uniform=rng.uniform, randint=lambda a, b: rng.integers(a, b)),
        sqrt=np.sqrt,
    )
    return rand, nps


def test_cutmix_boxes_are_unimatch_s_box_for_box(up, monkeypatch):
    """With one generator behind both, obtain_cutmix_box and ours draw the same boxes (the
    same distribution, rejection loop included), at UniMatch's crop 321 and at an odd small
    crop, for p = 0.5 and 1."""
    for size, p in [(321, 0.5), (33, 1.0)]:
        rand, nps = _shared_source(np.random.default_rng(size))
        monkeypatch.setattr(up.transform, "random", rand)
        monkeypatch.setattr(up.transform, "np", nps)
        mine = np.random.default_rng(size)
        for _ in range(500):
            theirs = up.transform.obtain_cutmix_box(size, p=p).numpy().astype(bool)
            assert np.array_equal(cutmix_box(size, p, mine), theirs)


def _box_stats(boxes: list[np.ndarray]) -> tuple[float, float, float]:
    """Fraction of non-empty boxes, fraction taller than wide, mean area fraction."""
    drawn = [b for b in boxes if b.any()]
    tall = [b.any(1).sum() > b.any(0).sum() for b in drawn]
    return len(drawn) / len(boxes), float(np.mean(tall)), float(np.mean([b.mean() for b in drawn]))


def test_cutmix_box_statistics_match_unimatch_s_own_draws(up):
    """UniMatch drawing from its own random/np.random state and ours from a Generator: the
    fraction of boxes, of boxes taller than wide (about 3/4: the ratio is uniform in
    [0.3, 3.33]) and the mean area agree within 4 standard errors of the difference of two
    independent samples of n = 4000 (fractions: √(2·p(1−p)/n); for the area, the sd of the
    area fraction is taken from the samples)."""
    n, size = 4000, 65
    random.seed(0), np.random.seed(0)
    theirs = [up.transform.obtain_cutmix_box(size, p=0.5).numpy() > 0 for _ in range(n)]
    rng = np.random.default_rng(0)
    mine = [cutmix_box(size, 0.5, rng) for _ in range(n)]
    (p_t, tall_t, area_t), (p_o, tall_o, area_o) = _box_stats(theirs), _box_stats(mine)
    assert abs(p_o - p_t) < 4 * np.sqrt(2 * 0.25 / n)
    m = n * p_t
    assert abs(tall_o - tall_t) < 4 * np.sqrt(2 * tall_t * (1 - tall_t) / m)
    sd = np.std([b.mean() for b in theirs if b.any()])
    assert abs(area_o - area_t) < 4 * sd * np.sqrt(2 / m)


# -- one training step against fixmatch.py / unimatch.py --------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("unimatch")
    return load(make_dataset(base / "ds", n_labeled=3, n_unlabeled=5, n_val=1, size=48))


def _trainer(dataset, tmp_path, mode: str, theirs, device: str = "cpu") -> Trainer:
    """A Stage II trainer (R50, batch 2, crop 57, CutMix always, full precision) with
    UniMatch's weights."""
    cfg = TrainConfig(
        arch="deeplabv3plus_r50",
        pretrained=False,
        length_unit="iters",
        stage1_length=0,
        stage2_length=4,
        stage2_mode=mode,
        stage2_threshold=0.45,
        cutmix_prob=1.0,
        batch_size=2,
        crop=57,
        workers=0,
        device=device,
        amp=False,
        channels_last=False,
    )
    trainer = Trainer(cfg, dataset, out=tmp_path / "run", pseudo_dir=tmp_path, seed=4)
    trainer.model.load_state_dict(U.map_weights(theirs.state_dict()))
    return trainer


def _upstream_batches(trainer: Trainer, batches: tuple, views: int) -> tuple:
    """The loader's (labeled, unlabeled, CutMix source) dicts as UniMatch's zip yields them:
    (img_x, mask_x), (img_u_w, img_u_s1, img_u_s2, ignore_mask, cutmix_box1, cutmix_box2),
    (img_u_w_mix, img_u_s1_mix, img_u_s2_mix, ignore_mask_mix, _, _); fixmatch.py reads
    the first strong view and box only."""
    lb, ub, mb = batches
    u, mix = trainer._unlabeled(ub), trainer._unlabeled(mb)
    s = u.strong + [None] * (2 - views)
    b = [x.float() for x in u.box] + [None] * (2 - views)
    ms = mix.strong + [None] * (2 - views)
    return (
        (trainer._images(lb["image"]), lb["label"]),
        (u.image, *[x.clone() if x is not None else None for x in s], u.label, *b),
        (mix.image, *ms, mix.label, None, None),
    )


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    "mode,script,views,terms",
    [
        ("fixmatch", "fixmatch.py", 1, {"s1": "loss_u_s"}),
        ("unimatch", "unimatch.py", 2, {"s1": "loss_u_s1", "s2": "loss_u_s2", "fp": "loss_u_w_fp"}),
    ],
)
def test_one_step_equals_unimatch_s_own(
    up, dataset, tmp_path, monkeypatch, mode, script, views, terms, device
):
    """The same model, weights and batches through the trainer's step and through the loop
    body of UniMatch's script: the same targets (argmax, confidence, ignore mask, CutMix
    included), losses, mask ratio, and after one SGD step the same weights and batch-norm
    statistics. The trainer's weight λ is 1/2 here, UniMatch's (loss_x + loss_u) / 2. On a GPU
    the script keeps its .cuda() calls; cuDNN is made deterministic on both sides."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    theirs, _ = _pair(up, "resnet50", nclass=3, seed=1)
    theirs.to(device)
    trainer = _trainer(dataset, tmp_path, mode, theirs, device)
    assert unlabeled_weight(trainer.cfg, trainer.plan, 0) == 0.5
    batches = next(iter(trainer.loader(2, 0, 1)))
    assert all(b.any() for b in batches[1]["box"][:, :views].flatten(0, 1))  # CutMix in each
    cfg = U.config(conf_thresh=trainer.cfg.stage2_threshold)
    sc = U.Script(script)
    criterion_l, criterion_u = sc.criteria(cfg)
    loop = {
        "model": theirs,
        "optimizer": sc.optimizer(theirs, cfg),
        "criterion_l": criterion_l,
        "criterion_u": criterion_u,
        "cfg": cfg,
        "loader": [_upstream_batches(trainer, batches, views)],
    }
    torch.manual_seed(11)
    ref = sc.step(loop, cuda=device == "cuda")

    torch.manual_seed(11)
    out = trainer.micro_batch_loss(2, batches)
    loss = mixed_loss(out.loss_s, out.loss_u, 0.5)
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()

    w = out.targets["w"]
    assert torch.equal(w.label, ref["mask_u_w"]) and torch.equal(w.conf, ref["conf_u_w"])
    suffixes = {"s1": "1", "s2": "2"} if views == 2 else {"s1": ""}
    for key, sfx in suffixes.items():
        t = out.targets[key]
        assert torch.equal(t.label, ref[f"mask_u_w_cutmixed{sfx}"])
        assert torch.equal(t.conf, ref[f"conf_u_w_cutmixed{sfx}"])
        assert torch.equal(t.valid, ref[f"ignore_mask_cutmixed{sfx}"] != 255)
    assert 0.05 < float(ref["mask_ratio"]) < 0.95  # the threshold splits the pixels
    torch.testing.assert_close(out.mask_ratio.float(), ref["mask_ratio"].float())
    torch.testing.assert_close(out.loss_s, ref["loss_x"], rtol=1e-6, atol=0)
    for key, name in terms.items():
        torch.testing.assert_close(out.parts[key], ref[name], rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-6, atol=0)
    after = U.map_weights(theirs.state_dict())
    for name, value in trainer.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(value, after[name]), name


def test_self_mode_step_against_a_direct_computation(up, dataset, tmp_path):
    """ "self" has no UniMatch counterpart: its targets are the eval-mode argmax of the same
    view (UniMatch's CutMix-source prediction), its loss UniMatch's criterion_u form."""
    theirs, ours = _pair(up, "resnet50", nclass=3, seed=2)
    trainer = _trainer(dataset, tmp_path, "self", theirs)
    lb, ub = next(iter(trainer.loader(2, 0, 1)))
    x_l, y_l = trainer._images(lb["image"]), lb["label"]
    x_u, valid = trainer._images(ub["image"]), ub["label"] != 255
    with torch.no_grad():
        pred = theirs.eval()(x_u)
    theirs.train()
    conf, mask = pred.softmax(1).max(1)[0], pred.argmax(1)
    logits = theirs(torch.cat([x_l, x_u]))
    ce = F.cross_entropy(logits[2:], mask, reduction="none")
    l_u = (ce * ((conf >= 0.45) & valid)).sum() / valid.sum()
    l_s = F.cross_entropy(logits[:2], y_l, ignore_index=255)
    out = trainer.micro_batch_loss(2, (lb, ub))
    assert torch.equal(out.targets["u"].label, mask)
    torch.testing.assert_close(out.loss_u, l_u, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss_s, l_s, rtol=1e-6, atol=0)


def test_ade20k_config_takes_unimatch_s_closest_recipe():
    """UniMatch has no ADE20K config; configs/ade20k_1_128_seem.toml takes the learning rate
    and the 10x head of its closest one (COCO, configs/coco.yaml) and says so."""
    import tomllib
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "ade20k_1_128_seem.toml"
    train = tomllib.loads(path.read_text())["train"]
    coco = U.config("coco")
    assert (train["lr"], train["head_lr_mult"]) == (coco["lr"], coco["lr_multi"])
    lines = {ln.split("=")[0].strip(): ln for ln in path.read_text().splitlines() if "=" in ln}
    for key in ("lr", "head_lr_mult"):
        assert "(UniMatch COCO)" in lines[key], lines[key]
    assert not (U.UPSTREAM / "configs" / "ade20k.yaml").exists()
    assert "(UniMatch) ADE20K" not in path.read_text()
    assert "UniMatch's published split" not in path.read_text()
