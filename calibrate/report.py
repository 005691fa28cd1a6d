"""The calibration report: ``calibration.json``, the summary tables and the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.config import CalibrateConfig
from data_manifest.cli_support import table
from data_manifest.io import atomic_path, atomic_write_text, colorize, read_label_png
from data_manifest.manifest import Manifest


def ratio(a: float, b: float) -> float | None:
    """a / b rounded to 6 decimals, None when b is 0."""
    return round(float(a) / float(b), 6) if b else None


def qhat_json(
    info: dict[str, Any], ia: int, conf: CalibrateConfig, classes: list[str]
) -> float | dict[str, Any]:
    """q̂ as stored in calibration.json: a number (pixel, image modes) or, in class mode,
    ``{"per_class": {name: q̂}, "own": {name: bool}, "pooled": q̂}`` (own = False: the class had
    fewer than class_min_pixels calibration pixels and uses the pooled q̂)."""
    pooled = float(info["pooled"][ia])
    if conf.mode != "class":
        return pooled
    q = np.where(info["own"], info["class"][ia], info["pooled"][ia])
    return {
        "pooled": pooled,
        "per_class": {c: float(v) for c, v in zip(classes, q, strict=True)},
        "own": {c: bool(v) for c, v in zip(classes, info["own"], strict=True)},
    }


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` ≥ 1 degrees of freedom.

    Bisection on the exact distribution function for integer df (Abramowitz & Stegun 26.7.3-4:
    P(|T| ≤ t) as a finite series in θ = atan(t / √df)); the normal quantile beyond df = 1000,
    where the two differ by less than 0.001.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df > 1000:
        return 1.959964

    def two_sided(t: float) -> float:
        th = math.atan(t / math.sqrt(df))
        c2 = math.cos(th) ** 2
        if df % 2:
            term, acc = math.cos(th), 0.0
            for j in range(1, (df - 1) // 2 + 1):
                acc += term
                term *= c2 * (2 * j) / (2 * j + 1)
            return 2 / math.pi * (th + math.sin(th) * acc) if df > 1 else 2 * th / math.pi
        term, acc = 1.0, 0.0
        for j in range(1, df // 2 + 1):
            acc += term
            term *= c2 * (2 * j - 1) / (2 * j)
        return math.sin(th) * acc

    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def pooled_interval(covered: np.ndarray, pixels: np.ndarray) -> list[float] | None:
    """A 95 % interval for the pooled coverage R = Σ covered / Σ pixels over images.

    Pixels come in images, so images, not pixels, are the independent units: R is a ratio
    estimator over m images, with the cluster-robust (linearised) standard error
    SE = sqrt(m / (m − 1) · Σ (c_i − R n_i)²) / Σ n_i. The interval is R's on the logit scale,
    logit R ± t_{0.975, m−1} · SE / (R (1 − R)), mapped back (coverage sits near 1, where a
    symmetric interval would leave [0, 1] and cover less). When every pixel is covered (or
    none) SE is 0 and the interval is the rule of three over images, [1 − 3/m, 1] (or
    [0, 3/m]). None with fewer than 2 images.
    """
    c, n = np.asarray(covered, np.float64), np.asarray(pixels, np.float64)
    m = c.size
    if m < 2 or n.sum() == 0:
        return None
    r = c.sum() / n.sum()
    if r <= 0 or r >= 1:
        return [0.0, round(min(3 / m, 1.0), 6)] if r <= 0 else [round(max(1 - 3 / m, 0.0), 6), 1.0]
    se = math.sqrt(m / (m - 1) * float(((c - r * n) ** 2).sum())) / float(n.sum())
    half = t_quantile_975(m - 1) * se / (r * (1 - r))
    centre = math.log(r / (1 - r))
    return [round(1 / (1 + math.exp(-(centre + d))), 6) for d in (-half, half)]


def per_image_coverage(rows: list[tuple[str, int, int]], alpha: float) -> dict[str, Any] | None:
    """Spread of coverage over images: rows are (id, covered pixels, labeled pixels)."""
    rows = sorted(r for r in rows if r[2] > 0)
    if not rows:
        return None
    cov = np.array([c / n for _, c, n in rows], np.float64)
    q05, q50, q95 = np.percentile(cov, [5, 50, 95])
    return {
        "images": len(rows),
        "median": round(float(q50), 6),
        "p05": round(float(q05), 6),
        "p95": round(float(q95), 6),
        "min": round(float(cov.min()), 6),
        "images_below_target": int((cov < 1 - alpha).sum()),
    }


def figures(
    res: dict | None, grid: tuple[float, ...], ia: int, classes: list[str], extra: dict[str, Any]
) -> dict[str, Any] | None:
    """Turn the integer sums of :func:`calibrate.tasks.evaluate` into rates.

    Returns None when there were no images. Rates are over labeled (non-255) pixels.
    """
    if not res:
        return None
    n = res["pixels"]
    pc = res["pixels_class"]
    covered = res["per_alpha"][ia]
    out = dict(extra)
    imgs = sorted(res.get("per_image", []))
    out.update(
        {
            "images": res["images"],
            "pixels": n,
            "coverage": ratio(covered.sum(), n),
            "coverage_interval_95": pooled_interval(
                np.array([c for _, c, _ in imgs]), np.array([p for _, _, p in imgs])
            ),
            "coverage_per_image": per_image_coverage(imgs, grid[ia]),
            "coverage_per_class": {c: ratio(covered[i], pc[i]) for i, c in enumerate(classes)},
            "pixels_per_class": {c: int(pc[i]) for i, c in enumerate(classes)},
            "mean_set_size": ratio(res["set_size"], n),
            "singleton_rate": ratio(res["singletons"], n),
            "empty_rate": ratio(res["empty"], n),
            "kept_fraction": ratio(res["kept"], n),
            "kept_accuracy": ratio(res["kept_correct"], res["kept"]),
            "raw_accuracy": ratio(res["raw_correct"], n),
            "coverage_curve": [
                {"alpha": a, "coverage": ratio(res["per_alpha"][j].sum(), n)}
                for j, a in enumerate(grid)
            ],
        }
    )
    return out


def summary_tables(fig: dict[str, Any]) -> list[Any]:
    """Rich tables: settings and q̂, then the held-out / val figures side by side."""
    q = fig["qhat"]
    qtxt = f"{q:.6g}" if isinstance(q, float) else f"pooled {q['pooled']:.6g} (per class below)"
    cal = fig["calibration"]
    rows = [
        ["alpha", fig["alpha"]],
        ["mode", fig["mode"]],
        ["score", fig["score"]],
        ["method", fig["method"]],
        ["background rule", f"{fig['background_rule']} (index {fig['background_index']})"],
        ["q̂ (all labeled; used by the PNGs)", qtxt],
        ["calibration images", cal["images"]],
        ["calibration pixels", cal["pixels"]],
    ]
    u = fig["unlabeled"]
    rows += [["unlabeled images", u["images"]], ["unlabeled kept fraction", _f(u["kept_fraction"])]]
    if u.get("undetermined_pixels"):
        rows.append(["undetermined by top-k storage (255)", _f(u["undetermined_fraction"])])
    if u["threshold"] is not None:
        rows.append(["confidence threshold", f"{u['threshold']:.6g}"])
    out = [table("calibration", ["setting", "value"], [[a, str(b)] for a, b in rows])]
    keys = [
        ("images", "images"),
        ("coverage", "coverage"),
        ("mean_set_size", "mean set size"),
        ("singleton_rate", "singleton rate"),
        ("empty_rate", "empty rate"),
        ("kept_fraction", "kept fraction"),
        ("kept_accuracy", "kept accuracy"),
        ("raw_accuracy", "raw argmax accuracy"),
    ]
    cols = [(name, fig[name]) for name in ("held_out", "val") if fig.get(name)]
    if cols:
        spread = [
            ["coverage 95 % interval (images)", *[_interval(d) for _, d in cols]],
            ["coverage per image: median", *[_img(d, "median") for _, d in cols]],
            ["coverage per image: 5th-95th pct.", *[_img(d, "p05", "p95") for _, d in cols]],
        ]
        out.append(
            table(
                f"figures at alpha = {fig['alpha']} (target coverage {1 - fig['alpha']:.4g})",
                ["figure", *[c for c, _ in cols]],
                [[label, *[_f(d[k]) for _, d in cols]] for k, label in keys[:2]]
                + spread
                + [[label, *[_f(d[k]) for _, d in cols]] for k, label in keys[2:]],
            )
        )
        classes = fig["classes"]
        per = [[c, *[_f(d["coverage_per_class"][c]) for _, d in cols]] for c in classes]
        if isinstance(q, dict):
            per = [
                [*r, f"{q['per_class'][c]:.6g}" + ("" if q["own"][c] else " (pooled)")]
                for r, c in zip(per, classes, strict=True)
            ]
        out.append(
            table(
                "coverage per class",
                ["class", *[c for c, _ in cols]] + (["q̂"] if isinstance(q, dict) else []),
                per,
            )
        )
    return out


def _interval(d: dict[str, Any]) -> str:
    iv = d.get("coverage_interval_95")
    return "-" if iv is None else f"[{iv[0]:.4f}, {iv[1]:.4f}]"


def _img(d: dict[str, Any], *keys: str) -> str:
    per = d.get("coverage_per_image")
    return "-" if per is None else " - ".join(f"{per[k]:.4f}" for k in keys)


def _f(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})


def write_all(
    out_dir: Path,
    fig: dict[str, Any],
    rows: list[tuple],
    manifest: Manifest,
    cache: Any,
    conf: CalibrateConfig,
) -> None:
    """Write kept_fraction.json, the plots (if enabled) and, last, calibration.json.

    ``rows``: (id, kept pixels, pixels, ...) per unlabeled image. Files whose bytes would not
    change are left alone.
    """
    _write_json_if_changed(out_dir / "kept_fraction.json", {r[0]: ratio(r[1], r[2]) for r in rows})
    if conf.plots:
        write_plots(out_dir, fig, rows, manifest, cache, conf)
    _write_json_if_changed(out_dir / "calibration.json", fig)


def _write_json_if_changed(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def write_plots(
    out_dir: Path,
    fig: dict[str, Any],
    rows: list[tuple],
    manifest: Manifest,
    cache: Any,
    conf: CalibrateConfig,
) -> None:
    """coverage_vs_alpha, per_class_coverage, kept_fraction and overlays PNGs in out_dir/plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out_dir / "plots"
    sets = [(name, fig[name]) for name in ("held_out", "val") if fig.get(name)]
    # coverage against alpha
    f, ax = plt.subplots(figsize=(5, 4))
    alphas = [p["alpha"] for p in (sets[0][1]["coverage_curve"] if sets else [])]
    if alphas:
        xs = np.linspace(0, max(alphas) * 1.05, 50)
        ax.plot(xs, 1 - xs, "k--", label="1 − α")
    for name, d in sets:
        ax.plot(
            [p["alpha"] for p in d["coverage_curve"]],
            [p["coverage"] for p in d["coverage_curve"]],
            "o-",
            label=name,
        )
    ax.set_xlabel("α")
    ax.set_ylabel("empirical coverage")
    ax.set_title(f"coverage against α ({fig['mode']}, {fig['score']})")
    ax.legend()
    f.tight_layout()
    _save(f, plots / "coverage_vs_alpha.png")
    plt.close(f)
    # per-class coverage
    classes = fig["classes"]
    f, ax = plt.subplots(figsize=(max(5, 0.5 * len(classes) + 2), 4))
    width = 0.8 / max(len(sets), 1)
    for j, (name, d) in enumerate(sets):
        vals = [d["coverage_per_class"][c] or 0.0 for c in classes]
        ax.bar(np.arange(len(classes)) + j * width, vals, width=width, label=name)
    ax.axhline(1 - fig["alpha"], color="k", ls="--", label="1 − α")
    ax.set_xticks(np.arange(len(classes)) + width * (len(sets) - 1) / 2)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("coverage")
    ax.set_title(f"per-class coverage at α = {fig['alpha']}")
    ax.legend(loc="lower right")
    f.tight_layout()
    _save(f, plots / "per_class_coverage.png")
    plt.close(f)
    # kept fraction per unlabeled image
    f, ax = plt.subplots(figsize=(5, 4))
    kept = [ratio(r[1], r[2]) or 0.0 for r in rows]
    ax.hist(kept, bins=20, range=(0, 1))
    ax.set_xlabel("kept pixel fraction")
    ax.set_ylabel("unlabeled images")
    ax.set_title(f"kept fraction per image ({fig['method']})")
    f.tight_layout()
    _save(f, plots / "kept_fraction.png")
    plt.close(f)
    # overlays: image | raw argmax | pseudo-label
    ids = [r[0] for r in rows[: conf.overlays]]
    if ids:
        f, axes = plt.subplots(len(ids), 3, figsize=(9, 3 * len(ids)), squeeze=False)
        for ax_row, image_id in zip(axes, ids, strict=True):
            row = manifest.row(image_id)
            pseudo = read_label_png(out_dir / f"{image_id}.png")
            panels = [
                manifest.read_image(row),
                colorize(cache.argmax(image_id), manifest.palette),
                colorize(pseudo, manifest.palette),
            ]
            for ax, im, title in zip(
                ax_row,
                panels,
                ("image", "raw argmax", f"pseudo-label ({fig['method']})"),
                strict=True,
            ):
                ax.imshow(im)
                ax.set_title(f"{image_id}: {title}" if title == "image" else title, fontsize=8)
                ax.axis("off")
        f.tight_layout()
        _save(f, plots / "overlays.png")
        plt.close(f)
