"""The ``python -m data_manifest`` command line through typer.testing.CliRunner."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
from _data_manifest_fixtures import make_ade, make_cityscapes, make_folder, make_voc
from typer.testing import CliRunner

import data_manifest
from data_manifest.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_build_every_layout(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "VOC2012")
    r = run("build", "voc", voc, "--sbd", "SegmentationClassAug")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "2 labeled, 2 unlabeled, 1 val" in r.output
    assert data_manifest.load(voc / "manifest.jsonl").meta.dataset == "voc"
    ade = make_ade(tmp_path / "ADE")
    assert run("build", "ade20k", ade, "--out", tmp_path / "ade.jsonl").exit_code == 0
    assert data_manifest.load(tmp_path / "ade.jsonl").num_classes == 150
    cs = make_cityscapes(tmp_path / "cs")
    assert run("build", "cityscapes", cs).exit_code == 0
    assert len(data_manifest.load(cs / "manifest.jsonl").split("labeled")) == 2
    own = make_folder(tmp_path / "own")
    r = run("build", "folder", own, "--dataset", "mine")
    assert r.exit_code == 0, r.output
    assert data_manifest.load(own / "manifest.jsonl").meta.dataset == "mine"


def test_build_error_is_one_line(tmp_path: Path) -> None:
    r = run("build", "voc", tmp_path / "missing")
    assert r.exit_code == 1
    assert "no JPEGImages/ folder; expected the root of a PASCAL VOC dataset" in r.output
    assert "Traceback" not in r.output


def test_validate_skip_bad_and_exit_codes(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    assert run("build", "voc", root).exit_code == 0
    m = root / "manifest.jsonl"
    r = run("validate", m)
    assert r.exit_code == 0 and "6 rows, no problems" in r.output
    (root / "JPEGImages" / "u1.jpg").unlink()
    (root / "JPEGImages" / "s2.jpg").write_bytes(b"junk")
    r = run("validate", m)
    assert r.exit_code == 1
    assert "'JPEGImages/u1.jpg': file not found" in r.output
    assert "'JPEGImages/s2.jpg': truncated file" in r.output
    assert "2 problems in 2 rows" in r.output
    r = run("validate", m, "--skip-bad")
    assert r.exit_code == 0, r.output
    clean = data_manifest.load(root / "manifest.clean.jsonl")
    assert sorted(r.id for r in clean.rows) == ["a1", "a2", "s1", "v1"]
    rejects = (root / "manifest.rejects.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in rejects] == ["s2", "u1"]
    assert run("validate", root / "manifest.clean.jsonl").exit_code == 0


def test_summary_json_matches_labels(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    run("build", "voc", root, "--sbd", "SegmentationClassAug")
    m = data_manifest.load(root / "manifest.jsonl")
    r = run("summary", root / "manifest.jsonl", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert "images per split" in r.output and "aeroplane" in r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["splits"]["labeled"] == {"images": 2, "with_label": 2, "pixels": 6 * 8 + 6 * 9}
    expect = np.zeros(256, np.int64)
    for row in m.split("labeled"):
        lab = m.read_label(row)
        for v in np.unique(lab):
            expect[v] += int((lab == v).sum())
    assert s["label_pixels"]["labeled"]["per_class"] == expect[:21].tolist()
    assert s["label_pixels"]["labeled"]["ignore"] == 8 + 9  # the 255 top rows
    assert s["fingerprint"] == m.fingerprint


def test_export_and_split(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", train=tuple(f"t{i}" for i in range(8)))
    run("build", "voc", root, "--sbd", "SegmentationClassAug")
    m = root / "manifest.jsonl"
    r = run(
        "split", m, "--labeled", "3", "--val", "0.25", "--seed", "1", "-o", tmp_path / "x.jsonl"
    )
    assert r.exit_code == 0, r.output
    x = data_manifest.load(tmp_path / "x.jsonl")
    assert (len(x.split("labeled")), len(x.split("val"))) == (3, 3)  # 0.25 of 11 -> 3
    assert x.root == root.resolve() and x.meta.splits_made_by.startswith("split: labeled=3")
    r2 = run(
        "split", m, "--labeled", "3", "--val", "0.25", "--seed", "1", "-o", tmp_path / "y.jsonl"
    )
    assert r2.exit_code == 0
    assert (tmp_path / "x.jsonl").read_bytes() == (tmp_path / "y.jsonl").read_bytes()
    r = run("export", tmp_path / "x.jsonl", "--out", tmp_path / "splits" / "mine" / "3")
    assert r.exit_code == 0, r.output
    back = run(
        "build",
        "voc",
        root,
        "--splits",
        tmp_path / "splits" / "mine" / "3",
        "-o",
        tmp_path / "z.jsonl",
    )
    assert back.exit_code == 0, back.output
    assert data_manifest.load(tmp_path / "z.jsonl").rows == x.rows
    bad = run("split", m, "--labeled", "abc", "-o", tmp_path / "w.jsonl")
    assert bad.exit_code == 1 and "--labeled = 'abc'; expected an image count" in bad.output


def test_prepare_and_demo_commands(tmp_path: Path) -> None:
    demo_root = tmp_path / "demo"
    small = {
        "size": 48,
        "source_labeled": 2,
        "source_val": 1,
        "target_labeled": 2,
        "target_unlabeled": 2,
        "target_val": 1,
    }
    cfg = tmp_path / "run.toml"
    keys = "\n".join(f"demo_{k} = {v}" for k, v in small.items())
    cfg.write_text(
        f'run_dir = "{tmp_path / "run"}"\n[data]\ndemo = true\ndemo_root = "{demo_root}"\n{keys}\n'
    )
    r = run("prepare", "--config", cfg)
    assert r.exit_code == 0, r.output
    assert (demo_root / "target" / "manifest.jsonl").is_file()
    resolved = tomllib.loads((tmp_path / "run" / "data" / "config.toml").read_text())
    assert resolved["data"]["demo"] is True and resolved["data"]["demo_size"] == 48
    assert resolved["data"]["manifest"] == str(demo_root / "target" / "manifest.jsonl")
    s = json.loads((tmp_path / "run" / "data" / "summary.json").read_text())
    assert s["splits"]["unlabeled"]["images"] == 2 and s["num_classes"] == 7
    # the demo command with the same parameters writes the same bytes
    args = [f"--{k.replace('_', '-')}={v}" for k, v in small.items()]
    r = run("demo", "--root", tmp_path / "again", *args)
    assert r.exit_code == 0, r.output
    for p in sorted(demo_root.rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "again" / p.relative_to(demo_root)).read_bytes()
    r = run("demo", "--root", tmp_path / "x", "--gap", "3")
    assert r.exit_code == 1 and "--gap = 3.0: expected a number in [0, 1]" in r.output
    r = run("prepare", "--config", tmp_path / "missing.toml")
    assert r.exit_code == 1 and "missing.toml: config file not found" in r.output
