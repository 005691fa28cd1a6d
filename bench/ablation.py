"""The paper's ablation, with paired seeds and confidence intervals, on a dataset with a labeled,
an unlabeled and a val split (the demo by default; ``--data-set`` makes a demo variant).

    python bench/ablation.py --config configs/demo.toml                     # make ablation
    python bench/ablation.py --config configs/demo.toml --data-set demo_seed=1 \
        --data-set demo_gap=0.7 --seeds 0,1,2,3,4 --jobs 2                  # a demo variant

Rows (each trained with every seed; Stage I only unless the row says Stage II):
  1. labeled only (Stage I + Stage II's iterations on the labeled images)
  2. + raw annotator masks (argmax, no filtering)
  3. + CP, the paper's rule (pixel-wise, α = 0.05)
  4. + CP + Stage II self-reliance
  5. + CP + UniMatch Stage II (stage2_mode = "unimatch": UniMatch's unimatch.py step)
  6. + confidence threshold keeping as many pixels as CP
  7. + risk control (ours: ε = 0.1, conformal risk control over images)
  8. + risk control + Stage II
  9. + class-conditional CP (α = 0.05, foreground preference among informative classes)

Paired seeds: a seed fixes the model's initialisation and, through the trainer's sampling (a
pure function of seed, stream and position), the order of the labeled and unlabeled batches and
their augmentations, so every row sees the same batches and rows differ only in their pseudo-
labels. Each row reports its mean val mIoU with a 95 % t-interval over the seeds, and the mean
paired difference to "labeled only" and to "raw" with its 95 % t-interval (the interval of the
per-seed differences). Pseudo-label quality comes from ``python -m calibrate evaluate`` on the
unlabeled images' true labels where the manifest has them (the demo does), else on val.

Every step goes through the stages' own command lines. A row whose pseudo-labels are
byte-identical to an earlier row's (and whose trainer options are the same) reuses that row's
runs, since training is deterministic. Finished training runs (``final.json``) are kept, so
an interrupted ablation continues where it stopped; runs are ordered seed by seed, so a
partial run still gives paired rows. Writes ``ablation.md`` (the table) and
``ablation.json`` (every figure) to the output folder, and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_manifest  # noqa: E402
from data_manifest.config import dump_toml, load_config, run_dir  # noqa: E402
from data_manifest.io import atomic_write_json, atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One line of the table: a pseudo-label folder (or none) and the trainer's options."""

    key: str
    title: str
    calibration: str | None
    train_args: tuple[str, ...] = field(default=())


# calibrate's options per pseudo-label folder
CALIBRATIONS: dict[str, tuple[str, ...]] = {
    "raw": ("--method", "raw"),
    "cp": ("--method", "cp", "--alpha", "0.05", "--mode", "pixel"),
    "threshold": ("--method", "threshold", "--alpha", "0.05", "--mode", "pixel"),
    "risk": ("--method", "risk", "--risk", "0.1", "--risk-control", "crc"),
    # class mode on a top-k cache leaves a few more pixels open (255, counted): allow 1 %
    "cp_class": (
        "--method",
        "cp",
        "--alpha",
        "0.05",
        "--mode",
        "class",
        "--topk-undetermined-max",
        "0.01",
    ),
}

ROWS = [
    Row("labeled_only", "labeled only", None, ("--labeled-only",)),
    Row("raw", "+ raw annotator masks", "raw", ("--no-stage2",)),
    Row("cp", "+ CP (paper's rule, pixel, α = 0.05)", "cp", ("--no-stage2",)),
    Row("cp_stage2", "+ CP + Stage II", "cp", ("--stage2",)),
    Row("cp_unimatch", "+ CP + UniMatch Stage II", "cp", ("--stage2", "--stage2-mode", "unimatch")),
    Row("threshold", "+ threshold keeping CP's pixel count", "threshold", ("--no-stage2",)),
    Row("risk", "+ risk control (ε = 0.1, ours)", "risk", ("--no-stage2",)),
    Row("risk_stage2", "+ risk control + Stage II", "risk", ("--stage2",)),
    Row("cp_class", "+ class-conditional CP (α = 0.05)", "cp_class", ("--no-stage2",)),
]

