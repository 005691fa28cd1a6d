"""bench/ablation.py's statistics and bookkeeping (the training itself is not run here)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "ablation", Path(__file__).resolve().parents[1] / "bench" / "ablation.py"
)
A = importlib.util.module_from_spec(_spec)
sys.modules["ablation"] = A  # dataclasses look their module up there
_spec.loader.exec_module(A)


def test_t_interval_matches_the_textbook_formula() -> None:
    xs = [60.1, 58.3, 63.0, 61.2, 59.9]
    ci = A.t_interval(xs)
    hw = 2.776 * statistics.stdev(xs) / math.sqrt(5)  # t(0.975, df = 4)
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(statistics.mean(xs))
    assert ci["half_width"] == pytest.approx(hw)
    assert ci["low"] == pytest.approx(ci["mean"] - hw)
    assert A.t_interval([1.0])["half_width"] is None
    assert A.t_interval([])["mean"] is None
    assert A.t_interval([1.0] * 40)["half_width"] == 0.0  # beyond the table: normal quantile


def test_jobs_go_seed_by_seed() -> None:
    jobs = A.train_jobs(A.ROWS[:3], [0, 1])
    assert [(r.key, s) for r, s in jobs] == [
        ("labeled_only", 0),
        ("raw", 0),
        ("cp", 0),
        ("labeled_only", 1),
        ("raw", 1),
        ("cp", 1),
    ]


def write_runs(out: Path, runs: dict[str, list[float]]) -> None:
    """Finished runs ``out/runs/{row}/seed{i}/final.json`` with the given val mIoU (%)."""
    for key, values in runs.items():
        for seed, v in enumerate(values):
            f = out / "runs" / key / f"seed{seed}" / "final.json"
            f.parent.mkdir(parents=True)
            f.write_text(json.dumps({"miou": v / 100}))


def test_paired_differences_use_common_seeds(tmp_path: Path) -> None:
    runs = {"labeled_only": [50, 52, 51], "raw": [40, 45, 41], "cp": [55, 56]}
    write_runs(tmp_path, runs)
    rows = [r for r in A.ROWS if r.key in runs]
    quality = {
        "cp": {
            "kept_fraction": 1.0,
            "kept_accuracy": 0.9,
            "miou": 0.5,
            "recall": {"bg": 0.99, "a": 0.5, "b": 0.7, "c": None},
            "precision": {"bg": 0.9, "a": 0.6, "b": None, "c": 0.2},
        }
    }
    res = {
        r["row"]: r
        for r in A.summarise(rows, [0, 1, 2], tmp_path, quality, "unlabeled", background="bg")
    }
    cp = res["cp"]
    assert cp["miou_ci"]["n"] == 2
    d = cp["diff_labeled_only"]  # seeds 0 and 1 only: +5, +4
    assert d["n"] == 2 and d["mean"] == pytest.approx(4.5)
    assert d["half_width"] == pytest.approx(12.706 * statistics.stdev([5, 4]) / math.sqrt(2))
    assert res["raw"]["diff_raw"] is None
    assert res["raw"]["diff_labeled_only"]["mean"] == pytest.approx((-10 - 7 - 10) / 3)
    assert cp["pseudo"] == {
        "set": "unlabeled",
        "kept_fraction": 1.0,
        "kept_accuracy": 0.9,
        "miou": 0.5,
        "object_recall": pytest.approx(0.6),  # classes other than the background, known ones
        "object_precision": pytest.approx(0.4),
    }
    md = A.table(list(res.values()), "header")
    assert "+4.5 ± " in md and "| — |" in md


def test_variant_config_gets_its_own_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's paths are relative
    cfg = A.derive_config("configs/demo.toml", ["demo_seed=3", "demo_gap=0.8"], ["batch_size=4"])
    assert cfg["run_dir"] == "runs/demo_s3_g0.8"
    assert cfg["data"]["demo_root"] == "data/demo_s3_g0.8"
    assert cfg["data"]["manifest"] == "data/demo_s3_g0.8/target/manifest.jsonl"
    assert cfg["annotate"]["model"] == "data/demo_s3_g0.8/annotator/best.pt"
    ann = cfg["_annotator"]
    assert ann["data"]["demo_seed"] == 3 and ann["data"]["demo_gap"] == 0.8
    assert ann["data"]["manifest"] == "data/demo_s3_g0.8/source/manifest.jsonl"
    assert ann["train"]["out"] == "data/demo_s3_g0.8/annotator"
    assert cfg["train"]["batch_size"] == 4


def test_rows_with_identical_pseudo_labels_share_runs(tmp_path: Path) -> None:
    for name, content in (("raw", b"a"), ("threshold", b"a"), ("cp", b"b")):
        (tmp_path / name / "plots").mkdir(parents=True)
        (tmp_path / name / "x.png").write_bytes(content)
        (tmp_path / name / "plots" / "p.png").write_bytes(name.encode())  # plots don't count
    digest = {n: A.folder_digest(tmp_path / n) for n in ("raw", "threshold", "cp")}
    assert digest["raw"] == digest["threshold"] != digest["cp"]
    same = A.twins(A.ROWS, digest)
    assert same == {"threshold": "raw"}  # cp_stage2 shares cp's PNGs but not its options


def _run(folder: Path, evals: list[float]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"type": "train", "iter": 1, "loss": 1.0})]
    lines += [json.dumps({"type": "eval", "iter": 10 * i, "miou": v}) for i, v in enumerate(evals)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "final.json").write_text(json.dumps({"miou": evals[-1]}))


def test_a_runs_figure_is_its_last_evaluation_or_the_mean_of_the_last_n(tmp_path: Path) -> None:
    _run(tmp_path / "r", [0.1, 0.5, 0.6, 0.7])
    assert A.run_miou(tmp_path / "r", 1) == pytest.approx(70.0)
    assert A.run_miou(tmp_path / "r", 3) == pytest.approx(60.0)
    assert A.run_miou(tmp_path / "r", 5) is None  # fewer evaluations than asked for
    assert A.run_miou(tmp_path / "missing", 1) is None


def test_claims_are_paired_and_get_a_verdict() -> None:
    def row(key: str, values: list[float]) -> dict:
        return {"row": key, "miou": {str(s): v for s, v in enumerate(values)}}

    results = [
        row("labeled_only", [50, 52, 51, 49, 50]),
        row("raw", [40, 45, 41, 43, 42]),
        row("cp", [55, 56, 54, 57, 55]),
        row("cp_stage2", [55, 57, 53, 58, 54]),
    ]
    comps = {c["key"]: c for c in A.comparisons(results)}
    assert set(comps) == {"raw_lt_cp", "labeled_lt_cp", "labeled_lt_cp_stage2", "cp_le_cp_stage2"}
    assert comps["raw_lt_cp"]["verdict"] == "holds"
    assert comps["raw_lt_cp"]["diff"]["mean"] == pytest.approx(13.2)
    assert comps["cp_le_cp_stage2"]["verdict"] == "undecided"
    flipped = A.comparisons([row("raw", [60, 61, 62]), row("cp", [50, 52, 51])])
    assert flipped[0]["verdict"] == "reversed"


def test_sweep_values_and_tables(tmp_path: Path) -> None:
    assert A.sweep_values("demo_gap=0, 0.5,1") == ("demo_gap", [0, 0.5, 1])
    with pytest.raises(SystemExit, match="expected KEY=V1,V2"):
        A.sweep_values("demo_gap")

    def point(v: float, shift: float) -> dict:
        rows = [
            {
                "row": key,
                "title": key,
                "calibration": calib,
                "miou_ci": A.t_interval([base + shift, base + shift + 1, base + shift - 1]),
                "pseudo": {"kept_fraction": 1.0, "kept_accuracy": 0.9, "object_recall": 0.5}
                if calib
                else {},
                "miou": {"0": base + shift, "1": base + shift + 1, "2": base + shift - 1},
            }
            for key, calib, base in (("labeled_only", None, 50), ("cp", "cp", 55))
        ]
        return {
            "value": v,
            "annotator_val_miou": 0.4,
            "qhat": 0.99,
            "rows": rows,
            "comparisons": A.comparisons(rows),
        }

    content = {"key": "demo_gap", "values": [0, 1], "seeds": [0, 1, 2]}
    content["points"] = [point(0, 0.0), point(1, -3.0)]
    md = A.sweep_table(content)
    assert "| labeled only < CP | +5.0 ± 0.0 * (holds) | +5.0 ± 0.0 * (holds) |" in md
    assert "| cp: object recall % | 50.0 | 50.0 |" in md
    assert "| CP's q̂ (α = 0.05) | 0.99 | 0.99 |" in md
    assert "| labeled only < CP | 0, 1 | holds everywhere |" in md
    content["points"][1]["comparisons"][0]["verdict"] = "undecided"
    assert A.stops(content)[0]["stops_at"] == "1"
    # not holding at the smallest gap, then holding, then not: it stops where it stops
    three = {**content, "points": [point(0, 0.0), point(0.5, 0.0), point(1, 0.0)]}
    for p, verdict in zip(three["points"], ("undecided", "holds", "undecided"), strict=True):
        p["comparisons"][0]["verdict"] = verdict
    assert A.stops(three)[0]["stops_at"] == "1" and A.stops(three)[0]["holds_at"] == [0.5]
    three["points"][2]["comparisons"][0]["verdict"] = "holds"
    assert A.stops(three)[0]["stops_at"] == "holds from 0.5 on"
    # folders trained on by no row (--pseudo-only) are read from pseudo_quality, in the
    # calibrations' order, "—" where a point has none (e.g. its calibration failed)
    content["points"][0]["pseudo_quality"] = {"recall": {"object_recall": 0.81}}
    assert A.pseudo_names(content["points"]) == ["cp", "recall"]
    assert "| recall: object recall % | 81.0 | — |" in A.sweep_table(content)
    A.plot_sweep(content, tmp_path)
    for name in ("sweep_miou.png", "sweep_pseudo.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_runs_each_value_and_keeps_the_configs_own_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's paths are relative
    calls = []

    def fake(opt: A.Options) -> dict:
        calls.append(opt)
        rows = [
            {
                "row": "cp",
                "title": "cp",
                "calibration": "cp",
                "miou": {"0": 50.0, "1": 52.0},
                "miou_ci": A.t_interval([50.0, 52.0]),
                "pseudo": {},
            }
        ]
        return {"annotator_val_miou": 0.4, "qhat": 0.9, "rows": rows, "comparisons": []}

    monkeypatch.setattr(A, "run_ablation", fake)
    opt = A.Options("configs/demo.toml", A.ROWS[2:3], [0, 1], 1, 1, [], [])
    content = A.run_sweep(opt, "demo_gap=0.5,0.75", tmp_path / "sweep")
    # the demo config's own gap (0.5) is the config itself; 0.75 a variant of it
    assert [c.data_set for c in calls] == [[], ["demo_gap=0.75"]]
    # every value's tables go to the sweep's folder, never over the config's own ablation
    assert [c.report_dir for c in calls] == [
        str(tmp_path / "sweep" / "demo_gap=0.5"),
        str(tmp_path / "sweep" / "demo_gap=0.75"),
    ]
    assert [p["value"] for p in content["points"]] == [0.5, 0.75]
    for name in ("sweep.md", "sweep.json", "sweep_miou.png", "sweep_pseudo.png"):
        assert (tmp_path / "sweep" / name).is_file()


def test_sequential_seeds_go_to_the_wide_rows_only(tmp_path: Path) -> None:
    runs = {"labeled_only": [60, 61, 60.5], "cp": [40, 55, 47], "raw": [30, 45, 38, 39]}
    write_runs(tmp_path, runs)
    rows = [r for r in A.ROWS if r.key in runs]
    row_seeds = {"labeled_only": [0, 1, 2], "cp": [0, 1, 2], "raw": [0, 1, 2, 3]}
    opt = A.Options("c", rows, [0, 1, 2], 1, 1, [], [], until_half_width=5.0, max_seeds=4)
    # labeled only: ± 1.2, narrow; cp: ± 18.6, gets seed 3; raw: wide but at max_seeds
    assert [(r.key, s) for r, s in A.more_seeds(rows, row_seeds, tmp_path, {}, opt)] == [("cp", 3)]
    assert A.more_seeds(rows, row_seeds, tmp_path, {"cp": "raw"}, opt) == []  # twins: never
    off = A.Options("c", rows, [0, 1, 2], 1, 1, [], [])
    assert A.more_seeds(rows, row_seeds, tmp_path, {}, off) == []
    res = A.summarise(rows, row_seeds, tmp_path, {}, "unlabeled")
    raw = next(r for r in res if r["row"] == "raw")
    assert raw["miou_ci"]["n"] == 4 and raw["diff_labeled_only"]["n"] == 3  # common seeds
    assert "38.0 ± " in A.table(res, "h") and "(n = 4)" in A.table(res, "h")


def test_sequential_seeds_cost_a_little_coverage_as_the_docs_say() -> None:
    """docs/ablation.md: stopping when the interval is ± 5 or narrower (5 seeds first, at most
    10) keeps the 95 % t-interval's coverage at 93-95 % for normal per-seed figures. 8,000
    simulated rows per σ: the standard error of a coverage near 0.94 is 0.0027, so 0.915 and
    0.965 lie more than 5 standard errors away."""
    rng = np.random.default_rng(0)
    for sigma, n_mean in ((2.0, (5.0, 5.1)), (6.0, (7.0, 8.0)), (10.0, (9.0, 10.0))):
        covered, ns = 0, []
        for x in rng.normal(0.0, sigma, size=(8000, 10)):
            n = 5
            while (ci := A.t_interval(list(x[:n])))["half_width"] > 5.0 and n < 10:
                n += 1
            covered += ci["low"] <= 0.0 <= ci["high"]
            ns.append(n)
        assert 0.915 <= covered / 8000 <= 0.965
        assert n_mean[0] <= np.mean(ns) <= n_mean[1]
