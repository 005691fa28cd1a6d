"""Training runs end to end: optimisation, Stage I → II, baselines, CLI, bad input, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_fixtures import (
    CLASSES,
    PALETTE,
    SUBPROCESS_ENV,
    TINY_MODEL,
    make_dataset,
    save_tiny_mit,
    write_config,
)
from typer.testing import CliRunner

from data_manifest.io import encode_label_png, read_label_png
from data_manifest.manifest import load
from train import data as tdata
from train.cli import app
from train.config import TrainConfig
from train.inference import load_checkpoint_model
from train.schedule import lambda_at
from train.trainer import Trainer

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _fit(cfg: Path, manifest: Path, *args: str):
    result = runner.invoke(
        app, ["fit", "--config", str(cfg), "--manifest", str(manifest), "--quiet", *args]
    )
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    manifest = make_dataset(base / "ds", pseudo_dir=base / "run" / "pseudo" / "cp")
    return base, manifest


@pytest.fixture(scope="module")
def fitted(tiny):
    """One run: 3 Stage I + 2 Stage II iterations; records the datasets each stage built."""
    base, manifest = tiny
    cfg = write_config(
        base / "run.toml", base / "run", stage1_length=3, stage2_length=2, eval_every=5
    )
    sources = []
    original = tdata.SegDataset.__init__

    def spy(self, manifest, rows, source, *a, **k):
        sources.append((source, len(rows)))
        original(self, manifest, rows, source, *a, **k)

    tdata.SegDataset.__init__ = spy
    try:  # without --quiet (errors only): the summary table is checked below
        result = runner.invoke(app, ["fit", "--config", str(cfg), "--manifest", str(manifest)])
    finally:
        tdata.SegDataset.__init__ = original
    assert result.exit_code == 0, result.output
    return base / "run" / "train", sources, result.output


def _tiny_config(**train: object) -> TrainConfig:
    """A [train] section for in-process runs on the tiny dataset: 32-px crops, 2 + 2 images
    per step, iterations as the unit, CPU, no loader workers."""
    keys: dict = dict(crop=32, batch_size=2, lr=0.01, workers=0, device="cpu", length_unit="iters")
    return TrainConfig(**{**keys, **train})


def test_a_few_real_steps_reduce_the_loss(tiny, tmp_path):
    base, manifest_path = tiny
    cfg = _tiny_config(
        arch="deeplabv3plus_effl0",
        pretrained=False,
        model_kwargs=TINY_MODEL,
        scale_min=0.75,
        scale_max=1.25,
        stage1_length=100,
        stage2=False,
    )
    trainer = Trainer(
        cfg,
        load(manifest_path),
        out=tmp_path / "run",
        pseudo_dir=base / "run" / "pseudo" / "cp",
        seed=0,
        show_progress=False,
    )
    batch = next(iter(trainer.loader(1, 0, 1)))
    losses = []
    for _ in range(6):
        record = trainer.train_step(0, iter([batch]))  # the same batch, the first lr
        # Stage I: the mean of the supervised and the pseudo-label loss (pseudo_weight 1)
        assert record["loss"] == pytest.approx(0.5 * (record["loss_s"] + record["loss_u"]))
        losses.append(record["loss"])
    assert losses[-1] < 0.6 * losses[0], losses


def test_stage_one_then_two(fitted):
    out, sources, output = fitted
    recs = _metrics(out)
    train = [r for r in recs if r["type"] == "train"]
    assert [r["stage"] for r in train] == [1, 1, 1, 2, 2]
    assert [r["iter"] for r in train] == [1, 2, 3, 4, 5]
    # Stage I reads GT + pseudo PNGs, Stage II GT + unlabeled images without PNGs
    assert sources == [("gt", 4), ("pseudo", 6), ("gt", 4), ("none", 6)]
    # L = (1 - λ)·L_s + λ·L_u throughout: Stage I's λ is 1/2 (pseudo_weight 1), Stage II's
    # λ(t) starts at lambda0 = 1/2, so the loss neither halves nor jumps at the switch
    assert [r["lambda"] for r in train] == [
        0.5,
        0.5,
        0.5,
        lambda_at(0.0, 0.5, 3.0),
        lambda_at(0.5, 0.5, 3.0),
    ]
    assert train[2]["lambda"] == train[3]["lambda"]
    for r in train:
        lam = r["lambda"]
        assert r["loss"] == pytest.approx((1 - lam) * r["loss_s"] + lam * r["loss_u"], rel=1e-5)
        assert r["loss_u"] > 0
    evals = [r for r in recs if r["type"] == "eval"]
    assert [e["iter"] for e in evals] == [3, 5]  # end of each stage
    for name in ("config.toml", "latest.pt", "best.pt", "loss.png", "miou.png", "final.json"):
        assert (out / name).is_file(), name
    final = json.loads((out / "final.json").read_text())
    assert final["miou"] == evals[-1]["miou"] and final["classes"] == CLASSES
    assert [final["iou"][c] for c in CLASSES] == evals[-1]["iou"]
    assert final["iterations"] == 5 and (final["stage1_iters"], final["stage2_iters"]) == (3, 2)
    assert "final per-class IoU" in output and "background" in output
    model, info = load_checkpoint_model(out / "best.pt")
    assert info["classes"] == CLASSES and info["iteration"] == final["best_iter"]
    assert info["miou"] == final["best_miou"]
    resolved = (out / "config.toml").read_text()
    assert "stage1_length = 3" in resolved and "seed = 3" in resolved


def test_rerun_of_a_finished_run_changes_nothing(fitted, tiny):
    out, _, _ = fitted
    base, manifest = tiny
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"}
    result = _fit(base / "run.toml", manifest)
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"}
    assert after == before


def test_no_stage2_and_labeled_only(tiny, tmp_path):
    base, manifest = tiny
    cfg = write_config(
        tmp_path / "c.toml", tmp_path / "run", stage1_length=2, stage2_length=2, eval_every=10
    )
    r = _fit(
        cfg,
        manifest,
        "--no-stage2",
        "--pseudo-dir",
        str(base / "run" / "pseudo" / "cp"),
        "--out",
        str(tmp_path / "s1"),
    )
    assert r.exit_code == 0, r.output
    assert [x["stage"] for x in _metrics(tmp_path / "s1") if x["type"] == "train"] == [1, 1]
    # the baseline needs no pseudo-labels at all, and trains S1 + S2 supervised iterations
    r = _fit(cfg, manifest, "--labeled-only", "--out", str(tmp_path / "lo"))
    assert r.exit_code == 0, r.output
    train = [x for x in _metrics(tmp_path / "lo") if x["type"] == "train"]
    assert len(train) == 4 and all(x["loss_u"] == 0 and x["loss"] == x["loss_s"] for x in train)
    # Stage II alone reads no PNG either
    cfg2 = write_config(
        tmp_path / "c2.toml",
        tmp_path / "run2",
        stage1_length=0,
        stage2_length=2,
        stage2_mode="fixmatch",
        stage2_threshold=0.5,
    )
    r = _fit(cfg2, manifest)
    assert r.exit_code == 0, r.output
    assert [x["stage"] for x in _metrics(tmp_path / "run2" / "train") if x["type"] == "train"] == [
        2,
        2,
    ]


@pytest.mark.slow
def test_segformer_trains_end_to_end_through_the_command_line(tiny, tmp_path):
    """arch = "segformer" from a save_pretrained folder (a tiny random MiT, as nvidia/mit-b5 is
    published), Stage I + Stage II by `python -m train fit`; the checkpoints load without it."""
    base, manifest = tiny
    folder = save_tiny_mit(tmp_path / "mit-tiny")
    cfg = write_config(
        tmp_path / "c.toml",
        base / "run",
        arch="segformer",
        pretrained=True,
        backbone_weights=str(folder),
        model_kwargs=None,
        stage1_length=2,
        stage2_length=2,
        eval_every=4,
        stage2_mode="unimatch",
    )
    out = tmp_path / "segformer"
    env = {**os.environ, **SUBPROCESS_ENV}
    r = subprocess.run(
        _cmd(cfg, manifest, "--out", str(out)), env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    train = [x for x in _metrics(out) if x["type"] == "train"]
    assert [x["stage"] for x in train] == [1, 1, 2, 2]
    assert all(np.isfinite(x["loss"]) and x["loss_s"] > 0 for x in train)
    final = json.loads((out / "final.json").read_text())
    assert final["classes"] == CLASSES and 0 <= final["miou"] <= 1
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    model, info = load_checkpoint_model(out / "best.pt")
    assert info["arch"] == "segformer" and info["mean"] == [0.485, 0.456, 0.406]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 48)).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("mode", ["self", "unimatch"])
def test_segformer_resumes_exactly_despite_dropout_and_drop_path(tiny, tmp_path, mode):
    """SegFormer trains with dropout and drop path (torch's generator; "unimatch" adds the
    feature perturbation's dropout): a run cut short in Stage II and resumed ends with the
    bytes of an uninterrupted run."""
    base, manifest = tiny
    folder = save_tiny_mit(tmp_path / "mit-tiny")
    cfg = _tiny_config(
        arch="segformer",
        backbone_weights=str(folder),
        stage1_length=2,
        stage2_length=2,
        save_every=1,
        stage2_mode=mode,
        stage2_threshold=0.5,
    )
    m = load(manifest)
    kw = dict(pseudo_dir=base / "run" / "pseudo" / "cp", seed=3, show_progress=False)
    Trainer(cfg, m, out=tmp_path / "a", **kw).fit()
    cut = Trainer(cfg, m, out=tmp_path / "b", **kw)
    cut.restore(resume=False)
    cut.train_stage(1, 0, 2)
    cut.train_stage(2, 2, 3)  # stopped here, as by a kill after latest.pt at iteration 3
    cut.folder.close()
    assert torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["info"]["iteration"] == 3
    Trainer(cfg, m, out=tmp_path / "b", **kw).fit(resume=True)
    for name in ("metrics.jsonl", "final.json", "best.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_segformer_configuration_errors_are_one_line(tiny, tmp_path, monkeypatch):
    base, manifest = tiny
    cfg = write_config(
        tmp_path / "c.toml",
        base / "run",
        arch="segformer",
        pretrained=True,
        backbone_weights=str(tmp_path / "mit-b5"),
        model_kwargs=None,
    )
    r = _fit(cfg, manifest)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert (
        "[train] backbone_weights = '" + str(tmp_path / "mit-b5") + "': folder not found; "
        "expected a folder written by save_pretrained"
    ) in r.output.replace("\n", "")
    monkeypatch.setitem(sys.modules, "transformers", None)  # the [hf] extra not installed
    r = _fit(cfg, manifest)
    assert r.exit_code == 1
    assert (
        "[train] arch = 'segformer': transformers is not installed; expected the [hf] extra"
        in r.output
    )


def test_bad_inputs_give_one_line(tiny, tmp_path):
    base, manifest = tiny
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", lr_mult=3.0)
    r = _fit(cfg, manifest)
    assert r.exit_code == 1
    assert "c.toml: [train] unknown key 'lr_mult'; expected one of" in r.output
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", lambda0=1.5)
    r = _fit(cfg, manifest)
    assert r.exit_code == 1 and "[train] lambda0 = 1.5: expected a number in [0, 1]" in r.output
    # missing pseudo-labels (this run's default pseudo_dir is empty)
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run")
    r = _fit(cfg, manifest)
    assert r.exit_code == 1
    assert "pseudo-label for unlabeled image 'unlabeled_000' not found" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    # mismatched pseudo-label size
    pdir = tmp_path / "pseudo"
    for row in load(manifest).split("unlabeled"):
        pdir.mkdir(exist_ok=True)
        (pdir / f"{row.id}.png").write_bytes(
            encode_label_png(np.zeros((32, 31), np.uint8), PALETTE)
        )
    r = _fit(cfg, manifest, "--pseudo-dir", str(pdir))
    assert r.exit_code == 1
    assert "unlabeled_000.png: pseudo-label is 32x31 (HxW); expected 32x32" in r.output


def test_resume_refuses_a_changed_config(fitted, tiny, tmp_path):
    out, _, _ = fitted
    base, manifest = tiny
    cfg = write_config(
        tmp_path / "c.toml", base / "run", stage1_length=3, stage2_length=2, eval_every=5, lr=0.02
    )
    r = _fit(cfg, manifest, "--out", str(out))
    assert r.exit_code == 1
    assert "latest.pt: [train] lr = 0.01 in the run being resumed but 0.02 now" in r.output


def test_evaluate_predict_export_splits(fitted, tiny, tmp_path):
    out, _, _ = fitted
    base, manifest = tiny
    final = json.loads((out / "final.json").read_text())
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(out / "latest.pt"),
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "ev.json"),
            "--mode",
            "sliding",
            "--crop",
            "64",
        ],
    )
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["miou"] == pytest.approx(final["miou"], abs=1e-12)  # 32 px images fit one window
    r = runner.invoke(
        app,
        [
            "predict",
            "--checkpoint",
            str(out / "latest.pt"),
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "pred"),
        ],
    )
    assert r.exit_code == 0, r.output
    m = load(manifest)
    model, info = load_checkpoint_model(out / "latest.pt")
    for row in m.split("val"):
        pred = read_label_png(tmp_path / "pred" / f"{row.id}.png")
        x = torch.from_numpy(m.read_image(row)).permute(2, 0, 1)[None].float() / 255
        x = (x - 0.5) / 0.5
        with torch.no_grad():
            ref = model(x).argmax(1)[0].numpy()
        assert np.array_equal(pred, ref)
    r = runner.invoke(
        app,
        [
            "export-splits",
            "--manifest",
            str(manifest),
            "--pseudo-dir",
            str(base / "run" / "pseudo" / "cp"),
            "--out",
            str(tmp_path / "sp"),
        ],
    )
    assert r.exit_code == 0, r.output
    lab = (tmp_path / "sp" / "labeled.txt").read_text().splitlines()
    assert lab[0] == "JPEGImages/labeled_000.png SegmentationClass/labeled_000.png"
    unl = (tmp_path / "sp" / "unlabeled.txt").read_text().splitlines()
    assert len(unl) == 6
    img, png = unl[0].split(" ")
    assert img == "JPEGImages/unlabeled_000.png"
    assert os.path.join(str(m.root), png) == str(
        base / "run" / "pseudo" / "cp" / "unlabeled_000.png"
    )
    both = (tmp_path / "sp" / "labeled_plus_pseudo.txt").read_text().splitlines()
    assert both == lab + unl
    # a checkpoint for other classes is refused
    other = tmp_path / "other.pt"
    ck = torch.load(out / "latest.pt", weights_only=True)
    ck["info"]["classes"] = ["x", "y", "z"]
    torch.save(ck, other)
    r = runner.invoke(app, ["evaluate", "--checkpoint", str(other), "--manifest", str(manifest)])
    assert r.exit_code == 1
    assert "other.pt: classes = ['x', 'y', 'z'] (3); expected the manifest's" in r.output
    for command in ("evaluate", "predict"):
        r = runner.invoke(
            app,
            [
                command,
                "--checkpoint",
                str(out / "latest.pt"),
                "--manifest",
                str(manifest),
                "--mode",
                "tiled",
            ],
        )
        assert r.exit_code == 1
        assert "--mode = 'tiled': expected 'whole' or 'sliding'" in r.output


def _cmd(cfg: Path, manifest: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train",
        "fit",
        "--config",
        str(cfg),
        "--manifest",
        str(manifest),
        "--quiet",
        *args,
    ]


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tiny, tmp_path):
    _, manifest = tiny
    base = tiny[0]
    cfg = write_config(
        tmp_path / "c.toml",
        base / "run",
        stage1_length=6,
        stage2_length=6,
        eval_every=4,
        save_every=2,
        stage2_mode="unimatch",
        workers=1,
    )
    env = {**os.environ, **SUBPROCESS_ENV}
    subprocess.run(
        _cmd(cfg, manifest, "--out", str(tmp_path / "a")),
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    proc = subprocess.Popen(
        _cmd(cfg, manifest, "--out", str(tmp_path / "b")),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    subprocess.run(
        _cmd(cfg, manifest, "--out", str(tmp_path / "b")),
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    for name in ("metrics.jsonl", "final.json", "best.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa, sb = a["train_state"], b["train_state"]
    assert sa["config"].pop("out") != sb["config"].pop("out")
    assert {k: v for k, v in sa.items() if k != "optimizer"} == {
        k: v for k, v in sb.items() if k != "optimizer"
    }
    for key, state in sa["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"]
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, cfg: Path, manifest: Path, out: Path, timeout: int = 300):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *_cmd(cfg, manifest, "--out", str(out))[1:],
    ]
    env = {**os.environ, **SUBPROCESS_ENV}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _check_ddp_run(out: Path, world: int) -> None:
    recs = _metrics(out)
    train = [x for x in recs if x["type"] == "train"]
    assert [x["stage"] for x in train] == [1, 1, 2, 2]
    assert all(np.isfinite(x["loss"]) for x in train)
    # rank 0 writes each record once; evaluations at the end of each stage
    assert [x["iter"] for x in recs if x["type"] == "eval"] == [2, 4]
    state = torch.load(out / "latest.pt", weights_only=True)["train_state"]
    assert state["world_size"] == world and state["iteration"] == 4
    assert json.loads((out / "final.json").read_text())["iterations"] == 4


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"}


def _ddp_run_and_rerun(tiny, tmp_path: Path, world: int, **train: object) -> None:
    """Train 2 + 2 iterations under torchrun, check the run, then re-run the finished run: every
    rank restores the last evaluation and returns, changing nothing (rank 1 used to evaluate
    again alone and wait on rank 0 in a collective)."""
    base, manifest = tiny
    cfg = write_config(
        tmp_path / "c.toml",
        base / "run",
        stage1_length=2,
        stage2_length=2,
        eval_every=4,
        batch_size=1,
        accum_steps=2,
        **train,
    )
    out = tmp_path / "ddp"
    r = _torchrun(world, cfg, manifest, out)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_ddp_run(out, world=world)
    before = _outputs(out)
    r = _torchrun(world, cfg, manifest, out, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _outputs(out) == before


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_with_gloo(tiny, tmp_path):
    """UniMatch's Stage II under DDP: two forward passes (one with need_fp) per backward."""
    _ddp_run_and_rerun(tiny, tmp_path, world=2, stage2_mode="unimatch", stage2_threshold=0.5)


def test_resume_refuses_changed_pseudo_labels(tiny, tmp_path):
    base, manifest = tiny
    pdir = tmp_path / "pseudo"
    make_dataset(tmp_path / "ds", pseudo_dir=pdir)  # same images, so the same PNGs
    (pdir / "calibration.json").write_text('{"alpha": 0.05}\n')
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", stage1_length=1, stage2=False)
    assert _fit(cfg, manifest, "--pseudo-dir", str(pdir)).exit_code == 0
    (pdir / "calibration.json").write_text('{"alpha": 0.1}\n')
    r = _fit(cfg, manifest, "--pseudo-dir", str(pdir))
    assert r.exit_code == 1
    assert "calibration.json: the pseudo-labels changed since the run in" in r.output
    r = _fit(cfg, manifest, "--pseudo-dir", str(pdir), "--restart")
    assert r.exit_code == 0, r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["deeplabv3plus_effl0", "segformer"])
