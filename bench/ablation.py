"""The paper's ablation, with paired seeds and confidence intervals, on a dataset with a labeled,
an unlabeled and a val split (the demo by default; ``--data-set`` makes a demo variant), and
the same rows over a range of a data setting (``--sweep``, e.g. the demo's domain gap).

    python bench/ablation.py --config configs/demo.toml                     # make ablation
    python bench/ablation.py --config configs/demo.toml --data-set demo_seed=1 \
        --data-set demo_gap=0.7 --seeds 0,1,2,3,4 --jobs 2                  # a demo variant
    python bench/ablation.py --config configs/demo.toml \
        --sweep demo_gap=0,0.25,0.5,0.75,1 --seeds 0,1,2                    # make ablation-sweep

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
 10. + recall floor (ours: per-class thresholds, each object class's miss rate certified
     at ε = 0.2, see calibrate's method "recall")
 11. + recall floor + Stage II

Paired seeds: a seed fixes the model's initialisation and, through the trainer's sampling (a
pure function of seed, stream and position), the order of the labeled and unlabeled batches and
their augmentations, so every row sees the same batches and rows differ only in their pseudo-
labels. A run's figure is its val mIoU at the end of training, or with ``--eval-last N`` the
mean of its last N evaluations in ``metrics.jsonl``. With ``--until-half-width H`` a row whose
interval over ``--seeds`` is wider than ± H gets the next seed, one at a time, until it is not
or has ``--max-seeds`` (docs/ablation.md: what that costs in coverage). Each row
reports its mean with a 95 % t-interval over its seeds, the mean paired difference to
"labeled only" and to "raw" with its 95 % t-interval (the interval of the per-seed
differences), and the paper's claims as paired comparisons. Pseudo-label quality comes from
``python -m calibrate evaluate`` on the unlabeled images' true labels where the manifest has
them (the demo does), else on val.

Every step goes through the stages' own command lines. A row whose pseudo-labels are
byte-identical to an earlier row's (and whose trainer options are the same) reuses that row's
runs, since training is deterministic. Finished training runs (``final.json``) are kept, so
an interrupted ablation continues where it stopped; runs are ordered seed by seed, so a
partial run still gives paired rows. Writes ``ablation.md`` (the tables) and
``ablation.json`` (every figure) to the output folder, and prints the tables. A sweep runs
the ablation once per value (each value its own dataset, annotator and run folder; the
config's own value is the config itself) and writes ``sweep.md``, ``sweep.json``,
``sweep_miou.png`` and ``sweep_pseudo.png``; there ``--pseudo-only`` (default: every
calibration) also calibrates and evaluates the filters no row trains on, so the pseudo-label
plot shows them all.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    "recall": ("--method", "recall", "--miss", "0.2"),
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
    Row("recall", "+ recall floor (ε = 0.2, ours)", "recall", ("--no-stage2",)),
    Row("recall_stage2", "+ recall floor + Stage II", "recall", ("--stage2",)),
]

# The paper's claims and ours, as paired differences (first row − second row, same seed):
# (key, first, second, claim). A claim "holds" where the 95 % interval of the difference
# lies above 0, "reversed" where it lies below, and is "undecided" otherwise.
COMPARISONS = [
    ("raw_lt_cp", "cp", "raw", "raw < CP"),
    ("labeled_lt_cp", "cp", "labeled_only", "labeled only < CP"),
    ("labeled_lt_cp_stage2", "cp_stage2", "labeled_only", "labeled only < CP + Stage II"),
    ("cp_le_cp_stage2", "cp_stage2", "cp", "CP ≤ CP + Stage II"),
    ("cp_vs_threshold", "cp", "threshold", "matched threshold < CP"),
    ("recall_vs_cp", "recall", "cp", "recall floor against CP (Stage I)"),
    (
        "recall_stage2_vs_cp_stage2",
        "recall_stage2",
        "cp_stage2",
        "recall floor + II against CP + II",
    ),
    ("unimatch_vs_cp_stage2", "cp_unimatch", "cp_stage2", "CP + UniMatch II against CP + II"),
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


def sh(args: list[str], log: Path, threads: int | None = None) -> dict[str, float]:
    """Run one stage command; its output goes to ``log``; a failure stops the ablation.

    Returns its wall time and CPU time (user + system, its own and its children's) in seconds.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"ablation: `{' '.join(args)}` failed (exit {rc}); log {log}:\n{tail}")
    return {"wall_s": time.perf_counter() - t, "cpu_s": usage.ru_utime + usage.ru_stime}


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


def run_miou(run: Path, eval_last: int) -> float | None:
    """A finished run's figure (val mIoU, %): ``final.json``'s mIoU (the last evaluation), or
    the mean of the last ``eval_last`` evaluations logged in ``metrics.jsonl``. None if the
    run is not finished (or logged fewer evaluations)."""
    final = run / "final.json"
    if not final.is_file():
        return None
    if eval_last <= 1:
        return 100 * json.loads(final.read_text())["miou"]
    evals = [
        rec["miou"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if line.strip() and (rec := json.loads(line)).get("type") == "eval"
    ]
    if len(evals) < eval_last:
        return None
    return 100 * float(np.mean(evals[-eval_last:]))


def object_figures(q: dict[str, Any], background: str | None) -> dict[str, Any]:
    """Mean recall and precision over the non-background classes of one folder's
    ``calibrate evaluate`` figures (a class with no labeled pixel is left out of the recall,
    one that is never predicted out of the precision)."""
    rec = [v for c, v in (q.get("recall") or {}).items() if c != background and v is not None]
    prec = [v for c, v in (q.get("precision") or {}).items() if c != background and v is not None]
    return {
        "object_recall": float(np.mean(rec)) if rec else None,
        "object_precision": float(np.mean(prec)) if prec else None,
    }


def summarise(
    rows: list[Row],
    seeds: list[int] | dict[str, list[int]],
    out: Path,
    quality: dict[str, dict],
    quality_set: str,
    same_as: dict[str, str] | None = None,
    eval_last: int = 1,
    background: str | None = None,
) -> list[dict[str, Any]]:
    """Per row: mIoU per seed, its t-interval and the paired differences to the baselines
    (a row in ``same_as`` reads its twin's runs; ``seeds`` per row where rows have their own;
    differences are over the seeds both rows have)."""
    same_as = same_as or {}
    miou: dict[str, dict[int, float]] = {}
    for row in rows:
        miou[row.key] = {}
        for s in seeds[row.key] if isinstance(seeds, dict) else seeds:
            v = run_miou(out / "runs" / same_as.get(row.key, row.key) / f"seed{s}", eval_last)
            if v is not None:
                miou[row.key][s] = v
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
            r[f"diff_{base}"] = paired(mine, miou.get(base, {})) if base != row.key else None
        q = quality.get(row.calibration or "", {})
        r["pseudo"] = {
            "set": quality_set if q else None,
            **{k: q.get(k) for k in ("kept_fraction", "kept_accuracy", "miou")},
            **(object_figures(q, background) if q else {}),
        }
        if q.get("mean_reachable_miss"):  # method recall: its certified quantity, measured
            miss = q["mean_reachable_miss"]
            r["pseudo"]["mean_reachable_miss"] = {c: v for c, v in miss.items() if c != background}
        results.append(r)
    return results


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """The t-interval of a − b over the seeds both have."""
    common = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in common])


