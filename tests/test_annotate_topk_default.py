"""The default storage (``topk = -1``) serves every α in [0.01, 0.3], both modes and every set
rule: "annotate once, calibrate as often as you like".

A confident annotator (right on most pixels with p ≈ 1, as the demo's is) makes q̂ tiny at
large α, so the LAC threshold 1 − q̂ falls into float16's last step below 1, where a top-k
entry cannot tell whether a pixel passes; with 7 classes the default therefore stores full
scores. The same images stored as top-2 (the former default) are refused at α = 0.3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from annotate.config import AnnotateConfig, auto_topk
from annotate.run import run_annotation
from calibrate.cli import app as calibrate_app
from data_manifest import Manifest, Meta, Row
from data_manifest.io import encode_label_png
from data_manifest.layouts import voc_colormap

CLASSES = ["background", "a", "b", "c", "d", "e", "f"]
BIN = 256 / 7  # the class of a pixel is its red value // BIN


class Confident(torch.nn.Module):
    """Logits −60·|r − (j + ½)| for class j, r = red value / BIN: p ≈ 1 inside a bin, unsure
    only within a few grey levels of a bin's edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x[:, :1] * (255.0 * 7.0 / 256.0)  # red value / BIN
        centres = torch.arange(7, dtype=x.dtype, device=x.device).view(1, 7, 1, 1) + 0.5
        return -60.0 * (r - centres).abs()


def make_data(root: Path) -> Path:
    """Smooth red ramps (labels from the same rule, 8 % of them wrong) in a 7-class manifest."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("labeled", 8), ("unlabeled", 8), ("val", 2)):
        for i in range(n):
            iid = f"{split[0]}{i}"
            h, w = 24, 32
            yy, xx = np.mgrid[0:h, 0:w]
            red = (rng.uniform(0, 255) + 6 * xx + 3 * yy) % 256
            img = np.stack([red, rng.integers(0, 256, (h, w)), np.full((h, w), 90)], -1)
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"{iid}.png")
            lab_rel = None
            if split != "unlabeled":
                lab = np.minimum(red // BIN, 6).astype(np.uint8)
                flip = rng.random((h, w)) < 0.08
                lab[flip] = rng.integers(0, 7, int(flip.sum()))
                lab_rel = f"labels/{iid}.png"
                (root / "labels").mkdir(exist_ok=True)
                (root / lab_rel).write_bytes(encode_label_png(lab, voc_colormap(7)))
            rows.append(Row(iid, f"images/{iid}.png", lab_rel, split, h, w))
    meta = Meta(dataset="ramps", classes=CLASSES, palette=voc_colormap(7), background_index=0)
    return Manifest(meta=meta, rows=rows).save(root / "manifest.jsonl")


def annotate(root: Path, manifest: Path, topk: int) -> Path:
    model = root / "confident.pt"
    if not model.is_file():
        extra = {"classes": CLASSES, "mean": [0, 0, 0], "std": [1, 1, 1]}
        torch.jit.save(
            torch.jit.script(Confident()), model, _extra_files={"annotator.json": json.dumps(extra)}
        )
    cfg = AnnotateConfig(
        annotator="torch", model=str(model), device="cpu", batch_size=4, workers=1, topk=topk
    )
    from data_manifest import load

    cache = root / f"cache_{topk}.zarr"
    run_annotation(cfg, load(manifest), cache)
    return cache


def calibrate(manifest: Path, cache: Path, out: Path, *args: str) -> object:
    argv = ["run", "--manifest", str(manifest), "--cache", str(cache), "--out-dir", str(out)]
    return CliRunner().invoke(
        calibrate_app, [*argv, "--quiet", "--no-plots", "--workers", "1", *args]
    )


def test_auto_topk_rule() -> None:
    assert [auto_topk(k) for k in (2, 3, 7, 12)] == [0, 0, 0, 0]  # full scores
    assert [auto_topk(k) for k in (13, 19, 21, 150)] == [4, 4, 4, 4]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ramps")
    manifest = make_data(root)
    return manifest, annotate(root, manifest, topk=-1)


@pytest.mark.parametrize("mode", ["pixel", "class"])
@pytest.mark.parametrize("alpha", ["0.01", "0.3"])
def test_default_cache_serves_every_alpha_in_both_modes(data, tmp_path, mode, alpha) -> None:
    manifest, cache = data
    r = calibrate(manifest, cache, tmp_path / "o", "--alpha", alpha, "--mode", mode)
    assert r.exit_code == 0, r.output
    fig = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert fig["unlabeled"]["undetermined_pixels"] == 0 and fig["unlabeled"]["topk"] == 0
    q = fig["qhat"] if mode == "pixel" else fig["qhat"]["pooled"]
    if alpha == "0.3":  # the case top-k cannot serve: 1 − q̂ inside float16's last step
        assert 1 - q > 1 - 2**-12, q


@pytest.mark.parametrize(
    "args",
    [
        ("--score", "aps"),
        ("--max-set-size", "1"),
        ("--mode", "image"),
        ("--method", "threshold"),
        ("--method", "risk", "--risk", "0.3"),
        ("--method", "raw"),
    ],
    ids=lambda a: "-".join(x.lstrip("-") for x in a),
)
def test_default_cache_serves_every_rule_at_alpha_0_3(data, tmp_path, args) -> None:
    manifest, cache = data
    r = calibrate(manifest, cache, tmp_path / "o", "--alpha", "0.3", *args)
    assert r.exit_code == 0, r.output


def test_top2_of_the_same_images_is_refused_at_alpha_0_3(data, tmp_path) -> None:
    """Why the default changed: the former default (top-2 at K = 7) cannot serve α = 0.3."""
    manifest, _ = data
    cache = annotate_top2(manifest)
    r = calibrate(manifest, cache, tmp_path / "o", "--alpha", "0.3")
    assert r.exit_code == 1
    assert "cannot be labeled exactly from the top 2 classes" in r.output


def test_docs_read_top_k_indices_lazily(data, tmp_path) -> None:
    """docs/annotate.md's snippet for the class indices of a top-k image, run as written (on a
    top-2 cache): it gives the classes of ``dask_scores``, lazily."""
    import re

    import annotate

    manifest, _ = data
    cache = annotate.open_cache(annotate_top2(manifest))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "annotate.md").read_text()
    section = doc.split("class indices are a second array", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    image_id = "u0"
    scope = {"cache": cache}
    exec(snippet.replace('"tgt_00000"', repr(image_id)), scope)  # noqa: S102 (our own docs)
    index = scope["index"]
    assert type(index).__module__.startswith("dask")
    stored = cache.stored(image_id)
    np.testing.assert_array_equal(index.compute(), stored["topk_index"])
    assert cache.dask_scores(image_id).shape == index.shape


def annotate_top2(manifest: Path) -> Path:
    path = manifest.parent / "cache_2.zarr"
    return path if path.is_dir() else annotate(manifest.parent, manifest, topk=2)
