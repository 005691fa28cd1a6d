"""docs/data_manifest.md's walkthrough "Your own dataset, from a folder to pseudo-labels", run
exactly as written, with configs/custom_example.toml, on a dataset laid out as it describes.

The dataset: the demo's target images (small ones) as ``my_data/images/siteA/*.png`` and
``siteB/*.jpg``, greyscale masks in ``my_data/masks/`` for 64 of them, class 0 named "backdrop";
the network: a small trainer checkpoint whose class names are the demo's (mapped by the config's
vocabulary). What the walkthrough promises is checked on the way: the build summary, a cache
that serves every α (full scores at K = 7), both calibrate runs, and report.html as the last
line of calibrate's output.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_manifest
from data_manifest.demo import DemoParams, generate

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "data_manifest.md"
SECTION = "## Your own dataset, from a folder to pseudo-labels"
NAMES = ["backdrop", "wall", "lawn", "stones", "animal", "drink", "money"]
TINY = {"aspp_channels": 8, "low_proj": 8, "decoder_channels": 8}


def walkthrough_commands() -> list[str]:
    """The command lines of the section's bash blocks (continuation lines joined)."""
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def make_my_data(tmp: Path) -> None:
    """``my_data/`` as the walkthrough lays it out, from a small demo target domain."""
    params = DemoParams(
        size=48, source_labeled=1, source_val=0, target_labeled=24, target_unlabeled=40,
        target_val=40,
    )  # fmt: skip
    m = data_manifest.load(generate(tmp / "demo", params))
    root = tmp / "my_data"
    root.mkdir()
    (root / "classes.txt").write_text("".join(n + "\n" for n in NAMES))
    for i, row in enumerate(m.rows):
        site, ext = ("siteA", ".png") if i % 2 else ("siteB", ".jpg")
        image = root / "images" / site / f"{row.id}{ext}"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m.read_image(row)).save(image)
        if row.split != "unlabeled":  # 64 annotated images; the other 40 are not
            mask = root / "masks" / site / f"{row.id}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.read_label(row), mode="L").save(mask)
    shutil.rmtree(tmp / "demo")


def make_model(tmp: Path) -> None:
    """``models/segmenter.pt``: a small trainer checkpoint with the demo annotator's classes."""
    import torch

    from data_manifest.layouts import voc_colormap
    from train.checkpoint import checkpoint_info, save_checkpoint
    from train.models import build_model

    torch.manual_seed(0)
    classes = ["background", "brick", "grass", "gravel", "fur", "coffee", "coins"]
    model = build_model("deeplabv3plus_effl0", len(classes), pretrained=False, **TINY)
    info = checkpoint_info("deeplabv3plus_effl0", classes, voc_colormap(7), TINY)
    (tmp / "models").mkdir()
    save_checkpoint(tmp / "models" / "segmenter.pt", model, info)


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = walkthrough_commands()
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "data_manifest"],
        ["python", "-m", "data_manifest"],
        ["python", "-m", "data_manifest"],
        ["python", "-m", "annotate"],
        ["python", "-m", "calibrate"],
        ["python", "-m", "calibrate"],
    ]
    make_my_data(tmp_path)
    make_model(tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "custom_example.toml", tmp_path / "configs")
    outputs = []
    for line in commands:
        argv = shlex.split(line)
        argv[0] = sys.executable
        done = subprocess.run(
            argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
        )
        assert done.returncode == 0, (line, done.stdout[-3000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr, (line, done.stderr[-3000:])
        outputs.append(done)

    build = outputs[0]
    assert "104 images (64 labeled, 40 unlabeled, 0 val)" in build.stdout, build.stdout
    assert "64 in masks/ (40 images without one: unlabeled)" in build.stdout
    assert "class 0 'backdrop'" in build.stdout
    assert "warning" not in build.stderr, build.stderr
    m = data_manifest.load(tmp_path / "my_data" / "manifest-split.jsonl")
    assert [len(m.split(s)) for s in ("labeled", "unlabeled", "val")] == [24, 40, 40]
    assert m.classes == NAMES and m.meta.background_index == 0
    assert m.row(m.split("labeled")[0].id).image.startswith("images/site")

    import annotate
    from annotate.config import auto_topk

    cache = annotate.open_cache(tmp_path / "runs" / "my_data" / "cache.zarr")
    assert cache.meta.topk == auto_topk(7) == 0  # full scores: any α, any mode later
    assert len(cache) == 104

    for done, folder, mode in ((outputs[4], "cp", "pixel"), (outputs[5], "cp_class", "class")):
        out = tmp_path / "runs" / "my_data" / "pseudo" / folder
        fig = json.loads((out / "calibration.json").read_text())
        assert fig["mode"] == mode and fig["unlabeled"]["images"] == 40
        last = done.stdout.strip().splitlines()[-1]
        assert last == f"report: {(out / 'report.html').resolve().as_uri()}", last
        html = (out / "report.html").read_text(encoding="utf-8")
        assert 'id="legend"' in html and "backdrop" in html and "255 ignored" in html
        assert html.count('class="entry"') == 12  # the gallery: 12 images by default
        assert len(list(out.glob("*.png"))) == 40
    # the test's dataset has masks for no unlabeled image: the gallery ranks by kept fraction
    assert np.isfinite(fig["qhat"]["pooled"])