def verdict(ci: dict[str, Any] | None) -> str:
    """ "holds" (interval above 0), "reversed" (below 0), "undecided", or "—" (no data)."""
    if not ci or ci["half_width"] is None:
        return "—"
    if ci["low"] > 0:
        return "holds"
    if ci["high"] < 0:
        return "reversed"
    return "undecided"


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:data:`COMPARISONS` between the rows present: the paired difference, its interval and
    the verdict."""
    by = {r["row"]: {int(s): v for s, v in r["miou"].items()} for r in results}
    out = []
    for key, first, second, claim in COMPARISONS:
        if first in by and second in by:
            ci = paired(by[first], by[second])
            out.append(
                {
                    "key": key,
                    "first": first,
                    "second": second,
                    "claim": claim,
                    "diff": ci,
                    "verdict": verdict(ci),
                }
            )
    return out


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


def n_note(r: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """ " (n = N)" where a row has more seeds than the fewest any row has, else ""."""
    n, least = r["miou_ci"]["n"], min(x["miou_ci"]["n"] for x in results)
    return f" (n = {n})" if n > least else ""


def table(results: list[dict[str, Any]], header: str, comps: list[dict] | None = None) -> str:
    lines = [
        header,
        "",
        "| # | setting | val mIoU | Δ vs labeled only | Δ vs raw | kept % | kept acc % | "
        "pseudo mIoU % | object recall % | object precision % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        p = r["pseudo"]
        twin = r.get("same_runs_as")
        title = r["title"] + (f" (same pseudo-labels as `{twin}`: same runs)" if twin else "")
        lines.append(
            f"| {i} | {title} | {fmt_ci(r['miou_ci'])}{n_note(r, results)} | "
            f"{fmt_ci(r['diff_labeled_only'], True)} | {fmt_ci(r['diff_raw'], True)} | "
            f"{pct(p['kept_fraction'])} | {pct(p['kept_accuracy'])} | {pct(p['miou'])} | "
            f"{pct(p.get('object_recall'))} | {pct(p.get('object_precision'))} |"
        )
    if comps:
        lines += ["", "| claim | paired difference | verdict |", "|---|---|---|"]
        for c in comps:
            lines.append(f"| {c['claim']} | {fmt_ci(c['diff'], True)} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Options:
    """What one ablation run needs besides its config (see ``--help``)."""

    config: str
    rows: list[Row]
    seeds: list[int]
    jobs: int
    eval_last: int
    train_set: list[str]
    data_set: list[str]
    out: str | None = None
    report_dir: str | None = None  # where ablation.md/.json go (default: the output folder)
    # pseudo-label folders calibrated and evaluated beyond the rows' own, trained on by no row
    pseudo_only: tuple[str, ...] = ()
    # sequential seeds: a row whose interval is wider than ± until_half_width after ``seeds``
    # gets the next seed, one at a time, up to max_seeds seeds (0: off)
    until_half_width: float = 0.0
    max_seeds: int = 10


def run_ablation(opt: Options) -> dict[str, Any]:
    """One ablation: annotator, annotation, calibrations, evaluation, training runs, tables.

    Returns the content of ``ablation.json`` (also written, with ``ablation.md``, into the
    output folder, default ``{run_dir}/ablation``).
    """
    py = sys.executable
    rows, seeds = opt.rows, opt.seeds
    derived = derive_config(opt.config, opt.data_set, opt.train_set)
    out = Path(opt.out) if opt.out else run_dir(derived) / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(derived, out)
    cfg = load_config(config)
    t0 = time.perf_counter()

    mpath = data_manifest.resolve_manifest(cfg)
    model = Path(cfg.get("annotate", {}).get("model") or "")
    prep: dict[str, dict[str, float]] = {}  # cost of each step that ran now
    if "_annotator" in derived and not model.is_file():
        # a variant's annotator: annotate trains only the default checkpoint on demand
        print(f"ablation: training the variant's demo annotator ({model}) ...", flush=True)
        prep["annotator"] = sh(
            [py, "-m", "train", "fit", "--config", str(out / "annotator.toml")],
            out / "logs" / "annotator.log",
        )
    print(f"ablation: annotating ({config}) ...", flush=True)
    prep["annotate"] = sh(
        [py, "-m", "annotate", "run", "--config", str(config)], out / "logs" / "annotate.log"
    )
    m = data_manifest.load(mpath)
    own = {r.calibration for r in rows if r.calibration}
    needed, failed = sorted(own | set(opt.pseudo_only)), {}
    for name in list(needed):
        print(f"ablation: calibrating {name} ...", flush=True)
        try:
            prep[f"calibrate_{name}"] = sh(
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
        except SystemExit as e:  # a folder no row trains on may fail (e.g. nothing certified)
            if name in own:
                raise
            failed[name] = str(e).splitlines()[-1]
            needed.remove(name)
            print(f"ablation: {name} gave no pseudo-labels: {failed[name]}", flush=True)
    quality, quality_set, ann = {}, None, None
    if needed:
        print("ablation: evaluating the pseudo-labels ...", flush=True)
        prep["evaluate"] = sh(
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

    threads = max(1, (os.cpu_count() or 1) // max(1, opt.jobs))

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
        log = out / "logs" / f"train_{row.key}_seed{seed}.log"
        cost = sh(cmd, log, threads)
        atomic_write_json(log.with_suffix(".cost.json"), cost)
        print(
            f"ablation: trained {row.key} seed {seed} ({cost['wall_s']:.0f} s, "
            f"CPU {cost['cpu_s']:.0f} s)",
            flush=True,
        )

    same_as = twins(rows, {n: folder_digest(out / "pseudo" / n) for n in needed})
    for key, twin in same_as.items():
        print(f"ablation: {key} has the same pseudo-labels as {twin}: its runs are {twin}'s")
    row_seeds = {r.key: list(seeds) for r in rows}
    jobs = [(r, s) for r, s in train_jobs(rows, seeds) if r.key not in same_as]
    while jobs:
        with ThreadPoolExecutor(max_workers=max(1, opt.jobs)) as pool:
            futures = [pool.submit(train, j) for j in jobs]
            for done in as_completed(futures):
                if done.exception() is not None:  # stop at the first failure: start no more
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise done.exception()
        jobs = more_seeds(rows, row_seeds, out, same_as, opt)
        for r, s in jobs:
            row_seeds[r.key].append(s)
            print(f"ablation: {r.key}'s interval is wider than ± {opt.until_half_width}: seed {s}")
    for key, twin in same_as.items():
        row_seeds[key] = row_seeds[twin]

    bg = m.meta.background_index
    background = m.classes[bg] if bg is not None else None
    results = summarise(
        rows, row_seeds, out, quality, quality_set or "", same_as, opt.eval_last, background
    )
    comps = comparisons(results)
    tc = cfg.get("train", {})
    figure = (
        "val mIoU (%) at the end of training"
        if opt.eval_last <= 1
        else f"val mIoU (%), mean of the last {opt.eval_last} evaluations"
    )
    header = (
        f"`{m.meta.dataset}` ({mpath}): {figure} over seeds {seeds}"
        + (
            f" (a row wider than ± {opt.until_half_width:g} then got the next seed, one at a "
            f"time, up to {opt.max_seeds}: its n is shown)"
            if opt.until_half_width > 0
            else ""
        )
        + ", mean ± 95 % "
        "t-interval half-width; Δ: mean paired difference (same seed) ± its 95 % "
        "t-interval half-width, * where the interval excludes 0. Annotator's own val mIoU "
        f"{pct(ann)} %. Schedule: batch {tc.get('batch_size', 8)} + "
        f"{tc.get('batch_size', 8)}, Stage I {tc.get('stage1_length', '?')} + Stage II "
        f"{tc.get('stage2_length', '?')} {tc.get('length_unit', 'epochs')}, evaluation every "
        f"{tc.get('eval_every', '?')}. Pseudo-label columns: `calibrate evaluate` on the "
        f"{quality_set or '—'} images (object: mean over the non-background classes)."
    )
    md = table(results, header, comps) + certified_lines(results, out / "pseudo")
    content = {
        "config": str(config),
        "data_set": parse_sets(opt.data_set),
        "seeds": seeds,
        "row_seeds": row_seeds,
        "until_half_width": opt.until_half_width,
        "eval_last": opt.eval_last,
        "annotator_val_miou": ann,
        "qhat": _qhat(out / "pseudo" / "cp"),
        "pseudo_quality": {
            n: {
                **{k: quality.get(n, {}).get(k) for k in PSEUDO_KEYS},
                **object_figures(quality.get(n, {}), background),
            }
            for n in needed
        },
        "pseudo_failed": failed,
        "rows": results,
        "comparisons": comps,
        "pseudo_quality_set": quality_set,
        "wall_s": time.perf_counter() - t0,
        "train_cost": costs(out, rows, row_seeds, same_as),
        "prep_cost_this_call": prep,
    }
    report = Path(opt.report_dir) if opt.report_dir else out
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "ablation.md", md)
    atomic_write_json(report / "ablation.json", content)
    print(md)
    print(f"ablation: wrote {report / 'ablation.md'} and {report / 'ablation.json'}")
    return content


def more_seeds(
    rows: list[Row],
    row_seeds: dict[str, list[int]],
    out: Path,
    same_as: dict[str, str],
    opt: Options,
) -> list[tuple[Row, int]]:
    """The next (row, seed) of every row whose interval over its seeds so far is wider than
    ``opt.until_half_width`` and that has fewer than ``opt.max_seeds`` seeds (none when the
    rule is off)."""
    if opt.until_half_width <= 0:
        return []
    todo = []
    for r in rows:
        seeds = row_seeds[r.key]
        if r.key in same_as or len(seeds) >= opt.max_seeds:
            continue
        values = [run_miou(out / "runs" / r.key / f"seed{s}", opt.eval_last) for s in seeds]
        hw = t_interval([v for v in values if v is not None])["half_width"]
        if hw is not None and hw > opt.until_half_width:
            todo.append((r, max(seeds) + 1))
    return todo


def costs(
    out: Path, rows: list[Row], seeds: dict[str, list[int]], same_as: dict[str, str]
) -> dict[str, Any]:
    """Per row, the mean wall and CPU seconds of its training runs (as recorded when they
    ran; runs of a twin row are counted once), and the totals."""
    per_row, cpu, wall = {}, 0.0, 0.0
    for row in rows:
        if row.key in same_as:
            continue
        recs = []
        for s in seeds[row.key]:
            f = out / "logs" / f"train_{row.key}_seed{s}.cost.json"
            if f.is_file():
                recs.append(json.loads(f.read_text()))
        if recs:
            per_row[row.key] = {
                "runs": len(recs),
                "wall_s": float(np.mean([r["wall_s"] for r in recs])),
                "cpu_s": float(np.mean([r["cpu_s"] for r in recs])),
            }
            cpu += sum(r["cpu_s"] for r in recs)
            wall += sum(r["wall_s"] for r in recs)
    return {"per_row": per_row, "total_cpu_s": cpu, "total_run_wall_s": wall}


def certified_lines(results: list[dict[str, Any]], pseudo: Path) -> str:
    """Markdown: for each recall-floor folder, ε, the certified classes, and per class the
    certified quantity measured on the quality set (the mean miss rate of reachable pixels)."""
    out, seen = [], set()
    for r in results:
        miss, calib = r["pseudo"].get("mean_reachable_miss"), r["calibration"]
        if not miss or calib in seen:
            continue
        seen.add(calib)
        rec = json.loads((pseudo / calib / "calibration.json").read_text())["recall"]
        cells = ", ".join(
            f"{c} {'—' if miss.get(c) is None else f'{miss[c]:.3f}'}"
            + ("" if c in rec["certified"] else " (not certified)")
            for c in (sel["cls"] for sel in rec["selection"])
        )
        out.append(
            f"\n`{calib}`: certified E[miss rate] ≤ {rec['epsilon']} per class; measured on the "
            f"{r['pseudo']['set']} images: {cells}.\n"
        )
    return "".join(out)


def _qhat(folder: Path) -> float | None:
    """CP's q̂ from its calibration.json (None without a CP folder)."""
    rep = folder / "calibration.json"
    if not rep.is_file():
        return None
    q = json.loads(rep.read_text()).get("qhat")
    return float(q) if isinstance(q, int | float) else None