def test_fit_on_cuda_with_amp_and_channels_last(tiny, tmp_path, arch):
    """Stage I + Stage II on CUDA: float16 autocast, gradient scaling, channels_last."""
    base, manifest = tiny
    model_keys: dict = {}
    if arch == "segformer":
        folder = save_tiny_mit(tmp_path / "mit-tiny")
        model_keys = dict(pretrained=True, backbone_weights=str(folder), model_kwargs=None)
    cfg = write_config(
        tmp_path / "c.toml",
        base / "run",
        arch=arch,
        stage1_length=2,
        stage2_length=2,
        stage2_mode="unimatch",
        device="cuda",
        workers=1,
        **model_keys,
    )
    r = _fit(cfg, manifest, "--out", str(tmp_path / "gpu"))
    assert r.exit_code == 0, r.output
    train = [x for x in _metrics(tmp_path / "gpu") if x["type"] == "train"]
    assert [x["stage"] for x in train] == [1, 1, 2, 2]
    assert all(np.isfinite(x["loss"]) for x in train)
    model, _ = load_checkpoint_model(tmp_path / "gpu" / "best.pt", map_location="cuda")
    assert next(model.parameters()).is_cuda
    state = torch.load(tmp_path / "gpu" / "latest.pt", weights_only=True)["train_state"]
    assert state["scaler"]["scale"] > 0  # float16 autocast with gradient scaling ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ddp_on_cuda_through_nccl(tiny, tmp_path):
    """torchrun on the GPUs there are (two, or one: NCCL refuses two ranks on one GPU), the
    code path of a multi-GPU run: process group cpu:gloo,cuda:nccl, DDP, SyncBatchNorm, AMP."""
    world = min(2, torch.cuda.device_count())
    _ddp_run_and_rerun(
        tiny, tmp_path, world=world, stage2_mode="unimatch", device="cuda", workers=1
    )
