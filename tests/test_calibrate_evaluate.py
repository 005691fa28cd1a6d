"""``python -m calibrate evaluate``: figures against an independent numpy computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _calibrate_fixtures import calibrate_run, make_dataset
from test_calibrate_cli import expected_pseudo
from typer.testing import CliRunner

from annotate import open_cache
from calibrate import risk as R
from calibrate.cli import app
from calibrate.evaluate import quality
from data_manifest import load
from data_manifest.io import read_label_png

runner = CliRunner()
CLASSES3 = ["background", "cat", "dog"]


def test_quality_on_a_hand_made_table() -> None:
    # truth × pseudo (last column: dropped). 10 background, 6 cat, 4 dog pixels.
    m = np.array(
        [
            [7, 1, 0, 2],  # background: 7 right, 1 called cat, 2 dropped
            [1, 4, 0, 1],  # cat: 4 right, 1 called background, 1 dropped
            [0, 1, 2, 1],  # dog: 2 right, 1 called cat, 1 dropped
        ]
    )
    q = quality(m, CLASSES3)
    assert q["pixels"] == 20 and q["kept_pixels"] == 16
    assert q["kept_fraction"] == 0.8
    assert q["kept_accuracy"] == round(13 / 16, 6) and q["kept_error"] == round(3 / 16, 6)
    assert q["precision"] == {"background": 0.875, "cat": round(4 / 6, 6), "dog": 1.0}
    assert q["recall"] == {"background": 0.7, "cat": round(4 / 6, 6), "dog": 0.5}
    # IoU over kept pixels: TP / (predicted + true-and-kept − TP)
    iou = {"background": 7 / (8 + 8 - 7), "cat": 4 / (6 + 5 - 4), "dog": 2 / (2 + 3 - 2)}
    assert q["iou"] == {c: round(v, 6) for c, v in iou.items()}
    assert q["miou"] == round(float(np.mean(list(iou.values()))), 6)


def test_quality_leaves_absent_classes_out_of_the_mean() -> None:
    m = np.array([[5, 0, 0, 5], [0, 0, 0, 0], [0, 0, 0, 0]])
    q = quality(m, CLASSES3)
    assert q["miou"] == 1.0 and q["precision"]["cat"] is None and q["recall"]["dog"] is None


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("ev")
    mpath, cpath = make_dataset(
        root / "ds", n_labeled=8, n_unlabeled=6, n_val=4, topk=2, unlabeled_labels=True
    )
    for name, args in {
        "cp": ["--method", "cp", "--alpha", "0.2"],
        "raw": ["--method", "raw"],
        "risk": ["--method", "risk", "--risk", "0.3"],
        "class": ["--method", "cp", "--mode", "class", "--class-min-pixels", "0"],
    }.items():
        res = calibrate_run(mpath, cpath, root / "pseudo" / name, *args)
        assert res.exit_code == 0, res.output
    return mpath, cpath, root / "pseudo"


def evaluate(pseudo: Path, *names: str, extra: tuple[str, ...] = ()) -> object:
    return runner.invoke(app, ["evaluate", *(str(pseudo / n) for n in names), "--quiet", *extra])


def np_confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k + 1), np.int64)
    for t, p in zip(truth.ravel(), pred.ravel(), strict=True):
        if t != 255:
            m[t, k if p == 255 else p] += 1
    return m


def test_evaluate_against_numpy(ds: tuple[Path, Path, Path]) -> None:
    mpath, cpath, pseudo = ds
    res = evaluate(pseudo, "cp", "raw", "risk")
    assert res.exit_code == 0, res.output
    ev = json.loads((pseudo / "evaluation" / "evaluation.json").read_text())
    assert (pseudo / "evaluation" / "risk_coverage.png").stat().st_size > 0
    m, cache = load(mpath), open_cache(cpath)
    k = m.num_classes
    reps = {n: json.loads((pseudo / n / "calibration.json").read_text()) for n in ("cp", "risk")}

    def rule(name: str, p: np.ndarray, which: str) -> np.ndarray:
        conf = p.max(axis=0).astype(np.float16).astype(np.float32)
        if name == "raw":
            return p.argmax(axis=0)
        if name == "risk":
            return np.where(conf >= reps["risk"]["rule"][which]["tau"], p.argmax(axis=0), 255)
        return expected_pseudo(p, reps["cp"]["rule"][which]["qhat"][0])

    # held-out images, as documented: the seeded permutation of the sorted labeled ids
    labeled = sorted(r.id for r in m.split("labeled"))
    perm = np.random.default_rng(reps["cp"]["held_out"]["seed"]).permutation(len(labeled))
    held = [labeled[i] for i in perm[: math.floor(0.5 * len(labeled))]]
    sets = {
        "unlabeled": [r.id for r in m.split("unlabeled")],
        "held_out": held,
        "val": [r.id for r in m.split("val")],
    }
    assert set(ev["sets"]) == set(sets)
    for sname, ids in sets.items():
        curve_kept = np.zeros(R.tau_grid().size, np.int64)
        curve_wrong = np.zeros_like(curve_kept)
        for name in ("cp", "raw", "risk"):
            conf_m = np.zeros((k, k + 1), np.int64)
            per_image: dict[int, list[float]] = {c: [] for c in range(k)}
            for i in ids:
                p, truth = cache.probs(i), m.read_label(m.row(i))
                if sname == "unlabeled":
                    pred = read_label_png(pseudo / name / f"{i}.png")
                else:
                    pred = rule(name, p, "held_out" if sname == "held_out" else "pngs")
                conf_m += np_confusion(truth, pred, k)
                for c in range(k):
                    if (truth == c).any():
                        per_image[c].append(((truth == c) & (pred == c)).sum() / (truth == c).sum())
            got = dict(ev["sets"][sname]["folders"][name])
            assert got["images"] == len(ids)
            mean_recall = got.pop("mean_image_recall")
            assert got == {"images": len(ids), **quality(conf_m, list(m.classes))}
            for c, name_c in enumerate(m.classes):
                expect = float(np.mean(per_image[c])) if per_image[c] else None
                assert mean_recall[name_c] == pytest.approx(expect, abs=2e-6)
        for i in ids:
            p, truth = cache.probs(i), m.read_label(m.row(i))
            conf = p.max(axis=0).astype(np.float16).astype(np.float32)
            ok = truth != 255
            for j, t in enumerate(R.tau_grid()):
                keep = ok & (conf >= t)
                curve_kept[j] += keep.sum()
                curve_wrong[j] += (keep & (p.argmax(axis=0) != truth)).sum()
        c = ev["sets"][sname]["risk_coverage"]
        sel = curve_kept > 0
        px = ev["sets"][sname]["pixels"]
        np.testing.assert_allclose(c["kept_fraction"], np.round(curve_kept[sel] / px, 6))
        np.testing.assert_allclose(c["kept_error"], np.round(curve_wrong[sel] / curve_kept[sel], 6))


def test_class_rule_kept_accuracy_is_at_least_raw(ds: tuple[Path, Path, Path]) -> None:
    _, _, pseudo = ds
    res = evaluate(pseudo, "raw", "class")
    assert res.exit_code == 0, res.output
    ev = json.loads((pseudo / "evaluation" / "evaluation.json").read_text())
    for s in ev["sets"].values():
        assert s["folders"]["class"]["kept_accuracy"] >= s["folders"]["raw"]["kept_accuracy"]


def test_schedulers_give_identical_bytes(ds: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, pseudo = ds
    outs = []
    for i, sched in enumerate(("threads", "synchronous")):
        out = tmp_path / f"o{i}"
        res = evaluate(
            pseudo,
            "cp",
            "risk",
            extra=("--out-dir", str(out), "--scheduler", sched, "--batch", str(i + 2)),
        )
        assert res.exit_code == 0, res.output
        outs.append((out / "evaluation.json").read_bytes())
    assert outs[0] == outs[1]


def one_line_error(res: object, needle: str) -> None:
    assert res.exit_code == 1, res.output
    assert needle in res.output, res.output
    assert res.output.count("\n") == 1, res.output


def test_folder_of_another_manifest(ds: tuple[Path, Path, Path], tmp_path: Path) -> None:
    mpath, cpath, pseudo = ds
    other_m, other_c = make_dataset(tmp_path / "other", seed=5, unlabeled_labels=True)
    res = calibrate_run(other_m, other_c, tmp_path / "other_cp")
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(pseudo / "cp"),
            str(tmp_path / "other_cp"),
            "--manifest",
            str(mpath),
            "--cache",
            str(cpath),
            "--quiet",
            "--out-dir",
            str(tmp_path / "ev"),
        ],
    )
    one_line_error(res, "the pseudo-labels were made from another manifest")
    assert not (tmp_path / "ev").exists()


def test_not_a_pseudo_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    one_line_error(
        runner.invoke(app, ["evaluate", str(tmp_path / "x")]),
        "not a pseudo-label folder (no calibration.json)",
    )
    one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "y")]), "folder not found")


def test_missing_png(ds: tuple[Path, Path, Path], tmp_path: Path) -> None:
    mpath, cpath, pseudo = ds
    copy = tmp_path / "raw"
    copy.mkdir()
    for f in (pseudo / "raw").rglob("*"):
        if f.is_file():
            (copy / f.relative_to(pseudo / "raw")).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(pseudo / "raw")).write_bytes(f.read_bytes())
    victim = sorted(copy.glob("*.png"))[0]
    victim.unlink()
    res = runner.invoke(app, ["evaluate", str(copy), "--quiet"])
    one_line_error(res, f"{victim}: listed in calibration.json but missing")


def test_no_labels_anywhere(tmp_path: Path) -> None:
    mpath, cpath = make_dataset(tmp_path / "d", n_val=0, cache_splits=("labeled", "unlabeled"))
    res = calibrate_run(mpath, cpath, tmp_path / "cp", "--held-out-fraction", "0")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "cp"), "--quiet"])
    one_line_error(res, "no image to compare with")
