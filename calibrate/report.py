"""The calibration report: ``calibration.json``, the summary tables and the PNG plots."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from calibrate import html_report as H
from calibrate.config import CalibrateConfig
from data_manifest.cli_support import table
from data_manifest.io import atomic_path, atomic_write_text, read_label_png
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


# calibration.json's "qhat_used_by_pngs": what the PNGs are thresholded with, per method
PNG_RULE = {
    "cp": "q̂ from all labeled images",
    "threshold": "none: the confidence threshold unlabeled.threshold",
    "raw": "none: the raw argmax",
    "risk": "none: the risk-controlled threshold risk.tau",
    "recall": "none: the per-class thresholds recall.thresholds",
}
_QHAT_ROLE = {
    "cp": "q̂ (all labeled images; used by the PNGs)",
    "threshold": "q̂ (CP's, all labeled images; τ keeps as many pixels as it)",
    "raw": "q̂ (CP's, for the figures; the PNGs are the raw argmax)",
    "risk": "q̂ (CP's, for the figures; the PNGs use τ, below)",
    "recall": "q̂ (CP's; the threshold of classes too rare to certify is 1 − q̂)",
}


def summary_tables(fig: dict[str, Any]) -> list[Any]:
    """Rich tables (at most about 100 characters wide): settings, q̂ and what the PNGs use, then
    the prediction-set figures on the held-out and val images, then per-class coverage."""
    q = fig["qhat"]
    method = fig["method"]
    qtxt = f"{q:.6g}" if isinstance(q, float) else f"pooled {q['pooled']:.6g} (per class below)"
    cal = fig["calibration"]
    rows = [
        ["alpha", fig["alpha"]],
        ["mode", fig["mode"]],
        ["score", fig["score"]],
        ["method", method],
        ["background rule", f"{fig['background_rule']} (index {fig['background_index']})"],
        [_QHAT_ROLE.get(method, "q̂ (all labeled images)"), qtxt],
        ["calibration images", cal["images"]],
        ["calibration pixels", cal["pixels"]],
    ]
    u = fig["unlabeled"]
    rows += [["unlabeled images", u["images"]], ["unlabeled kept fraction", _f(u["kept_fraction"])]]
    if u.get("undetermined_pixels"):
        rows.append(["undetermined by top-k storage (255)", _f(u["undetermined_fraction"])])
    if u["threshold"] is not None:
        what = "τ (risk control)" if method == "risk" else "confidence threshold τ"
        rows.append([f"{what}, used by the PNGs", f"{u['threshold']:.6g}"])
    out = [table("calibration", ["setting", "value"], [[a, str(b)] for a, b in rows])]
    keys = [
        ("images", "images"),
        ("coverage", "coverage"),
        ("mean_set_size", "mean set size"),
        ("singleton_rate", "singleton rate"),
        ("empty_rate", "empty rate"),
        ("kept_fraction", "kept fraction (CP rule)"),
        ("kept_accuracy", "kept accuracy (CP rule)"),
        ("raw_accuracy", "raw argmax accuracy"),
    ]
    if method != "cp":  # these PNGs keep other pixels: the CP rule's kept pixels would mislead
        keys = [k for k in keys if k[0] not in ("kept_fraction", "kept_accuracy")]
    cols = [(name, fig[name]) for name in ("held_out", "val") if fig.get(name)]
    if cols:
        spread = [
            ["coverage 95 % interval (images)", *[_interval(d) for _, d in cols]],
            ["coverage per image: median", *[_img(d, "median") for _, d in cols]],
            ["coverage per image: 5th-95th pct.", *[_img(d, "p05", "p95") for _, d in cols]],
        ]
        title = (
            f"prediction sets at alpha = {fig['alpha']} (target coverage {1 - fig['alpha']:.4g})"
        )
        if method != "cp":
            title += f"; the PNGs use method {method}"
        out.append(
            table(
                title,
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
    if fig.get("risk"):
        out += risk_tables(fig["risk"])
    if fig.get("recall"):
        out += recall_tables(fig["recall"])
    return out


def recall_tables(fig: dict[str, Any]) -> list[Any]:
    """Method recall: ε, its guarantee and the classes it cannot certify; then per class its
    threshold, whether its miss rate is certified (with the CRC bound), and the miss rate,
    recall and precision on the calibration and val images."""
    head = [
        ["ε (miss rate per object class)", _f(fig["epsilon"])],
        ["guarantee", _wrap(fig["guarantee"])],
        ["not certified (too few images)", ", ".join(fig["not_certified"]) or "none"],
        ["their threshold (1 − q̂)", f"{fig['fallback']:.4g}"],
    ]
    val = fig.get("val") or {}
    rows = []
    for s in fig["selection"]:
        v = val.get(s["cls"], {})
        rows.append(
            [
                s["cls"],
                f"{s['tau']:.4g}",
                f"yes ({_f(s['statistic'])})" if s["certified"] else "no",
                str(s["images"]),
                f"{_f(s['miss'])} / {_f(s['recall'])} / {_f(s['precision'])}",
                f"{_f(v.get('mean_miss'))} / {_f(v.get('recall'))} / {_f(v.get('precision'))}",
            ]
        )
    cols = [
        "class",
        "threshold",
        f"certified (bound ≤ {fig['epsilon']})",
        "images",
        "calibration miss / recall / precision",
        "val miss / recall / precision",
    ]
    return [
        table("recall floor", ["", "value"], head),
        table("recall floor per class", cols, rows),
    ]


def risk_tables(fig: dict[str, Any]) -> list[Any]:
    """Method risk: τ̂, its guarantee and certificate; then the kept-pixel figures where labels
    allow, one column per image set (calibration, held-out with its own τ, val)."""
    sel = fig["selection"]
    control = fig["control"] + (f" (δ = {fig['delta']})" if fig["delta"] else "")
    cert = "CRC bound ≤ ε" if fig["control"] == "crc" else "p-value ≤ δ"
    rows = [
        ["control", control],
        ["ε (target error of kept pixels)", _f(fig["epsilon"])],
        [
            "τ (confidence threshold, PNGs)",
            "keeps nothing" if fig["keeps_nothing"] else _f(fig["tau"]),
        ],
        ["calibration images", _f(sel["images"])],
        [f"certificate ({cert})", _f(sel["statistic"])],
    ]
    rows.append(["guarantee", _wrap(fig["guarantee"])])
    if sel["note"]:
        rows.append(["note", _wrap(sel["note"])])
    out = [table("risk control", ["", "value"], rows)]
    sets = [
        (n, fig[n]) for n in ("calibration", "held_out", "val") if (fig.get(n) or {}).get("images")
    ]
    if sets:
        keys = [
            ("images", "images"),
            ("tau", "τ used (held-out: from the other images)"),
            ("kept_fraction", "kept fraction"),
            ("kept_error", "error of kept pixels"),
            ("mean_image_error", "mean per-image error"),
        ]
        body = [
            [label, *[_f(d.get(k, fig["tau"] if k == "tau" else None)) for _, d in sets]]
            for k, label in keys
        ]
        out.append(table("risk control: kept pixels", ["figure", *[n for n, _ in sets]], body))
    return out


def _wrap(text: str, width: int = 56) -> str:
    """Long text on several lines of a table cell, so that tables stay narrow in a log."""
    return textwrap.fill(str(text), width, break_long_words=False, break_on_hyphens=False)


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
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None}, bbox_inches="tight")


PLOTS = ("coverage_vs_alpha", "per_class_coverage", "kept_fraction", "overlays")


def write_all(
    out_dir: Path,
    fig: dict[str, Any],
    rows: list[tuple],
    manifest: Manifest,
    cache: Any,
    conf: CalibrateConfig,
) -> None:
    """Write kept_fraction.json, the plots (if enabled), report.html and, last,
    calibration.json.

    ``rows``: (id, kept pixels, pixels, ...) per unlabeled image. Files whose bytes would not
    change are left alone.
    """
    _write_json_if_changed(out_dir / "kept_fraction.json", {r[0]: ratio(r[1], r[2]) for r in rows})
    order, errors = gallery_order(out_dir, rows, manifest)
    if conf.plots:
        write_plots(out_dir, fig, rows, manifest, cache, conf, order)
    write_html(out_dir, fig, rows, manifest, cache, conf, order, errors)
    _write_json_if_changed(out_dir / "calibration.json", fig)


def gallery_order(
    out_dir: Path, rows: list[tuple], manifest: Manifest
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Unlabeled ids worst first (see :func:`calibrate.html_report.rank`), and (kept, wrong)
    pixels of the PNGs of the ranked images that have a true label."""
    ids = [r[0] for r in rows]
    with_truth = [i for i in ids if manifest.row(i).label is not None]
    errors = H.pseudo_errors(out_dir, manifest, H.sample(with_truth))
    kept = {r[0]: ratio(r[1], r[2]) or 0.0 for r in rows}
    return H.rank(ids, kept, errors), errors


