"""The trainer refuses a pseudo-label folder that a calibrate run left incomplete or that no
longer matches its report (calibrate.check_complete), before any training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from _train_fixtures import PALETTE, make_dataset, write_config
from typer.testing import CliRunner

from data_manifest.io import encode_label_png
from data_manifest.manifest import load
from train.cli import app


def _setup(tmp_path: Path, pseudo: Path) -> tuple[Path, Path]:
    manifest = make_dataset(tmp_path / "ds", pseudo_dir=pseudo)
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run")
    return manifest, cfg


def _run(cfg: Path, manifest: Path, pseudo: Path) -> object:
    return CliRunner().invoke(
        app,
        ["fit", "--config", str(cfg), "--manifest", str(manifest), "--quiet"]
        + ["--pseudo-dir", str(pseudo)],
    )


def _one_line(res: object, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    msg = res.output.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_refuses_a_folder_marked_incomplete(tmp_path: Path) -> None:
    pseudo = tmp_path / "pseudo"
    manifest, cfg = _setup(tmp_path, pseudo)
    (pseudo / "calibration.incomplete").write_text("a run is writing this folder\n")
    _one_line(_run(cfg, manifest, pseudo), "calibration.incomplete", "incomplete")
    assert not (tmp_path / "run" / "train" / "latest.pt").exists()


def test_refuses_pngs_that_differ_from_the_report(tmp_path: Path) -> None:
    pseudo = tmp_path / "pseudo"
    manifest, cfg = _setup(tmp_path, pseudo)
    ids = [r.id for r in load(manifest).split("unlabeled")]
    digests = {i: hashlib.sha256((pseudo / f"{i}.png").read_bytes()).hexdigest() for i in ids}
    (pseudo / "calibration.json").write_text(json.dumps({"schema": 2, "pngs": digests}))
    (pseudo / f"{ids[1]}.png").write_bytes(encode_label_png(np.zeros((32, 32), np.uint8), PALETTE))
    _one_line(_run(cfg, manifest, pseudo), f"{ids[1]}.png", "differs from the sha256 recorded")
    # a report from a run on fewer images
    del digests[ids[0]]
    (pseudo / "calibration.json").write_text(json.dumps({"schema": 2, "pngs": digests}))
    _one_line(
        _run(cfg, manifest, pseudo), "has no pseudo-label for 1 of the unlabeled", repr(ids[0])
    )
