"""The embedded demo dataset: determinism, layout, domain gap, and the [data] config section."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import data_manifest
from data_manifest import UserError, resolve_manifest
from data_manifest.config import load_config
from data_manifest.demo import CLASSES, DemoParams, _domain, generate, is_generated, render
from data_manifest.validate import validate

SMALL = dict(
    size=64, source_labeled=6, source_val=2, target_labeled=3, target_unlabeled=5, target_val=2
)


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_demo_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    params = DemoParams(seed=5, gap=0.6, **SMALL)
    generate(tmp_path / "a", params)
    generate(tmp_path / "b", params)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b
    assert len([k for k in a if k.endswith(".jpg")]) == 6 + 2 + 3 + 5 + 2
    other = _digest(generate(tmp_path / "c", DemoParams(seed=6, gap=0.6, **SMALL)).parents[1])
    assert other["target/JPEGImages/tgt_00000.jpg"] != a["target/JPEGImages/tgt_00000.jpg"]


def test_demo_layout_goes_through_voc_builder(tmp_path: Path) -> None:
    params = DemoParams(seed=1, **SMALL)
    target = generate(tmp_path, params)
    assert target == tmp_path / "target" / "manifest.jsonl"
    assert is_generated(tmp_path, params)
    assert not is_generated(tmp_path, DemoParams(seed=2, **SMALL))
    t = data_manifest.load(target)
    s = data_manifest.load(tmp_path / "source" / "manifest.jsonl")
    assert t.classes == s.classes == CLASSES and t.meta.background_index == 0
    assert {k: len(t.split(k)) for k in ("labeled", "unlabeled", "val")} == {
        "labeled": 3,
        "unlabeled": 5,
        "val": 2,
    }
    assert {k: len(s.split(k)) for k in ("labeled", "unlabeled", "val")} == {
        "labeled": 6,
        "unlabeled": 0,
        "val": 2,
    }
    assert t.meta.splits_made_by == "UniMatch splits demo/3"
    assert (
        (tmp_path / "target" / "splits" / "demo" / "3" / "labeled.txt")
        .read_text()
        .startswith("JPEGImages/tgt_00000.jpg SegmentationClass/tgt_00000.png\n")
    )
    assert validate(target).ok and validate(tmp_path / "source" / "manifest.jsonl").ok
    row = t.split("val")[0]
    assert t.read_image(row).shape == (64, 64, 3) and t.read_label(row).shape == (64, 64)


def test_demo_content() -> None:
    params = DemoParams(seed=0)
    seen = np.zeros(256, np.int64)
    for i in range(40):
        img, lab, q = render(params, False, i)
        assert img.dtype == np.uint8 and img.shape == (128, 128, 3) and lab.shape == (128, 128)
        seen += np.bincount(lab.ravel(), minlength=256)
    assert all(seen[:7] > 0) and seen[7:255].sum() == 0 and seen[255] > 0
    fg = seen[1:7].sum() / seen[:7].sum()
    assert 0.05 < fg < 0.6  # objects on a background, not a texture soup
    assert seen[255] / seen.sum() < 0.08  # thin ignore band only


def test_domain_gap_parameter() -> None:
    zero = DemoParams(gap=0.0)
    src, tgt = _domain(zero, False), _domain(zero, True)
    assert {**src.__dict__, "index": 1} == tgt.__dict__  # gap 0: one distribution

    def stats(gap: float) -> np.ndarray:
        p = DemoParams(seed=0, gap=gap)
        imgs = np.stack([render(p, True, i)[0] for i in range(12)]).astype(np.float32)
        return np.array([imgs.mean((0, 1, 2)), imgs.std((0, 1, 2))]).ravel()

    base = np.stack([render(zero, False, i)[0] for i in range(12)]).astype(np.float32)
    ref = np.array([base.mean((0, 1, 2)), base.std((0, 1, 2))]).ravel()
    d_small = np.abs(stats(0.2) - ref).sum()
    d_large = np.abs(stats(1.0) - ref).sum()
    assert d_large > d_small
    # the source domain does not depend on the gap
    assert np.array_equal(render(DemoParams(gap=0.9), False, 3)[0], render(zero, False, 3)[0])


def test_demo_params_checked() -> None:
    with pytest.raises(ValueError, match=r"demo_gap = 1.5: expected a number in \[0, 1\]"):
        DemoParams(gap=1.5)
    with pytest.raises(
        ValueError, match="demo_target_labeled = 0: expected an integer in \\[1, 100000\\]"
    ):
        DemoParams(target_labeled=0)


def _config(tmp_path: Path, data: str) -> dict:
    p = tmp_path / "run.toml"
    p.write_text(f'run_dir = "{tmp_path / "run"}"\n[data]\n{data}\n')
    return load_config(p)


def test_resolve_manifest_generates_demo_once(tmp_path: Path) -> None:
    small = "\n".join(f"demo_{k} = {v}" for k, v in SMALL.items())
    cfg = _config(tmp_path, f'demo = true\ndemo_root = "{tmp_path / "demo"}"\n{small}')
    path = resolve_manifest(cfg)
    assert path == tmp_path / "demo" / "target" / "manifest.jsonl" and path.is_file()
    before = path.stat().st_mtime_ns
    assert resolve_manifest(cfg) == path and path.stat().st_mtime_ns == before
    src = resolve_manifest(cfg, manifest=str(tmp_path / "demo" / "source" / "manifest.jsonl"))
    assert data_manifest.load(src).meta.dataset == "demo-source"


def test_resolve_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"run\.toml: \[data\] manifest is not set; expected"):
        resolve_manifest(_config(tmp_path, ""))
    with pytest.raises(UserError, match=r"\[data\] manifest = '.*nope\.jsonl' does not exist"):
        resolve_manifest(_config(tmp_path, f'manifest = "{tmp_path / "nope.jsonl"}"'))
    with pytest.raises(UserError, match=r"run\.toml: \[data\] demo_gap = 2.0: expected a number"):
        resolve_manifest(_config(tmp_path, "demo = true\ndemo_gap = 2.0"))
    with pytest.raises(UserError, match=r"\[data\] unknown key 'demo_sed'"):
        resolve_manifest(_config(tmp_path, "demo_sed = 1"))
    with pytest.raises(UserError, match=r"\[data\] demo = 'yes'; expected true or false"):
        resolve_manifest(_config(tmp_path, 'demo = "yes"'))