def write_html(
    out_dir: Path,
    fig: dict[str, Any],
    rows: list[tuple],
    manifest: Manifest,
    cache: Any,
    conf: CalibrateConfig,
    order: list[str],
    errors: dict[str, tuple[int, int]],
) -> Path:
    """report.html: the summary tables, the plots and the gallery, worst images first."""
    kept = {r[0]: (r[1], r[2]) for r in rows}
    method = fig["method"]
    entries = []
    for image_id in order[: conf.gallery]:
        pseudo = read_label_png(out_dir / f"{image_id}.png")
        panels, _ = H.image_panels(
            manifest, cache, image_id, [(f"pseudo-label ({method})", pseudo)]
        )
        k, n = kept[image_id]
        caption = f"kept {100 * k / max(n, 1):.1f} % of the pixels"
        if image_id in errors:
            e_kept, e_wrong = errors[image_id]
            err = f"{100 * e_wrong / e_kept:.1f} %" if e_kept else "- (nothing kept)"
            caption += f"; error of the kept pixels against the true label: {err}"
        else:
            caption += "; no true label"
        entries.append(H.Entry(image_id, caption, panels))
    n_truth = sum(1 for i in order if i in errors)
    if n_truth == len(order):
        ranked = "by the error of their kept pixels against the true label, highest first"
    elif n_truth:
        ranked = (
            f"the {n_truth} with a true label first, by the error of their kept pixels "
            "(highest first), then the others by the fraction of pixels kept (lowest first)"
        )
    else:
        ranked = "by the fraction of pixels kept, lowest first (none has a true label)"
    if n_truth >= H.RANK_LIMIT:
        ranked += f" (errors measured on an even sample of {H.RANK_LIMIT})"
    gallery = H.gallery_section(
        f"{len(entries)} of {len(order)} unlabeled images, worst first: {ranked}. Raw argmax: "
        "the annotator's most probable class; pseudo-label: what training reads.",
        manifest.classes,
        manifest.palette,
        entries,
    )
    plots = [p for p in PLOTS if (out_dir / "plots" / f"{p}.png").is_file()] if conf.plots else []
    plot_html = (
        '<div class="plots">'
        + "".join(
            f'<img src="{H.file_uri(out_dir / "plots" / f"{p}.png")}" alt="{p}">' for p in plots
        )
        + "</div>"
        if plots
        else '<p class="note">plots are off (plots = false)</p>'
    )
    u = fig["unlabeled"]
    intro = (
        f'<p class="note">python -m calibrate run: method {H.esc(method)}, α = '
        f"{fig['alpha']}, mode {H.esc(fig['mode'])}, score {H.esc(fig['score'])}; "
        f"{u['images']} unlabeled images, kept fraction {_f(u['kept_fraction'])}. Manifest "
        f"{H.esc(fig['manifest']['path'])}, cache {H.esc(fig['cache']['path'])}. The figures "
        "are in calibration.json beside this file.</p>"
    )
    title = f"calibration report: {method}, α = {fig['alpha']}, {fig['mode']} mode"
    return H.write_report(
        out_dir / "report.html", title, intro, summary_tables(fig), plot_html, gallery
    )


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
    order: list[str] | None = None,
) -> None:
    """coverage_vs_alpha, per_class_coverage, kept_fraction and overlays PNGs in out_dir/plots;
    the overlays show the first ``conf.overlays`` images of ``order`` (default: ``rows``')."""
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
    f = per_class_figure(fig)
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
    ids = (order if order is not None else [r[0] for r in rows])[: conf.overlays]
    if ids:
        overlays(out_dir, fig["method"], ids, manifest, cache, plots / "overlays.png")


