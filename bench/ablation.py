"""The paper's ablation on a dataset with a labeled, an unlabeled and a val split.

    python bench/ablation.py --config configs/demo.toml            # make ablation
    python bench/ablation.py --config configs/demo.toml --seeds 0,1,2 --jobs 2 \
        --train-set batch_size=4 --train-set stage1_length=80   # a cheaper schedule

Rows (each trained with every seed, mean ± std of the val mIoU):
  1. labeled only
  2. + raw annotator masks (argmax, no filtering), Stage I only
  3. + CP-filtered masks (pixel-wise, α = 0.05), Stage I only
  4. + CP + Stage II self-reliance
  5. + confidence-threshold masks keeping CP's pixel fraction, Stage I only
  6. α sweep {0.1, 0.01} and class-conditional CP, Stage I only (α = 0.05 pixel-wise is row 3)
  7. ours: CP keeping singleton sets only (``--max-set-size 1``), and the confidence threshold
     that keeps as many pixels, Stage I only

Every step goes through the stages' own command lines, exactly as a user runs them. Finished
training runs (``final.json`` present) are kept, so an interrupted ablation continues where it
stopped. Writes ``ablation.md`` (the table) and ``ablation.json`` (all figures) to the output
folder, and prints the table.

The kept-pixel figures compare each pseudo-label PNG with the unlabeled images' true labels,
which only a benchmark dataset such as the demo has; where the manifest's unlabeled rows have
no labels those columns are left empty.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import annotate  # noqa: E402
import data_manifest  # noqa: E402
from data_manifest.config import dump_toml, load_config, run_dir  # noqa: E402
from data_manifest.io import atomic_write_json, atomic_write_text, read_label_png  # noqa: E402


@dataclass(frozen=True)
class Calibration:
    """One pseudo-label variant: calibrate's options and its output folder name."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    """One line of the table: a pseudo-label variant (or none) and the trainer's options."""

    key: str
    title: str
    calibration: str | None
    train_args: tuple[str, ...] = field(default=())


CALIBRATIONS = {
    "cp": Calibration("cp", ("--method", "cp", "--alpha", "0.05", "--mode", "pixel")),
    "raw": Calibration("raw", ("--method", "raw")),
    "threshold": Calibration("threshold", ("--method", "threshold", "--alpha", "0.05")),
    "cp_a0.1": Calibration("cp_a0.1", ("--method", "cp", "--alpha", "0.1", "--mode", "pixel")),
    "cp_a0.01": Calibration("cp_a0.01", ("--method", "cp", "--alpha", "0.01", "--mode", "pixel")),
    "cp_class": Calibration("cp_class", ("--method", "cp", "--alpha", "0.05", "--mode", "class")),
    "cp_single": Calibration(
        "cp_single", ("--method", "cp", "--alpha", "0.05", "--mode", "pixel", "--max-set-size", "1")
    ),
    "threshold_single": Calibration(
        "threshold_single", ("--method", "threshold", "--alpha", "0.05", "--max-set-size", "1")
    ),
}

ROWS = [
    Row("labeled_only", "labeled only", None, ("--labeled-only",)),
    Row("raw", "+ raw annotator masks", "raw", ("--no-stage2",)),
    Row("cp", "+ CP (pixel, α=0.05)", "cp", ("--no-stage2",)),
    Row("cp_stage2", "+ CP + Stage II self-reliance", "cp", ("--stage2",)),
    Row("threshold", "+ confidence threshold (CP's kept fraction)", "threshold", ("--no-stage2",)),
    Row("cp_a0.1", "+ CP (pixel, α=0.1)", "cp_a0.1", ("--no-stage2",)),
    Row("cp_a0.01", "+ CP (pixel, α=0.01)", "cp_a0.01", ("--no-stage2",)),
    Row("cp_class", "+ CP (class-conditional, α=0.05)", "cp_class", ("--no-stage2",)),
    Row("cp_single", "+ CP, singleton sets only (ours)", "cp_single", ("--no-stage2",)),
    Row(
        "threshold_single",
        "+ confidence threshold (singleton CP's kept fraction)",
        "threshold_single",
        ("--no-stage2",),
    ),
]


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


def pseudo_quality(m: data_manifest.Manifest, pseudo_dir: Path) -> dict[str, float | None]:
    """Kept fraction and kept-pixel accuracy of a pseudo-label folder against true labels.

    Pixels whose true label is 255 are left out of both figures.
    """
    kept = correct = valid = 0
    for row in m.split("unlabeled"):
        if row.label is None:
            return {"kept_fraction": None, "kept_accuracy": None}
        truth = m.read_label(row)
        pred = read_label_png(pseudo_dir / f"{row.id}.png")
        ok = truth != 255
        keep = ok & (pred != 255)
        valid += int(ok.sum())
        kept += int(keep.sum())
        correct += int((keep & (pred == truth)).sum())
    return {
        "kept_fraction": kept / valid if valid else None,
        "kept_accuracy": correct / kept if kept else None,
    }


def annotator_miou(m: data_manifest.Manifest, cache_path: Path) -> float | None:
    """The annotator's own mIoU (argmax) on the val split, from the cache; None if absent."""
    cache = annotate.open_cache(cache_path)
    rows = [r for r in m.split("val") if r.id in cache]
    if not rows:
        return None
    k = m.num_classes
    conf = np.zeros((k, k), dtype=np.int64)
    for row in rows:
        truth = m.read_label(row).ravel()
        pred = cache.argmax(row.id).ravel()
        ok = truth != 255
        conf += np.bincount(truth[ok] * k + pred[ok], minlength=k * k).reshape(k, k)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    a = 100 * np.asarray(values)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml", help="run config")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (≥ 3)")
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
    args = ap.parse_args()

    py = sys.executable
    cfg = load_config(args.config)
    rd = run_dir(cfg)
    out = Path(args.out) if args.out else rd / "ablation"
    if args.train_set:  # a derived config in the output folder, so every run is reproducible
        for item in args.train_set:
            key, _, value = item.partition("=")
            cfg.setdefault("train", {})[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        derived = out / "config.toml"
        atomic_write_text(derived, dump_toml(cfg))
        args.config = str(derived)
        cfg = load_config(derived)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [r for r in ROWS if r.key in args.rows.split(",")]
    m = data_manifest.load(data_manifest.resolve_manifest(cfg))
    cache = Path(cfg.get("annotate", {}).get("cache") or rd / "cache.zarr")
    t0 = time.perf_counter()

    print(f"ablation: annotating (cache {cache}) ...", flush=True)
    sh([py, "-m", "annotate", "run", "--config", args.config], out / "logs" / "annotate.log")
    needed = sorted({r.calibration for r in rows if r.calibration})
    calib: dict[str, dict] = {}
    for name in needed:
        c = CALIBRATIONS[name]
        pdir = out / "pseudo" / name
        print(f"ablation: calibrating {name} ...", flush=True)
        sh(
            [
                py,
                "-m",
                "calibrate",
                "run",
                "--config",
                args.config,
                "--out-dir",
                str(pdir),
                "--no-plots",
                "--quiet",
                *c.args,
            ],
            out / "logs" / f"calibrate_{name}.log",
        )
        report = json.loads((pdir / "calibration.json").read_text())
        calib[name] = {"report": report, **pseudo_quality(m, pdir)}

    jobs = [(r, s) for r in rows for s in seeds]
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
            args.config,
            "--out",
            str(run),
            "--seed",
            str(seed),
            "--quiet",
            *row.train_args,
        ]
        if row.calibration:
            cmd += ["--pseudo-dir", str(out / "pseudo" / row.calibration)]
        print(f"ablation: training {row.key} seed {seed} ...", flush=True)
        sh(cmd, out / "logs" / f"train_{row.key}_seed{seed}.log", threads)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(train, jobs))

    results = []
    for row in rows:
        mious = [
            json.loads((out / "runs" / row.key / f"seed{s}" / "final.json").read_text())["miou"]
            for s in seeds
        ]
        q = calib.get(row.calibration, {}) if row.calibration else {}
        results.append(
            {
                "row": row.key,
                "title": row.title,
                "seeds": seeds,
                "miou": mious,
                "miou_mean": float(np.mean(mious)),
                "miou_std": float(np.std(mious, ddof=1)) if len(mious) > 1 else 0.0,
                "kept_fraction": q.get("kept_fraction"),
                "kept_accuracy": q.get("kept_accuracy"),
                "calibration": row.calibration,
                "train_args": list(row.train_args),
            }
        )
    ann = annotator_miou(m, cache)
    lines = [
        f"Val mIoU (%) on `{m.meta.dataset}`, mean ± std over seeds {seeds}. "
        f"Annotator's own val mIoU: {pct(ann)}.",
        "",
        "| # | setting | mIoU | kept pixels (%) | kept-pixel accuracy (%) |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        lines.append(
            f"| {i} | {r['title']} | {fmt(r['miou'])} | {pct(r['kept_fraction'])} | "
            f"{pct(r['kept_accuracy'])} |"
        )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "ablation.md", table)
    atomic_write_json(
        out / "ablation.json",
        {
            "config": args.config,
            "annotator_val_miou": ann,
            "rows": results,
            "calibration": {k: v["report"] for k, v in calib.items()},
            "wall_s": time.perf_counter() - t0,
        },
    )
    print(table)
    print(f"ablation: wrote {out / 'ablation.md'} and {out / 'ablation.json'}")


if __name__ == "__main__":
    main()