def sweep_values(spec: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` → (key, values as TOML values)."""
    key, _, values = spec.partition("=")
    if not key.strip() or not values.strip():
        raise SystemExit(
            f"ablation: --sweep {spec!r}: expected KEY=V1,V2,... (e.g. demo_gap=0,0.5)"
        )
    return key.strip(), [parse_sets([f"v={v}"])["v"] for v in values.split(",") if v.strip()]


def run_sweep(opt: Options, spec: str, out: Path) -> dict[str, Any]:
    """The ablation once per value of a ``[data]`` key; writes the sweep's tables and plots
    into ``out``. The config's own value runs the config itself (its folders, its runs)."""
    key, values = sweep_values(spec)
    base = load_config(opt.config).get("data", {})
    points = []
    for v in values:
        own = base.get(key) == v and not opt.data_set
        data_set = [] if own else [*opt.data_set, f"{key}={v}"]
        print(f"ablation: sweep {key} = {v}" + (" (the config's own value)" if own else ""))
        # the tables of each value go into the sweep's folder: the config's own value must not
        # overwrite its full ablation's tables with the sweep's rows and seeds
        point = Options(
            **{**opt.__dict__, "data_set": data_set, "report_dir": str(out / f"{key}={v}")}
        )
        points.append({"value": v, **run_ablation(point)})
    content = {"key": key, "values": values, "seeds": opt.seeds, "points": points}
    content["stops"] = stops(content)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", content)
    md = sweep_table(content)
    atomic_write_text(out / "sweep.md", md)
    plot_sweep(content, out)
    print(md)
    print(f"ablation: wrote {out / 'sweep.md'}, sweep.json, sweep_miou.png, sweep_pseudo.png")
    return content


def sweep_table(content: dict[str, Any]) -> str:
    """Markdown: val mIoU per row and value; the annotator and pseudo-label figures per value;
    the claims' paired differences and verdicts per value."""
    key, points = content["key"], content["points"]

    def line(name: str, cells: list[str]) -> str:
        return f"| {name} | {' | '.join(cells)} |"

    head = line("", [f"{key} = {p['value']}" for p in points]) + "\n|---|" + "---|" * len(points)
    rows = [r["row"] for r in points[0]["rows"]] if points else []
    titles = {r["row"]: r["title"] for p in points for r in p["rows"]}

    def row_of(p: dict[str, Any], row: str) -> dict[str, Any] | None:
        return next((r for r in p["rows"] if r["row"] == row), None)

    out = [f"val mIoU (%), mean ± 95 % half-width over seeds {content['seeds']}", "", head]
    for row in rows:
        out.append(
            line(titles[row], [fmt_ci((row_of(p, row) or {}).get("miou_ci")) for p in points])
        )
    out += ["", "annotator and pseudo-labels (`calibrate evaluate`)", "", head]
    out.append(line("annotator val mIoU %", [pct(p["annotator_val_miou"]) for p in points]))
    q = ["—" if p["qhat"] is None else f"{p['qhat']:.4g}" for p in points]
    out.append(line("CP's q̂ (α = 0.05)", q))
    for calib in pseudo_names(points):
        for fig, label in PSEUDO_FIGURES:
            cells = [pct(pseudo_of(p, calib).get(fig)) for p in points]
            out.append(line(f"{calib}: {label} %", cells))
    out += ["", "claims: paired difference (first − second) ± 95 % half-width, verdict", "", head]
    for ck in [c["key"] for c in points[0]["comparisons"]] if points else []:
        cells, name = [], ck
        for p in points:
            c = next((c for c in p["comparisons"] if c["key"] == ck), None)
            name = c["claim"] if c else name
            cells.append("—" if c is None else f"{fmt_ci(c['diff'], True)} ({c['verdict']})")
        out.append(line(name, cells))
    out += ["", f"where each claim stops holding (values of `{key}` in increasing order)", ""]
    out += ["| claim | holds at | stops holding at |", "|---|---|---|"]
    for s in stops(content):
        held = ", ".join(str(v) for v in s["holds_at"]) or "none"
        out.append(f"| {s['claim']} | {held} | {s['stops_at']} |")
    return "\n".join(out) + "\n"


def stops(content: dict[str, Any]) -> list[dict[str, Any]]:
    """Per claim: the values where it holds (its interval above 0) and, in increasing order,
    the first value after the first holding one where it no longer holds ("holds everywhere",
    "never holds", or "holds from V on"; a claim that holds again later is listed by its
    values)."""
    points = sorted(content["points"], key=lambda p: float(p["value"]))
    out = []
    for ck in [c["key"] for c in points[0]["comparisons"]] if points else []:
        verdicts = []
        claim = ck
        for p in points:
            c = next((c for c in p["comparisons"] if c["key"] == ck), None)
            claim = c["claim"] if c else claim
            verdicts.append((p["value"], c["verdict"] if c else "—"))
        holds = [v for v, d in verdicts if d == "holds"]
        start = next((i for i, (_, d) in enumerate(verdicts) if d == "holds"), len(verdicts))
        first_not = next((v for v, d in verdicts[start:] if d != "holds"), None)
        if not holds:
            at = "never holds"
        elif len(holds) == len(verdicts):
            at = "holds everywhere"
        elif first_not is None:
            at = f"holds from {holds[0]} on"
        else:
            at = str(first_not)
        out.append({"key": ck, "claim": claim, "holds_at": holds, "stops_at": at})
    return out


def pseudo_names(points: list[dict[str, Any]]) -> list[str]:
    """The pseudo-label folders any point evaluated, in ``CALIBRATIONS`` order."""
    names = {n for p in points for n in p.get("pseudo_quality", {})}
    names |= {r["calibration"] for p in points for r in p["rows"] if r["calibration"]}
    return [n for n in CALIBRATIONS if n in names]


def pseudo_of(point: dict[str, Any], calib: str) -> dict[str, Any]:
    """One point's pseudo-label figures for a folder ({} where it has none)."""
    if calib in point.get("pseudo_quality", {}):
        return point["pseudo_quality"][calib]
    r = next((r for r in point["rows"] if r["calibration"] == calib), None)
    return r["pseudo"] if r else {}


PSEUDO_KEYS = ("kept_fraction", "kept_accuracy", "miou")
PSEUDO_FIGURES = (
    ("kept_fraction", "kept fraction"),
    ("kept_accuracy", "kept accuracy"),
    ("object_recall", "object recall"),
)


def plot_sweep(content: dict[str, Any], out: Path) -> None:
    """sweep_miou.png (val mIoU per row against the value, 95 % intervals) and
    sweep_pseudo.png (CP's q̂, kept fraction, kept accuracy and object recall per
    pseudo-label folder against the value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, points = content["key"], content["points"]
    x = [float(p["value"]) for p in points]
    rows = [r["row"] for r in points[0]["rows"]] if points else []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, row in enumerate(rows):
        ys, es, xs, title = [], [], [], row
        for xv, p in zip(x, points, strict=True):
            r = next((r for r in p["rows"] if r["row"] == row), None)
            if r and r["miou_ci"]["mean"] is not None:
                title = r["title"]
                xs.append(xv + (i - len(rows) / 2) * 0.004)  # a small offset keeps bars apart
                ys.append(r["miou_ci"]["mean"])
                es.append(r["miou_ci"]["half_width"] or 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="os^vDP*Xh<>"[i % 11], capsize=3, label=title)
    ax.set_xlabel(key)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"val mIoU against {key} (mean, 95 % interval over seeds {content['seeds']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out / "sweep_miou.png")

    calibs = pseudo_names(points)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    axes[0].plot(x, [p["qhat"] if p["qhat"] is not None else np.nan for p in points], "o-")
    axes[0].set_title("CP's q̂ (α = 0.05)")
    for ax, (figname, label) in zip(axes[1:], PSEUDO_FIGURES, strict=True):
        for c in calibs:
            vs = [pseudo_of(p, c).get(figname) for p in points]
            ys = [np.nan if v is None else v for v in vs]
            ax.plot(x, ys, "o-", label=c)
        ax.set_title(label)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle("pseudo-labels on the unlabeled images against " + key)
    _save(fig, out / "sweep_pseudo.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml", help="run config")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds (≥ 5)")
    ap.add_argument("--rows", default=",".join(r.key for r in ROWS), help="rows to run")
    ap.add_argument("--out", default=None, help="output folder (default {run_dir}/ablation)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at once")
    ap.add_argument(
        "--eval-last",
        type=int,
        default=1,
        metavar="N",
        help="a run's figure: the mean of its last N val evaluations (1: the final one); "
        "set [train] eval_every (--train-set eval_every=10) so that they are late in training",
    )
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
    ap.add_argument(
        "--until-half-width",
        type=float,
        default=0.0,
        metavar="H",
        help="sequential seeds: a row whose 95 %% interval after --seeds is wider than ± H "
        "mIoU gets the next seed, one at a time, until it is not or it has --max-seeds "
        "(default 0: off)",
    )
    ap.add_argument("--max-seeds", type=int, default=10, help="with --until-half-width")
    ap.add_argument(
        "--pseudo-only",
        default=None,
        metavar="NAMES",
        help="also calibrate and evaluate these pseudo-label folders, trained on by no row "
        f"(comma-separated, some of {', '.join(CALIBRATIONS)}, or 'all'; default: none, "
        "all with --sweep)",
    )
    ap.add_argument(
        "--sweep",
        default=None,
        metavar="KEY=V1,V2,...",
        help="run the ablation for each value of a [data] key (e.g. demo_gap=0,0.25,0.5,0.75,1; "
        "each value its own demo variant and annotator); --out is then the sweep's folder "
        "(default runs/sweep_KEY)",
    )
    args = ap.parse_args()
    known = {r.key for r in ROWS}
    wanted = [k for k in args.rows.split(",") if k.strip()]
    if unknown := [k for k in wanted if k not in known]:
        raise SystemExit(
            f"ablation: --rows {unknown[0]!r} is not a row; expected some of {sorted(known)}"
        )
    spec = args.pseudo_only if args.pseudo_only is not None else ("all" if args.sweep else "")
    pseudo_only = list(CALIBRATIONS) if spec == "all" else [k for k in spec.split(",") if k]
    if bad := [k for k in pseudo_only if k not in CALIBRATIONS]:
        raise SystemExit(
            f"ablation: --pseudo-only {bad[0]!r} is not a pseudo-label folder; expected some "
            f"of {sorted(CALIBRATIONS)} or 'all'"
        )
    if args.eval_last < 1:
        raise SystemExit(f"ablation: --eval-last {args.eval_last}: expected an integer >= 1")
    opt = Options(
        config=args.config,
        rows=[r for r in ROWS if r.key in wanted],
        seeds=[int(s) for s in args.seeds.split(",") if s.strip()],
        jobs=args.jobs,
        eval_last=args.eval_last,
        train_set=args.train_set,
        data_set=args.data_set,
        out=None if args.sweep else args.out,
        pseudo_only=tuple(pseudo_only),
        until_half_width=args.until_half_width,
        max_seeds=args.max_seeds,
    )
    if args.sweep:
        key = sweep_values(args.sweep)[0]
        run_sweep(opt, args.sweep, Path(args.out or f"runs/sweep_{key}"))
    else:
        run_ablation(opt)


if __name__ == "__main__":
    main()