def per_class_figure(fig: dict[str, Any]) -> Any:
    """The per-class coverage bars (held-out and val) with the 1 − α line; the legend sits
    right of the axes, where it hides no bar."""
    import matplotlib.pyplot as plt

    sets = [(name, fig[name]) for name in ("held_out", "val") if fig.get(name)]
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    f.tight_layout()
    return f


def overlays(
    out_dir: Path, method: str, ids: list[str], manifest: Manifest, cache: Any, path: Path
) -> None:
    """Write overlays.png (see :func:`overlays_figure`)."""
    import matplotlib.pyplot as plt

    f = overlays_figure(out_dir, method, ids, manifest, cache)
    _save(f, path)
    plt.close(f)


def overlays_figure(
    out_dir: Path, method: str, ids: list[str], manifest: Manifest, cache: Any
) -> Any:
    """image | true label (where the manifest has one) | raw argmax | pseudo-label, one row per
    image of ``ids``, under a legend of the classes and of ignored pixels (grey checks)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = []
    for image_id in ids:
        pseudo = read_label_png(out_dir / f"{image_id}.png")
        panels, _ = H.image_panels(
            manifest, cache, image_id, [(f"pseudo-label ({method})", pseudo)]
        )
        rows.append((image_id, [p for p in panels if p[0] != "confidence"]))
    ncol = max(len(p) for _, p in rows)
    height = 2.6 * len(rows) + 0.8  # inches: the rows, then the legend below them
    f, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, height), squeeze=False)
    for ax_row, (image_id, panels) in zip(axes, rows, strict=True):
        for ax in ax_row:
            ax.axis("off")
        for ax, (title, im) in zip(ax_row, panels, strict=False):
            ax.imshow(im, interpolation="nearest")
            ax.set_title(f"{image_id}: {title}" if title == "image" else title, fontsize=8)
    handles = [
        Patch(facecolor=np.asarray(c) / 255, edgecolor="0.3", label=f"{i} {name}")
        for i, (name, c) in enumerate(zip(manifest.classes, manifest.palette, strict=True))
    ]
    handles.append(
        Patch(facecolor="white", edgecolor="0.3", hatch="xxx", label="255 ignored (grey checks)")
    )
    f.legend(
        handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False
    )
    f.suptitle(
        "worst first; ignored pixels (255: dropped by the filter, or not annotated) are "
        "grey checks",
        fontsize=9,
    )
    f.tight_layout(rect=(0, 0.6 / height, 1, 1 - 0.25 / height))
    return f


def write_evaluation_html(
    out_dir: Path,
    result: dict[str, Any],
    manifest: Manifest,
    cache_path: Path,
    folders: list[Path],
    gallery: int = 12,
) -> Path:
    """report.html of ``calibrate evaluate``: its tables, risk_coverage.png and a gallery of the
    unlabeled images with a true label, worst first by the first folder's error of kept pixels,
    with every folder's pseudo-label side by side."""
    from annotate.cache import open_cache
    from calibrate.evaluate import summary_tables as eval_tables

    cache = open_cache(cache_path)
    names = [f["name"] for f in result["folders"]]
    ids = [r.id for r in manifest.split("unlabeled") if r.label is not None and r.id in cache]
    errors = H.pseudo_errors(folders[0], manifest, H.sample(ids))
    order = H.rank(sorted(errors), {}, errors)
    entries = []
    for image_id in order[:gallery]:
        pseudo = [
            (f"{name}", read_label_png(folder / f"{image_id}.png"))
            for name, folder in zip(names, folders, strict=True)
            if (folder / f"{image_id}.png").is_file()
        ]
        panels, truth = H.image_panels(manifest, cache, image_id, pseudo)
        parts = []
        for name, lab in pseudo:
            k, wrong = H.kept_error(lab, truth) if truth is not None else (0, 0)
            err = f"{100 * wrong / k:.1f} %" if k else "-"
            parts.append(f"{name}: kept {100 * float(np.mean(lab != 255)):.1f} %, error {err}")
        entries.append(H.Entry(image_id, "; ".join(parts), panels))
    sampled = " (ranked among an even sample)" if len(ids) > H.RANK_LIMIT else ""
    gallery_html = H.gallery_section(
        f"{len(entries)} of {len(ids)} unlabeled images with a true label, worst first by the "
        f"error of the kept pixels of {names[0]}{sampled}."
        if entries
        else "no unlabeled image has a true label: no gallery.",
        manifest.classes,
        manifest.palette,
        entries,
    )
    plot = out_dir / "risk_coverage.png"
    plot_html = f'<div class="plots"><img src="{H.file_uri(plot)}" alt="risk-coverage"></div>'
    notes = "".join(f'<p class="note">note: {H.esc(n)}</p>' for n in result["notes"])
    intro = (
        '<p class="note">python -m calibrate evaluate: pseudo-label folders '
        + ", ".join(H.esc(f["path"]) for f in result["folders"])
        + f" against the true labels of manifest {H.esc(result['manifest']['path'])}. The "
        "figures are in evaluation.json beside this file.</p>" + notes
    )
    return H.write_report(
        out_dir / "report.html",
        f"evaluation report: {', '.join(names)}",
        intro,
        eval_tables(result),
        plot_html,
        gallery_html,
        plots_heading="Risk and coverage",
    )
