"""Method "recall" on real data: does the certified miss rate hold, and how often does one
calibration split miss it?

    python bench/recall_check.py --config configs/demo.toml --miss 0.2 --draws 2000

The guarantee of ``calibrate run --method recall`` is in expectation over the calibration
images and a new image (docs/calibrate.md). On a benchmark whose images all have labels (the
demo: labeled, unlabeled and val), this script pools every labeled image of the cache and
draws random splits of it: ``--n`` images (default: the manifest's labeled count, drawn from
the images with full scores, as calibration needs) calibrate, the others are the new
images. Per class and draw it selects the threshold exactly as the
method does (:func:`calibrate.recall.select`) and measures the realised mean miss rate of
the reachable pixels on the other images. Over the draws, the mean of that realised rate
estimates what the guarantee bounds (≤ ε up to the printed standard error); the fraction of
draws above ε is how often a single split, such as the one the method ran on, misses it. The
split of the manifest is measured too. Prints a table; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import annotate  # noqa: E402
import data_manifest  # noqa: E402
from calibrate import quantile as Q  # noqa: E402
from calibrate import recall as C  # noqa: E402
from calibrate import risk as R  # noqa: E402
from calibrate import sets as S  # noqa: E402
from calibrate import topk as T  # noqa: E402
from data_manifest.config import load_config, run_dir  # noqa: E402
from data_manifest.manifest import reduce_zero_label  # noqa: E402


def pool_stats(
    mpath: Path, cpath: Path
) -> tuple[list[str], list[str], dict[str, np.ndarray], list[np.ndarray]]:
    """Per-image :func:`calibrate.recall.stats_from` of every image with a label in the
    cache, stacked (N, ...), with their ids and splits, and each labeled image's LAC scores
    1 − p_y (float32, for the paper's q̂: None for top-k entries, which cannot give them).
    Confidences are rounded to float16 when the cache holds top-k entries, as the method
    does."""
    m = data_manifest.load(mpath)
    cache = annotate.open_cache(cpath)
    k, bg = m.num_classes, m.meta.background_index
    quantize = 0 < cache.meta.topk < cache.num_classes
    present = set(cache.ids)
    grid = C.class_grid()
    ids, splits, parts, scores = [], [], [], []
    for r in m.rows:
        if r.label is None or r.id not in present:
            continue
        lab = m.read_label(r)
        if m.meta.reduce_zero_label:
            lab = reduce_zero_label(lab)
        x = T.read_unlabeled(cache, r.id) if cache.info(r.id)["mode"] == "topk" else None
        if x is None:
            probs = cache.probs(r.id)
            f, pi, _ = C.foreground(probs, bg, quantize)
            scores.append(S.true_class_scores(probs, lab, "lac")[0])
        else:
            f, pi = C.top_foreground(x, bg)
            scores.append(None)
        parts.append(C.stats_from(f, pi, lab, grid, k, bg))
        ids.append(r.id)
        splits.append(r.split)
    return ids, splits, {key: np.stack([p[key] for p in parts]) for key in parts[0]}, scores


def paper_threshold(scores: list[np.ndarray | None], cal: np.ndarray, alpha: float) -> float:
    """1 − q̂ of the paper's pixel-wise step on the calibration images (exact rank; top-k
    entries, which have no scores, are left out of the pool of calibration candidates)."""
    s = np.concatenate([scores[i] for i in np.flatnonzero(cal)])
    rank = Q.conformal_rank(s.size, alpha)
    q = np.float32(1.0) if rank > s.size else np.partition(s, rank - 1)[rank - 1]
    return float(np.float32(1) - np.float32(q))


def realised(
    stats: dict[str, np.ndarray],
    cal: np.ndarray,
    eps: float,
    classes: list[str],
    bg: int | None,
    fallback: float,
) -> list[dict]:
    """Select on the images ``cal`` (bool (N,)), measure on the others: per class, whether
    it is certified, its threshold, and the mean miss rate over the other images that have
    reachable pixels of it."""
    grid = C.class_grid()
    summed = {key: v[cal].sum(0) for key, v in stats.items()}
    out = []
    for s in C.select(summed, grid, eps, classes, bg, fallback):
        c = classes.index(s.cls)
        rest = ~cal & (stats["present"][:, c] > 0)
        j = s.index
        if j >= 0 and rest.any():
            miss = float(stats["loss"][rest, c, j].mean()) / R.SCALE
        else:
            miss = 1.0 if rest.any() else None
        out.append({"cls": s.cls, "certified": s.certified, "tau": s.tau, "miss": miss})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml", help="run config")
    ap.add_argument("--miss", type=float, default=0.2, help="ε, the miss rate to certify")
    ap.add_argument("--alpha", type=float, default=0.05, help="α of the paper's fallback q̂")
    ap.add_argument("--draws", type=int, default=2000, help="random calibration splits")
    ap.add_argument("--n", type=int, default=0, help="calibration images (0: the labeled count)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random splits")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args()
    cfg = load_config(args.config)
    mpath = Path(data_manifest.resolve_manifest(cfg))
    cpath = Path(cfg.get("annotate", {}).get("cache") or run_dir(cfg) / "cache.zarr")
    m = data_manifest.load(mpath)
    classes, bg = list(m.classes), m.meta.background_index
    ids, splits, stats, scores = pool_stats(mpath, cpath)
    with_scores = np.array([sc is not None for sc in scores])
    n_cal = args.n or sum(s == "labeled" for s in splits)
    rng = np.random.default_rng(args.seed)
    fg = [c for i, c in enumerate(classes) if i != bg]
    draws = {c: {"miss": [], "certified": 0, "tau": []} for c in fg}
    for _ in range(args.draws):
        cal = np.zeros(len(ids), bool)
        cal[rng.choice(np.flatnonzero(with_scores), size=n_cal, replace=False)] = True
        fallback = paper_threshold(scores, cal, args.alpha)
        for r in realised(stats, cal, args.miss, classes, bg, fallback):
            d = draws[r["cls"]]
            d["certified"] += r["certified"]
            if r["certified"] and r["miss"] is not None:
                d["miss"].append(r["miss"])
                d["tau"].append(r["tau"])
    labeled = np.array([s == "labeled" for s in splits])  # the manifest's own split
    own_fallback = paper_threshold(scores, labeled, args.alpha)
    own = realised(stats, labeled, args.miss, classes, bg, own_fallback)
    result = {
        "config": args.config,
        "epsilon": args.miss,
        "images": len(ids),
        "calibration_images": n_cal,
        "draws": args.draws,
        "classes": {},
        "manifest_split": own,
    }
    print(
        f"recall floor ε = {args.miss}: {args.draws} random splits of {len(ids)} labeled "
        f"images ({n_cal} calibrate, the rest are new images)"
    )
    print(
        f"{'class':12s} {'certified':>9s} {'mean miss':>10s} {'± 2 se':>7s} {'P(miss > ε)':>12s}"
        f" {'median t':>9s} {'manifest split: miss (t)':>26s}"
    )
    for c in fg:
        d = draws[c]
        x = np.asarray(d["miss"])
        se = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
        o = next(r for r in own if r["cls"] == c)
        result["classes"][c] = {
            "certified_fraction": d["certified"] / args.draws,
            "mean_miss": float(x.mean()) if x.size else None,
            "standard_error": float(se),
            "fraction_above_epsilon": float((x > args.miss).mean()) if x.size else None,
            "median_threshold": float(np.median(d["tau"])) if d["tau"] else None,
        }
        own_txt = "—" if o["miss"] is None else f"{o['miss']:.3f} ({o['tau']:.3g})"
        own_txt += "" if o["certified"] else " not certified"
        print(
            f"{c:12s} {d['certified'] / args.draws:9.2f} {x.mean():10.3f} {2 * se:7.3f} "
            f"{(x > args.miss).mean():12.2f} {np.median(d['tau']):9.3g} {own_txt:>26s}"
        )
    result["precision_at_papers_recall"] = precision_table(
        stats, ~labeled, own_fallback, classes, bg
    )
    print(
        "\nthe best precision any per-class threshold reaches while labeling a class wherever the "
        "paper's rule does (t_c ≤ 1 − q̂ of the manifest split), on the images other than the "
        "labeled ones:"
    )
    print(f"{'class':12s} {'paper recall':>12s} {'paper precision':>15s} {'best precision':>14s}")
    for c, v in result["precision_at_papers_recall"].items():
        print(f"{c:12s} {v['recall']:12.3f} {v['precision']:15.3f} {v['best_precision']:14.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def precision_table(
    stats: dict[str, np.ndarray],
    rows: np.ndarray,
    t_paper: float,
    classes: list[str],
    bg: int | None,
) -> dict[str, dict[str, float]]:
    """Per class, pooled over the images ``rows``: recall and precision of label c at the
    paper's threshold (the grid value at or below ``t_paper``), and the highest precision at
    any grid threshold at or below it, i.e. with at least the paper's recall of c (a
    class-separable rule labels c at t_c ≤ t_paper wherever it does at t_paper)."""
    grid = C.class_grid()
    j0 = int(np.flatnonzero(grid <= np.float32(t_paper))[0])
    out = {}
    for c, name in enumerate(classes):
        if c == bg:
            continue
        tp = stats["tp"][rows, c].sum(0).astype(np.float64)
        claimed = stats["claimed"][rows, c].sum(0).astype(np.float64)
        n = float(stats["pixels"][rows, c].sum())
        prec = np.where(claimed > 0, tp / np.maximum(claimed, 1), 0.0)
        out[name] = {
            "recall": tp[j0] / n if n else float("nan"),
            "precision": float(prec[j0]),
            "best_precision": float(prec[j0:].max()),
        }
    return out


if __name__ == "__main__":
    main()