# two-sided 95 % quantiles of Student's t, by degrees of freedom (1.96 beyond 30)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179]
T975 += [2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064]
T975 += [2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval half-width of the values (half-width None for one value)."""
    a = np.asarray(values, np.float64)
    n = a.size
    if n == 0:
        return {"n": 0, "mean": None, "half_width": None, "low": None, "high": None}
    mean = float(a.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "half_width": None, "low": None, "high": None}
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    hw = t * float(a.std(ddof=1)) / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": hw, "low": mean - hw, "high": mean + hw}


def sh(args: list[str], log: Path, threads: int | None = None) -> None:
    """Run one stage command; its output goes to ``log``; a failure stops the ablation."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"ablation: `{' '.join(args)}` failed (exit {rc}); log {log}:\n{tail}")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items (TOML values) as a dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    return out


def derive_config(path: str, data_set: list[str], train_set: list[str]) -> dict[str, Any]:
    """The run config with ``--data-set`` / ``--train-set`` applied.

    A demo variant (``--data-set`` on a demo config) gets its own dataset folder
    ``data/demo_s<seed>_g<gap>``, run folder ``runs/demo_s<seed>_g<gap>`` and demo annotator,
    trained on the variant's own source domain (its run config is ``_annotator``, written
    beside the derived config by :func:`write_config`).
    """
    cfg = load_config(path)
    cfg.pop("_source", None)
    data = parse_sets(data_set)
    if data:
        if not cfg.get("data", {}).get("demo"):
            raise SystemExit("ablation: --data-set needs a demo config ([data] demo = true)")
        d = {**cfg.get("data", {}), **data}
        name = "demo_s{}_g{}".format(d.get("demo_seed", 0), d.get("demo_gap", 0.5))
        if "demo_root" not in data:
            d["demo_root"] = f"data/{name}"
        d["manifest"] = f"{d['demo_root']}/target/manifest.jsonl"
        cfg["data"] = d
        cfg["run_dir"] = f"runs/{name}"
        ann = cfg.setdefault("annotate", {})
        ann_cfg = load_config(ann.get("demo_train_config", "configs/demo_annotator.toml"))
        ann_cfg.pop("_source", None)
        ann_cfg["data"] = {**ann_cfg.get("data", {}), **d}
        ann_cfg["data"]["manifest"] = f"{d['demo_root']}/source/manifest.jsonl"
        ann_cfg["run_dir"] = f"{d['demo_root']}/annotator"
        ann_cfg.setdefault("train", {})["out"] = f"{d['demo_root']}/annotator"
        ann["model"] = f"{d['demo_root']}/annotator/best.pt"
        cfg["_annotator"] = ann_cfg
    cfg.setdefault("train", {}).update(parse_sets(train_set))
    return cfg


def write_config(cfg: dict[str, Any], out: Path) -> Path:
    """Write the derived config (and a variant's annotator config) into ``out``."""
    cfg = dict(cfg)
    ann_cfg = cfg.pop("_annotator", None)
    if ann_cfg is not None:
        atomic_write_text(out / "annotator.toml", dump_toml(ann_cfg))
        cfg["annotate"] = {**cfg["annotate"], "demo_train_config": str(out / "annotator.toml")}
    atomic_write_text(out / "config.toml", dump_toml(cfg))
    return out / "config.toml"


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of a pseudo-label folder's PNGs (plots excluded)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.png")):
        rel = f.relative_to(folder)
        if rel.parts[0] != "plots":
            h.update(str(rel).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def twins(rows: list[Row], digest: dict[str, str]) -> dict[str, str]:
    """Rows whose pseudo-labels (same PNG bytes) and trainer options equal an earlier row's,
    mapped to that row: training is deterministic, so their runs would be identical and are
    not repeated (e.g. the matched threshold when CP keeps every pixel, as raw)."""
    seen: dict[tuple, str] = {}
    out = {}
    for r in rows:
        d = digest.get(r.calibration or "")
        key = (d, r.train_args)
        if d is not None and key in seen:
            out[r.key] = seen[key]
        else:
            seen.setdefault(key, r.key)
    return out


def train_jobs(rows: list[Row], seeds: list[int]) -> list[tuple[Row, int]]:
    """Every (row, seed), seed by seed, so that a partial ablation has paired rows."""
    return [(r, s) for s in seeds for r in rows]


def summarise(
    rows: list[Row],
    seeds: list[int],
    out: Path,
    quality: dict[str, dict],
    quality_set: str,
    same_as: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Per row: mIoU per seed, its t-interval and the paired differences to the baselines
    (a row in ``same_as`` reads its twin's runs)."""
    same_as = same_as or {}
    miou: dict[str, dict[int, float]] = {}
    for row in rows:
        miou[row.key] = {}
        for s in seeds:
            f = out / "runs" / same_as.get(row.key, row.key) / f"seed{s}" / "final.json"
            if f.is_file():
                miou[row.key][s] = 100 * json.loads(f.read_text())["miou"]
    results = []
    for row in rows:
        mine = miou[row.key]
        r: dict[str, Any] = {
            "row": row.key,
            "title": row.title,
            "calibration": row.calibration,
            "train_args": list(row.train_args),
            "same_runs_as": same_as.get(row.key),
            "miou": {str(s): v for s, v in sorted(mine.items())},
            "miou_ci": t_interval(list(mine.values())),
        }
        for base in ("labeled_only", "raw"):
            other = miou.get(base, {})
            common = sorted(set(mine) & set(other))
            r[f"diff_{base}"] = (
                t_interval([mine[s] - other[s] for s in common]) if base != row.key else None
            )
        q = quality.get(row.calibration or "", {})
        r["pseudo"] = {
            "set": quality_set if q else None,
            **{k: q.get(k) for k in ("kept_fraction", "kept_accuracy", "miou")},
        }
        results.append(r)
    return results


def fmt_ci(ci: dict[str, Any] | None, signed: bool = False) -> str:
    if not ci or ci["mean"] is None:
        return "—"
    m = f"{ci['mean']:+.1f}" if signed else f"{ci['mean']:.1f}"
    if ci["half_width"] is None:
        return m
    star = " *" if signed and (ci["low"] > 0 or ci["high"] < 0) else ""
    return f"{m} ± {ci['half_width']:.1f}{star}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def table(results: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| # | setting | val mIoU | Δ vs labeled only | Δ vs raw | kept % | kept acc % | "
        "pseudo mIoU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        p = r["pseudo"]
        twin = r.get("same_runs_as")
        title = r["title"] + (f" (same pseudo-labels as `{twin}`: same runs)" if twin else "")
        lines.append(
            f"| {i} | {title} | {fmt_ci(r['miou_ci'])} | "
            f"{fmt_ci(r['diff_labeled_only'], True)} | {fmt_ci(r['diff_raw'], True)} | "
            f"{pct(p['kept_fraction'])} | {pct(p['kept_accuracy'])} | {pct(p['miou'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml", help="run config")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds (≥ 5)")
    ap.add_argument("--rows", default=",".join(r.key for r in ROWS), help="rows to run")
    ap.add_argument("--out", default=None, help="output folder (default {run_dir}/ablation)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at once")
    ap.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [train] key for every run (TOML value), e.g. batch_size=4",
    )
    ap.add_argument(
        "--data-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="demo variant: override a [data] key (TOML value), e.g. demo_seed=1",
    )
    args = ap.parse_args()

    py = sys.executable
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [r for r in ROWS if r.key in args.rows.split(",")]
    derived = derive_config(args.config, args.data_set, args.train_set)
    out = Path(args.out) if args.out else run_dir(derived) / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(derived, out)
    cfg = load_config(config)
    t0 = time.perf_counter()

    mpath = data_manifest.resolve_manifest(cfg)
    model = Path(cfg.get("annotate", {}).get("model") or "")
    if "_annotator" in derived and not model.is_file():
        # a variant's annotator: annotate trains only the default checkpoint on demand
        print(f"ablation: training the variant's demo annotator ({model}) ...", flush=True)
        sh(
            [py, "-m", "train", "fit", "--config", str(out / "annotator.toml")],
            out / "logs" / "annotator.log",
        )
    print(f"ablation: annotating ({config}) ...", flush=True)
    sh([py, "-m", "annotate", "run", "--config", str(config)], out / "logs" / "annotate.log")
    m = data_manifest.load(mpath)
    needed = sorted({r.calibration for r in rows if r.calibration})
    for name in needed:
        print(f"ablation: calibrating {name} ...", flush=True)
        sh(
            [
                py,
                "-m",
                "calibrate",
                "run",
                "--config",
                str(config),
                "--out-dir",
                str(out / "pseudo" / name),
                "--no-plots",
                "--quiet",
                *CALIBRATIONS[name],
            ],
            out / "logs" / f"calibrate_{name}.log",
        )
    quality, quality_set, ann = {}, None, None
    if needed:
        print("ablation: evaluating the pseudo-labels ...", flush=True)
        sh(
            [
                py,
                "-m",
                "calibrate",
                "evaluate",
                *(str(out / "pseudo" / n) for n in needed),
                "--out-dir",
                str(out / "evaluation"),
                "--quiet",
            ],
            out / "logs" / "evaluate.log",
        )
        ev = json.loads((out / "evaluation" / "evaluation.json").read_text())
        quality_set = "unlabeled" if "unlabeled" in ev["sets"] else "val"
        quality = ev["sets"].get(quality_set, {}).get("folders", {})
        # the annotator's own argmax over every val pixel: its val mIoU
        ann = ev["sets"].get("val", {}).get("annotator_argmax", {}).get("miou")

    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    def train(job: tuple[Row, int]) -> None:
        row, seed = job
        run = out / "runs" / row.key / f"seed{seed}"
        if (run / "final.json").is_file():
            return
        cmd = [
            py,
            "-m",
            "train",
            "fit",
            "--config",
            str(config),
            "--out",
            str(run),
            "--seed",
            str(seed),
            "--quiet",
            *row.train_args,
        ]
        if row.calibration:
            cmd += ["--pseudo-dir", str(out / "pseudo" / row.calibration)]
        t = time.perf_counter()
        sh(cmd, out / "logs" / f"train_{row.key}_seed{seed}.log", threads)
        print(
            f"ablation: trained {row.key} seed {seed} ({time.perf_counter() - t:.0f} s)", flush=True
        )

    same_as = twins(rows, {n: folder_digest(out / "pseudo" / n) for n in needed})
    for key, twin in same_as.items():
        print(f"ablation: {key} has the same pseudo-labels as {twin}: its runs are {twin}'s")
    jobs = [(r, s) for r, s in train_jobs(rows, seeds) if r.key not in same_as]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(train, jobs))

    results = summarise(rows, seeds, out, quality, quality_set or "", same_as)
    tc = cfg.get("train", {})
    header = (
        f"`{m.meta.dataset}` ({mpath}): val mIoU (%) over seeds {seeds}, mean ± 95 % "
        "t-interval half-width; Δ: mean paired difference (same seed) ± its 95 % "
        "t-interval half-width, * where the interval excludes 0. Annotator's own val mIoU "
        f"{pct(ann)} %. Schedule: batch {tc.get('batch_size', 8)} + "
        f"{tc.get('batch_size', 8)}, Stage I {tc.get('stage1_length', '?')} + Stage II "
        f"{tc.get('stage2_length', '?')} {tc.get('length_unit', 'epochs')}. Pseudo-label "
        f"columns: `calibrate evaluate` on the {quality_set or '—'} images."
    )
    md = table(results, header)
    atomic_write_text(out / "ablation.md", md)
    atomic_write_json(
        out / "ablation.json",
        {
            "config": str(config),
            "seeds": seeds,
            "annotator_val_miou": ann,
            "rows": results,
            "pseudo_quality_set": quality_set,
            "wall_s": time.perf_counter() - t0,
        },
    )
    print(md)
    print(f"ablation: wrote {out / 'ablation.md'} and {out / 'ablation.json'}")


if __name__ == "__main__":
    main()
