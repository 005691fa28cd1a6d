"""Annotator backends: torch (TorchScript and trainer checkpoints) and demo (SEEM: in
test_annotate_seem.py, transformers: in test_annotate_hf.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _annotate_fixtures import CLASSES, PALETTE, make_dataset, save_torchscript

import data_manifest
from annotate import open_cache
from annotate.annotators import BACKENDS, build_annotator, load_torch
from annotate.config import AnnotateConfig
from annotate.run import run_annotation
from data_manifest.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def softmax(x, axis=0):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_backend_dict():
    assert set(BACKENDS) == {"demo", "torch", "hf", "seem"}
    with pytest.raises(UserError, match="annotator = 'sam'; expected one of demo, torch, hf"):
        build_annotator(_cfg_unchecked("sam"), None)


def _cfg_unchecked(name):
    c = AnnotateConfig()
    object.__setattr__(c, "annotator", name)
    return c


def test_torchscript_without_metadata_uses_config(tmp_path):
    man = make_dataset(tmp_path / "ds", 1, 0, 0)
    m = data_manifest.load(man)
    path = save_torchscript(tmp_path / "m.pt", num_classes=2)
    cfg = AnnotateConfig(
        annotator="torch",
        model=str(path),
        model_classes=("cat", "dog"),
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.5, 0.5),
        normalization="softmax",
    )
    ann = load_torch(cfg, m)
    assert ann.classes == ("cat", "dog") and ann.extra["format"] == "torchscript"
    img = m.read_image(m.rows[0])
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    got = ann.predict(x).detach().numpy()
    norm = (img.astype(np.float32) / 255 - [0.1, 0.2, 0.3]) / 0.5
    want = (
        torch.jit.load(str(path))(torch.from_numpy(norm.astype(np.float32)).permute(2, 0, 1)[None])
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # defaults: the dataset's classes, which must then match the output channels
    with pytest.raises(
        UserError,
        match=r"model output has shape \(1, 2, 20, 28\); expected "
        r"\(B, 3, h, w\)",
    ):
        load_torch(AnnotateConfig(annotator="torch", model=str(path)), m).predict(x)


def test_torch_backend_rejects_non_models(tmp_path):
    man = make_dataset(tmp_path / "ds", 1, 0, 0)
    m = data_manifest.load(man)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.pt: cannot read checkpoint"):
        load_torch(AnnotateConfig(annotator="torch", model=str(tmp_path / "junk.pt")), m)
    with pytest.raises(UserError, match="model is not set"):
        load_torch(AnnotateConfig(annotator="torch"), m)


def _trainer_checkpoint(path: Path) -> Path:
    checkpoint = pytest.importorskip("train.checkpoint")
    from train.models import build_model

    torch.manual_seed(0)
    net = build_model("deeplabv3plus_effl0", len(CLASSES), pretrained=False).eval()
    info = checkpoint.checkpoint_info("deeplabv3plus_effl0", CLASSES, PALETTE)
    torch.save({"model": net.state_dict(), "info": info}, path)
    return path


@pytest.mark.slow
def test_trainer_checkpoint_and_demo_backend(tmp_path):
    man = make_dataset(tmp_path / "ds", 1, 1, 0, size=(32, 32))
    m = data_manifest.load(man)
    ckpt = _trainer_checkpoint(tmp_path / "best.pt")
    cfg = AnnotateConfig(annotator="demo", model=str(ckpt), batch_size=2, device="cpu", topk=0)
    run_annotation(cfg, m, tmp_path / "c.zarr")
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.meta.annotator == "demo"
    assert cache.meta.extra["model"]["arch"] == "deeplabv3plus_effl0"
    from train.inference import load_checkpoint_model

    net, info = load_checkpoint_model(ckpt)
    row = m.rows[1]
    x = torch.from_numpy(m.read_image(row)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(info["mean"]).view(1, 3, 1, 1)) / torch.tensor(info["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        want = softmax(net(x)[0].numpy())
    np.testing.assert_allclose(cache.probs(row.id), want, atol=4e-3)


def test_demo_backend_without_checkpoint_or_train_config(tmp_path, monkeypatch):
    man = make_dataset(tmp_path / "ds", 1, 0, 0)
    monkeypatch.chdir(tmp_path)  # no data/demo/annotator/best.pt here
    cfg = AnnotateConfig(annotator="demo", demo_train_config=str(tmp_path / "none.toml"))
    with pytest.raises(
        UserError,
        match=r"demo_train_config = '.*none.toml': file not found; "
        r"expected the run config that trains the demo",
    ):
        build_annotator(cfg, data_manifest.load(man))


def test_demo_backend_trains_only_the_default_checkpoint(tmp_path, monkeypatch):
    """A misspelled model path is an error; training would write the default path only."""
    man = make_dataset(tmp_path / "ds", 1, 0, 0)
    monkeypatch.setattr("annotate.annotators.subprocess.run", lambda *a, **k: 1 / 0)
    cfg = AnnotateConfig(annotator="demo", model=str(tmp_path / "best.ptt"))
    with pytest.raises(
        UserError, match=r"model = '.*best.ptt': file not found; expected a demo annotator"
    ):
        build_annotator(cfg, data_manifest.load(man))


def test_demo_backend_trains_missing_annotator_in_a_subprocess(tmp_path, monkeypatch):
    man = make_dataset(tmp_path / "ds", 1, 0, 0)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "data" / "demo" / "annotator" / "best.pt"
    train_cfg = tmp_path / "demo_annotator.toml"
    train_cfg.write_text("run_dir = 'x'\n")
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        save_torchscript(target, meta={"classes": CLASSES})

        class P:
            returncode = 0

        return P()

    monkeypatch.setattr("annotate.annotators.subprocess.run", fake_run)
    cfg = AnnotateConfig(annotator="demo", demo_train_config=str(train_cfg))
    ann = build_annotator(cfg, data_manifest.load(man))
    assert calls[0][1:] == ["-m", "train", "fit", "--config", str(train_cfg)]
    assert ann.name == "demo" and ann.classes == tuple(CLASSES)
