"""The calibration job: checks, the passes over the cache, the pseudo-label PNGs, the report.

Passes (each a Dask map-reduce over batches of images, see :mod:`calibrate.runner`):

1. labeled images: high-bit counts of the calibration scores (or, in image mode, one score per
   image and α);
2. labeled images: low-bit counts inside the bins that hold the wanted ranks → exact q̂ for every
   α of the grid, both from all labeled images ("all") and from the calibration part ("cal");
3. held-out and val images: report figures;
4. (method "threshold" without a given threshold) unlabeled images, twice: the confidence
   threshold that keeps as many pixels as CP; (method "risk") labeled and val images: the
   per-image risk tables (:mod:`calibrate.risk`); (method "recall") labeled and val images:
   the per-class miss-rate tables (:mod:`calibrate.recall`);
5. unlabeled images: the pseudo-label PNGs.

Nothing is written before passes 1-4 have checked every input. Pass 5 writes the PNGs that
change into a staging folder beside the output folder; only when every label is computed (and
top-k storage left few enough pixels open) is the output folder marked incomplete, updated and
completed by ``calibration.json`` (see :mod:`calibrate.folder`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from annotate.cache import Cache, open_cache
from calibrate import quantile as Q
from calibrate import recall as C
from calibrate import report
from calibrate import risk as R
from calibrate import sets as S
from calibrate.config import CalibrateConfig
from calibrate.folder import (
    check_writable,
    clean,
    commit,
    mark_complete,
    mark_incomplete,
    staging_dir,
    written_ids,
)
from calibrate.merge import merge
from calibrate.rules import Rule
from calibrate.runner import Runner
from calibrate.tasks import (
    Ctx,
    Item,
    calib_high,
    calib_low,
    evaluate,
    labeled_stats,
    unlabeled_counts,
    write_pseudo,
)
from calibrate.topk import Bounds, read_unlabeled
from data_manifest.config import section_dict, write_resolved
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_json
from data_manifest.manifest import Manifest
from data_manifest.ownership import writer_lock

SCHEMA = 2  # 2: PNG digests (pngs), per-image coverage, undetermined top-k pixels


@dataclass
class Plan:
    """Which images each pass reads."""

    cal: list[str]
    held: list[str]
    val: list[str]
    unlabeled: list[str]
    val_note: str = ""


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_inputs(manifest: Manifest, cache: Cache, held_out_fraction: float, seed: int) -> Plan:
    """Check that cache and manifest belong together and that the cache holds every image.

    Raises:
        UserError: class lists or dataset fingerprints differ, no labeled images, images
            missing from the cache.
    """
    mpath, cpath = manifest.path, cache.path
    if list(cache.classes) != list(manifest.classes):
        raise UserError(
            f"{cpath}: classes = {_short(cache.classes)} but manifest {mpath} has "
            f"classes = {_short(manifest.classes)}; expected a cache annotated with "
            "this manifest's class list"
        )
    if cache.meta.manifest_fingerprint != manifest.fingerprint:
        raise UserError(
            f"{cpath}: manifest_fingerprint = {cache.meta.manifest_fingerprint[:16]!r}"
            f" but manifest {mpath} has fingerprint {manifest.fingerprint[:16]!r}; "
            "expected a cache made from this manifest (another dataset or version?)"
        )
    present = set(cache.ids)
    labeled = [r.id for r in manifest.split("labeled")]
    if not labeled:
        raise UserError(
            f"{mpath}: split 'labeled' is empty; expected labeled images to calibrate on"
        )
    if not any(i in present for i in labeled):
        raise UserError(
            f"{cpath}: no labeled images in the cache; expected the {len(labeled)} "
            f"labeled images of {mpath} (run `python -m annotate run`)"
        )
    unlabeled = [r.id for r in manifest.split("unlabeled")]
    for split, ids in (("labeled", labeled), ("unlabeled", unlabeled)):
        miss = [i for i in ids if i not in present]
        if miss:
            raise UserError(
                f"{cpath}: {len(miss)} of {len(ids)} {split} images are missing from "
                f"the cache (first: {miss[0]!r}); expected every labeled and "
                "unlabeled image of the manifest (finish `python -m annotate run`)"
            )
    unlab_rows = [r for r in manifest.rows if r.split == "labeled" and r.label is None]
    if unlab_rows:
        raise UserError(
            f"{mpath}: labeled image {unlab_rows[0].id!r} has label = null; "
            "expected a label file for every labeled image"
        )
    damaged = cache.damaged(labeled + unlabeled)
    if damaged:
        image_id, file, reason = damaged[0]
        raise UserError(
            f"{file}: {reason}; image {image_id!r} of the cache {cpath} is damaged "
            f"({len(damaged)} of the manifest's images are); expected complete image data "
            "(python -m annotate run annotates damaged images again)"
        )
    val_rows = [r for r in manifest.split("val") if r.label is not None]
    val = [r.id for r in val_rows if r.id in present]
    note = ""
    if val and len(val) < len(val_rows):
        note = (
            f"val figures skipped: {len(val_rows) - len(val)} of {len(val_rows)} val "
            "images are not in the cache"
        )
        val = []
    elif not val:
        note = "val figures skipped: the val split is not in the cache"
    ids = sorted(labeled)
    n_held = min(int(np.floor(held_out_fraction * len(ids))), len(ids) - 1)
    perm = np.random.default_rng(seed).permutation(len(ids))
    held = sorted(ids[i] for i in perm[:n_held])
    held_set = set(held)
    cal = [i for i in ids if i not in held_set]
    return Plan(cal=cal, held=held, val=sorted(val), unlabeled=sorted(unlabeled), val_note=note)


def _batches(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_pass(
    runner: Runner, fn: Any, items: list[Item], size: int, desc: str, **kwargs: Any
) -> Any:
    bs = _batches(items, size)
    return runner.map_reduce(fn, bs, desc, unit_per_batch=[len(b) for b in bs], **kwargs) or {}


def solve_qhats(
    res1: dict, low: dict, targets_locs: dict, ctx: Ctx, conf: CalibrateConfig, has_held: bool
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """q̂ per subset ("all", "cal"), α of the grid and class from the two passes' counts.

    Returns:
        ``{subset: float32 (len(grid), K)}`` and ``{subset: {"pooled": float32 (len(grid),),
        "class": float32 (len(grid), K) or None, "n_class": int64 (K,), "own": bool (K,)}}``.
    """
    k, grid = ctx.num_classes, ctx.alphas
    out, info = {}, {}
    for subset in ("all", "cal") if has_held else ("all",):
        roles = ("cal", "held") if subset == "all" else ("cal",)
        n_class = sum((res1[r]["n_class"] for r in roles if r in res1), np.zeros(k, np.int64))
        q = np.ones((len(grid), k), np.float32)
        pooled = np.ones(len(grid), np.float32)
        own = np.ones(k, bool)
        cls = None
        if ctx.mode == "image":
            scores = [s for r in roles for _, s in res1.get(r, {}).get("img_scores", [])]
            arr = np.stack(scores) if scores else np.zeros((0, len(grid)), np.float32)
            for a, alpha in enumerate(grid):
                pooled[a] = Q.small_quantile(arr[:, a], alpha)
            q[:] = pooled[:, None]
        else:
            for a in range(len(grid)):
                pooled[a] = _value(low, targets_locs, subset, "pooled", 0, a)
            q[:] = pooled[:, None]
            if ctx.mode == "class":
                cls = np.ones((len(grid), k), np.float32)
                for a in range(len(grid)):
                    for c in range(k):
                        cls[a, c] = _value(low, targets_locs, subset, "class", c, a)
                own = n_class >= conf.class_min_pixels
                q = np.where(own[None, :], cls, pooled[:, None]).astype(np.float32)
        out[subset] = q
        info[subset] = {"pooled": pooled, "class": cls, "n_class": n_class, "own": own}
    return out, info


def _value(low: dict, locs: dict, subset: str, kind: str, group: int, a: int) -> np.float32:
    loc, targets = locs[(subset, kind, group, a)], locs[(subset, kind)]
    if loc is None:
        return np.float32(1.0)
    return Q.finish(low.get((subset, kind), Q.Counts.empty()), targets, *loc)


def plan_targets(res1: dict, ctx: Ctx, has_held: bool) -> dict:
    """Locate every wanted rank in the pass-1 counts: ``{(subset, kind, group, a): loc}`` plus
    ``{(subset, kind): sorted uint64 target bins}``."""
    locs: dict = {}
    if ctx.mode == "image":
        return locs
    kinds = ("pooled", "class") if ctx.mode == "class" else ("pooled",)
    for subset in ("all", "cal") if has_held else ("all",):
        roles = ("cal", "held") if subset == "all" else ("cal",)
        for kind in kinds:
            counts = Q.Counts.empty()
            for r in roles:
                counts = counts + res1.get(r, {}).get(kind, Q.Counts.empty())
            groups = range(ctx.num_classes) if kind == "class" else (0,)
            bins = set()
            for g in groups:
                n = Q.group_total(counts, g)
                for a, alpha in enumerate(ctx.alphas):
                    loc = Q.locate(counts, g, Q.conformal_rank(n, alpha)) if n else None
                    locs[(subset, kind, g, a)] = loc
                    if loc is not None:
                        bins.add(loc[0])
            locs[(subset, kind)] = np.array(sorted(bins), dtype=np.uint64)
    return locs


def matched_threshold(
    runner: Runner, items: list[Item], ctx: Ctx, qhat: np.ndarray, batch: int
) -> tuple[float, int, int]:
    """The confidence threshold τ keeping as many unlabeled pixels as CP, exactly.

    τ is the (N − N_cp + 1)-th smallest max-probability over the N unlabeled pixels, so the
    N_cp most confident pixels have max p ≥ τ (pixels tied at τ are all kept).

    Returns:
        (τ, N_cp, N).
    """
    r1 = _run_pass(
        runner, unlabeled_counts, items, batch, "threshold 1/2", ctx=ctx, qhat=qhat, targets=None
    )
    n_cp, n = r1.get("kept", 0), r1.get("pixels", 0)
    if n_cp == 0:
        return float(np.nextafter(np.float32(1.0), np.float32(2.0))), 0, n
    loc = Q.locate(r1["high"], 0, n - n_cp + 1)
    targets = np.array([loc[0]], np.uint64)
    r2 = _run_pass(
        runner, unlabeled_counts, items, batch, "threshold 2/2", ctx=ctx, qhat=qhat, targets=targets
    )
    return float(Q.finish(r2.get("low", Q.Counts.empty()), targets, *loc)), n_cp, n


def background_index(manifest: Manifest, conf: CalibrateConfig) -> int | None:
    """The class the foreground preference applies to, or None when the rule is off."""
    bg = manifest.meta.background_index
    if conf.background_rule == "most_probable":
        return None
    if conf.background_rule == "prefer_foreground" and bg is None:
        raise UserError(
            f"{manifest.path}: meta.background_index is null; background_rule = "
            "'prefer_foreground' expects a dataset with a background class"
        )
    return bg


def check_topk(cache: Cache, plan: Plan, conf: CalibrateConfig) -> bool:
    """Refuse, before any pass, a score that top-k entries of this cache cannot give exactly.

    APS on top-k entries stored at another resolution than the image's needs a ranking that
    the stored classes do not give (see :mod:`calibrate.topk`). The first unlabeled image
    stands for the cache (one annotator, one output resolution); each task checks its own.

    Returns:
        Whether unlabeled images are top-k entries stored at another resolution.
    """
    if cache.meta.topk <= 0 or not plan.unlabeled:
        return False
    resized = isinstance(read_unlabeled(cache, plan.unlabeled[0]), Bounds)
    if resized and conf.method == "recall":
        raise UserError(
            f"{cache.path}: image {plan.unlabeled[0]!r} is stored as top-k at a resolution "
            "other than the image's, so method 'recall' cannot rank its classes exactly; "
            "expected a cache annotated with resolution = 'image' or topk = 0"
        )
    needs_cp = conf.method == "cp" or (conf.method == "threshold" and conf.threshold is None)
    if resized and conf.score == "aps" and needs_cp:
        raise UserError(
            f"{cache.path}: image {plan.unlabeled[0]!r} is stored as top-k at a resolution "
            "other than the image's, so score 'aps' cannot be computed exactly; expected "
            "score 'lac', or a cache annotated with resolution = 'image' or topk = 0"
        )
    return resized


def refuse_undetermined(
    rows: list[tuple], conf: CalibrateConfig, cache: Cache, resized: bool
) -> None:
    """Refuse (before the folder is touched) when top-k storage leaves too many pixels open."""
    n, total = sum(r[4] for r in rows), sum(r[2] for r in rows)
    if total and n / total > conf.topk_undetermined_max:
        where = " at a resolution other than the image's" if resized else ""
        fix = "--resolution image, a larger --topk" if resized else "a larger --topk"
        raise UserError(
            f"{cache.path}: {100 * n / total:.2f} % of the unlabeled pixels ({n} of {total}) "
            f"cannot be labeled exactly from the top {cache.meta.topk} classes stored per "
            f"pixel{where} (mode {conf.mode!r}, score {conf.score!r}, max_set_size "
            f"{conf.max_set_size}); expected at most {100 * conf.topk_undetermined_max:g} % "
            f"(topk_undetermined_max): annotate the unlabeled images with {fix} (or "
            "--topk 0 for full scores), or raise topk_undetermined_max to write them as 255"
        )


def run(
    manifest: Manifest,
    conf: CalibrateConfig,
    cache_path: Path,
    out_dir: Path,
    seed: int,
    resolved: dict[str, Any],
    show_progress: bool = True,
    option: str = "out_dir",
) -> dict[str, Any]:
    """Run the whole calibration; returns ``{"figures": content of calibration.json,
    "rewritten", "removed_temporaries", "removed_orphans", "timings", "workers"}``.

    Every path is resolved here, before any task is sent, so that workers with another
    working directory (a remote Dask cluster) read and write the same files. The output
    folder's lock is held from the first check of the folder to the last write.

    Args:
        resolved: the resolved run config, written to ``out_dir/config.toml``.
        option: where ``out_dir`` came from (``--out-dir``), for messages.
    Raises:
        UserError: bad inputs, a folder calibrate may not write into, or another run
            writing the same folder.
    """
    t0 = time.perf_counter()
    cache_path, out_dir = Path(cache_path).resolve(), Path(out_dir).resolve()
    cache = open_cache(cache_path)
    plan = check_inputs(manifest, cache, conf.held_out_fraction, seed)
    bg = background_index(manifest, conf)
    check_writable(out_dir, option)
    with writer_lock(out_dir):
        check_writable(out_dir, option)  # again: another run may have written it meanwhile
        return _run(manifest, conf, cache, plan, bg, out_dir, seed, resolved, show_progress, t0)


def _run(
    manifest: Manifest,
    conf: CalibrateConfig,
    cache: Cache,
    plan: Plan,
    bg: int | None,
    out_dir: Path,
    seed: int,
    resolved: dict[str, Any],
    show_progress: bool,
    t0: float,
) -> dict[str, Any]:
    """:func:`run` past the checks, under the folder's lock."""
    resized = check_topk(cache, plan, conf)
    grid = tuple(sorted(set(conf.alphas) | {conf.alpha}))
    ia = grid.index(conf.alpha)
    ctx = Ctx(
        cache=str(cache.path),
        num_classes=manifest.num_classes,
        score=conf.score,
        mode=conf.mode,
        reduce_zero_label=manifest.meta.reduce_zero_label,
        background=bg,
        alphas=grid,
        main=ia,
        max_set_size=conf.max_set_size,
    )
    label_of = {  # absolute (not resolved: a link loop is reported when it is read)
        r.id: os.path.abspath(manifest.label_path(r)) if r.label else None for r in manifest.rows
    }
    timings: dict[str, float] = {}
    with Runner(conf.scheduler, conf.workers, show_progress, ("calibrate.tasks",)) as runner:
        qmat, qinfo, n_pixels = _calibrate(runner, plan, label_of, ctx, conf, manifest, timings)
        t = time.perf_counter()
        ev = _report_pass(runner, plan, label_of, ctx, conf, qmat)
        timings["report_s"] = time.perf_counter() - t
        qhat = qmat["all"][ia]
        u_items = [Item(i, None, "unlabeled") for i in plan.unlabeled]
        tau, n_cp, risk_fig = None, None, None
        t = time.perf_counter()
        if conf.method == "threshold":
            if conf.threshold is not None:
                tau = float(conf.threshold)
            else:
                tau, n_cp, _ = matched_threshold(runner, u_items, ctx, qhat, conf.batch)
        timings["threshold_s"] = time.perf_counter() - t
        quantize = 0 < cache.meta.topk < cache.num_classes
        if conf.method in ("risk", "recall"):
            t = time.perf_counter()
            stats = _labeled_pass(runner, plan, label_of, ctx, conf, quantize)
            if conf.method == "risk":
                risk_fig = risk_figures(stats, conf, bool(plan.held))
                tau = risk_fig["tau"]
            else:
                # the paper's threshold, for classes too rare in the labeled images to certify
                fallback = {k: float(1 - np.float32(v["pooled"][ia])) for k, v in qinfo.items()}
                classes = list(manifest.classes)
                risk_fig = recall_figures(stats, conf, classes, ctx.background, fallback)
            timings[f"{conf.method}_s"] = time.perf_counter() - t
        rules = make_rules(conf, ctx, qmat, ia, tau, risk_fig, quantize)
        png_rule = rules["pngs"]

        # PNGs that differ from those in out_dir go to a staging folder first: nothing in
        # out_dir changes until every label is computed and checked
        stage = staging_dir(out_dir)
        shutil.rmtree(stage, ignore_errors=True)
        t = time.perf_counter()
        thresholds = None
        if png_rule is not None and png_rule.thresholds is not None:
            thresholds = np.asarray(png_rule.thresholds, np.float32)
        try:
            wr = _run_pass(
                runner,
                write_pseudo,
                u_items,
                conf.batch,
                f"write {conf.method}",
                ctx=ctx,
                method=conf.method,
                qhat=qhat,
                tau=tau,
                out_dir=str(out_dir),
                stage_dir=str(stage),
                palette=manifest.palette,
                thresholds=thresholds,
            )
        except Exception:  # a refused run (a damaged image, ...) leaves nothing behind
            shutil.rmtree(stage, ignore_errors=True)
            raise
        timings["write_s"] = time.perf_counter() - t
        workers = runner.n_workers
    rows = sorted(wr.get("images", []))
    out = Outcome(qinfo, grid, ia, bg, n_pixels, ev, rows, tau, n_cp, rules, risk_fig)
    try:
        refuse_undetermined(out.rows, conf, cache, resized)
    except UserError:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    figures = _figures(manifest, cache, conf, plan, seed, out)
    result = {
        "rewritten": sum(1 for r in out.rows if r[3]),
        "removed_temporaries": 0,
        "removed_orphans": 0,
        "timings": timings,
        "workers": workers,
    }
    _commit(out_dir, stage, plan, out.rows, resolved, result, t0)
    report.write_all(out_dir, figures, out.rows, manifest, cache, conf)
    mark_complete(out_dir)
    timings["total_s"] = time.perf_counter() - t0
    return {"figures": figures, **result}


@dataclass
class Outcome:
    """What the passes found, for the report."""

    qinfo: dict[str, dict[str, Any]]
    grid: tuple[float, ...]
    ia: int
    background: int | None
    n_pixels: int
    ev: dict
    rows: list[tuple]  # (id, kept, pixels, staged, undetermined, sha256) per unlabeled image
    tau: float | None
    n_cp: int | None
    rules: dict[str, Rule | None]
    risk: dict[str, Any] | None  # method risk or recall: its figures


def _commit(
    out_dir: Path,
    stage: Path,
    plan: Plan,
    rows: list[tuple],
    resolved: dict[str, Any],
    result: dict[str, Any],
    t0: float,
) -> None:
    """Mark the folder incomplete, clean it, move the staged PNGs in, write config and log
    (see :mod:`calibrate.folder`); the caller writes the report and removes the marker."""
    t = time.perf_counter()
    previous = written_ids(out_dir)
    mark_incomplete(out_dir, plan.unlabeled)
    result["removed_temporaries"], result["removed_orphans"] = clean(
        out_dir, plan.unlabeled, previous
    )
    commit(stage, out_dir, [r[0] for r in rows if r[3]])
    write_resolved(out_dir / "config.toml", resolved)
    result["timings"]["commit_s"] = time.perf_counter() - t
    result["timings"]["total_s"] = time.perf_counter() - t0
    log = {k: _rounded(v) for k, v in result.items()}
    atomic_write_json(out_dir / "run.json", log)


def _rounded(v: Any) -> Any:
    return {k: round(x, 3) for k, x in v.items()} if isinstance(v, dict) else v


def _calibrate(
    runner: Runner,
    plan: Plan,
    label_of: dict[str, str | None],
    ctx: Ctx,
    conf: CalibrateConfig,
    manifest: Manifest,
    timings: dict[str, float],
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], int]:
    """Passes 1 and 2 over the labeled images: q̂ for every subset, α and class."""
    items_l = [Item(i, label_of[i], "cal") for i in plan.cal] + [
        Item(i, label_of[i], "held") for i in plan.held
    ]
    items_l.sort(key=lambda it: it.id)
    has_held = bool(plan.held)
    t = time.perf_counter()
    res1 = _run_pass(runner, calib_high, items_l, conf.batch, "calibrate 1/2", ctx=ctx)
    timings["pass1_s"] = time.perf_counter() - t
    n_pixels = int(sum(res1[r]["n_class"].sum() for r in ("cal", "held") if r in res1))
    if n_pixels == 0:
        raise UserError(
            f"{manifest.path}: every pixel of the labeled images is 255 "
            "(ignore); expected labeled pixels to calibrate on"
        )
    locs = plan_targets(res1, ctx, has_held)
    targets = {k: v for k, v in locs.items() if len(k) == 2}
    t = time.perf_counter()
    low = {}
    if targets:
        low = _run_pass(
            runner, calib_low, items_l, conf.batch, "calibrate 2/2", ctx=ctx, targets=targets
        )
    timings["pass2_s"] = time.perf_counter() - t
    qmat, qinfo = solve_qhats(res1, low, locs, ctx, conf, has_held)
    return qmat, qinfo, n_pixels


def _report_pass(
    runner: Runner,
    plan: Plan,
    label_of: dict[str, str | None],
    ctx: Ctx,
    conf: CalibrateConfig,
    qmat: dict[str, np.ndarray],
) -> dict:
    """Pass 3: held-out images against the calibration part's q̂, val against all's."""
    items = [Item(i, label_of[i], "held") for i in plan.held]
    items += [Item(i, label_of[i], "val") for i in plan.val]
    qhats = {"held": qmat.get("cal"), "val": qmat["all"]}
    qhats = {k: v for k, v in qhats.items() if v is not None}
    return _run_pass(runner, evaluate, items, conf.batch, "report", ctx=ctx, qhats=qhats)


def _labeled_pass(
    runner: Runner,
    plan: Plan,
    label_of: dict[str, str | None],
    ctx: Ctx,
    conf: CalibrateConfig,
    quantize: bool,
) -> dict:
    """Methods risk and recall: their per-image tables of the labeled and val images, summed
    by role."""
    items = [Item(i, label_of[i], "cal") for i in plan.cal]
    items += [Item(i, label_of[i], "held") for i in plan.held]
    items.sort(key=lambda it: it.id)
    items += [Item(i, label_of[i], "val") for i in plan.val]
    return _run_pass(
        runner,
        labeled_stats,
        items,
        conf.batch,
        conf.method,
        ctx=ctx,
        method=conf.method,
        quantize=quantize,
    )


def _figures(
    manifest: Manifest, cache: Cache, conf: CalibrateConfig, plan: Plan, seed: int, out: Outcome
) -> dict[str, Any]:
    """The content of calibration.json (no timings: equal inputs give equal bytes)."""
    has_held = bool(plan.held)
    qinfo, ia, grid, rows = out.qinfo, out.ia, out.grid, out.rows
    n_unl = sum(r[2] for r in rows)
    n_unsure = sum(r[4] for r in rows)
    return {
        "schema": SCHEMA,
        "alpha": conf.alpha,
        "mode": conf.mode,
        "score": conf.score,
        "method": conf.method,
        "background_index": out.background,
        "background_rule": conf.background_rule,
        "max_set_size": conf.max_set_size,
        "classes": list(manifest.classes),
        "qhat": report.qhat_json(qinfo["all"], ia, conf, manifest.classes),
        "rule": {k: (v.to_json() if v is not None else None) for k, v in out.rules.items()},
        "risk": out.risk if conf.method == "risk" else None,
        "recall": out.risk if conf.method == "recall" else None,
        "qhat_used_by_pngs": report.PNG_RULE.get(conf.method, "q̂ from all labeled images"),
        "calibration": {
            "images": len(plan.cal) + len(plan.held),
            "pixels": out.n_pixels,
            "pixels_per_class": dict(
                zip(manifest.classes, (int(v) for v in qinfo["all"]["n_class"]), strict=True)
            ),
        },
        "held_out": report.figures(
            out.ev.get("held"),
            grid,
            ia,
            manifest.classes,
            extra={
                "fraction": conf.held_out_fraction,
                "seed": seed,
                "qhat_from": f"the other {len(plan.cal)} labeled images (calibration part)",
                "qhat": report.qhat_json(qinfo["cal"], ia, conf, manifest.classes)
                if has_held
                else None,
            },
        ),
        "val": report.figures(
            out.ev.get("val"),
            grid,
            ia,
            manifest.classes,
            extra={"qhat_from": "all labeled images (the q̂ the PNGs use)"},
        ),
        "val_note": plan.val_note,
        "unlabeled": {
            "images": len(rows),
            "pixels": int(n_unl),
            "kept_pixels": int(sum(r[1] for r in rows)),
            "kept_fraction": report.ratio(sum(r[1] for r in rows), n_unl),
            "undetermined_pixels": int(n_unsure),
            "undetermined_fraction": report.ratio(n_unsure, n_unl),
            "topk": cache.meta.topk,
            "threshold": out.tau,
            "threshold_matched_to_cp_kept_pixels": out.n_cp,
        },
        "cache": {
            "path": str(cache.path),
            "annotator": cache.meta.annotator,
            "model_sha256": cache.meta.model_sha256,
        },
        "manifest": {
            "path": str(Path(manifest.path).resolve()),
            "fingerprint": manifest.fingerprint,
        },
        "pngs": {r[0]: r[5] for r in rows},
    }


def risk_figures(stats: dict, conf: CalibrateConfig, has_held: bool) -> dict[str, Any]:
    """Method "risk": τ̂ from all labeled images (the PNGs) and from the calibration part (the
    held-out figures), with what certifies them and how they do on held-out and val images."""
    tau = R.tau_grid()
    every = merge(stats.get("cal"), stats.get("held"))
    if not every or not every["images"]:
        raise UserError("method risk: no labeled image has a labeled pixel to calibrate on")
    pick = {"all": every, "cal": stats.get("cal") if has_held else None}
    sel = {
        k: R.select(
            v["loss"], v["envelope"], v["images"], tau, conf.risk, conf.risk_control, conf.delta
        )
        for k, v in pick.items()
        if v
    }
    out = {
        "epsilon": conf.risk,
        "control": conf.risk_control,
        "delta": conf.delta if conf.risk_control == "ltt" else None,
        "loss": "per-image error of the kept pixels: wrong_i(tau) / kept_i(tau), 0 if none kept",
        "guarantee": R.GUARANTEE[conf.risk_control],
        "tau": sel["all"].tau,
        "keeps_nothing": sel["all"].index < 0,
        "selection": sel["all"].to_json(),
        "calibration": R.at(every, sel["all"].index),
        "held_out": None,
        "val": R.at(stats.get("val"), sel["all"].index) if stats.get("val") else None,
    }
    if "cal" in sel:
        out["held_out"] = {
            "tau": sel["cal"].tau,
            "selection": sel["cal"].to_json(),
            **R.at(stats.get("held"), sel["cal"].index),
        }
    return out


def recall_figures(
    stats: dict,
    conf: CalibrateConfig,
    classes: list[str],
    background: int | None,
    fallback: dict[str, float],
) -> dict[str, Any]:
    """Method "recall": per-class thresholds from all labeled images (the PNGs) and from the
    calibration part (the held-out figures), what certifies them, and per class the mean miss
    rate, recall and precision on held-out and val images.

    Args:
        fallback: the threshold of classes that cannot be certified, from all labeled images
            ("all") and from the calibration part ("cal"): the paper's 1 − q̂ of each.
    """
    grid = C.class_grid()
    every = merge(stats.get("cal"), stats.get("held"))
    if not every or not every["images"]:
        raise UserError("method recall: no labeled image has a labeled pixel to calibrate on")
    sel = C.select(every, grid, conf.miss, classes, background, fallback["all"])
    out: dict[str, Any] = {
        "epsilon": conf.miss,
        "loss": "per image and class c present in it: 1 - (pixels of c labeled c) / (pixels of c)",
        "guarantee": C.GUARANTEE,
        "background_index": background,
        "thresholds": C.thresholds(sel, classes),
        "fallback": fallback["all"],
        "certified": [s.cls for s in sel if s.certified],
        "not_certified": [s.cls for s in sel if not s.certified],
        "selection": [s.to_json() for s in sel],
        "held_out": None,
        "val": C.at(stats.get("val"), sel, classes) if stats.get("val") else None,
    }
    if "cal" in fallback and stats.get("cal"):
        held_sel = C.select(stats["cal"], grid, conf.miss, classes, background, fallback["cal"])
        out["held_out"] = {
            "thresholds": C.thresholds(held_sel, classes),
            "certified": [s.cls for s in held_sel if s.certified],
            "selection": [s.to_json() for s in held_sel],
            "figures": C.at(stats.get("held"), held_sel, classes),
        }
    return out


def make_rules(
    conf: CalibrateConfig,
    ctx: Ctx,
    qmat: dict[str, np.ndarray],
    ia: int,
    tau: float | None,
    risk_fig: dict[str, Any] | None,
    quantize: bool,
) -> dict[str, Rule | None]:
    """The rule of the PNGs ("pngs") and the rule calibrated without the held-out images
    ("held_out", None without a held-out split), as recorded in calibration.json."""
    out: dict[str, Rule | None] = {}
    for key, subset in (("pngs", "all"), ("held_out", "cal")):
        if subset not in qmat:
            out[key] = None
            continue
        if conf.method == "raw":
            out[key] = Rule("raw")
        elif conf.method == "threshold":
            out[key] = Rule("threshold", tau=tau)
        elif conf.method == "risk":
            t = risk_fig["tau"] if key == "pngs" else risk_fig["held_out"]["tau"]
            out[key] = Rule("risk", tau=t, quantize=quantize)
        elif conf.method == "recall":
            part = risk_fig if key == "pngs" else risk_fig["held_out"]
            out[key] = (
                None
                if part is None
                else Rule(
                    "recall",
                    background=ctx.background,
                    quantize=quantize,
                    thresholds=tuple(part["thresholds"]),
                )
            )
        else:
            q = qmat[subset][ia]
            fg = S.informative(q, ctx.mode)
            out[key] = Rule(
                "cp",
                score=conf.score,
                qhat=tuple(float(v) for v in q),
                background=ctx.background,
                max_set_size=conf.max_set_size,
                informative=None if fg is None else tuple(bool(v) for v in fg),
            )
    return out


def with_defaults(conf: CalibrateConfig, cfg: dict[str, Any], run_dir: Path) -> CalibrateConfig:
    """Fill in the cache path and output folder from the run config."""
    cache = conf.cache or cfg.get("annotate", {}).get("cache") or str(run_dir / "cache.zarr")
    out = conf.out_dir or str(run_dir / "pseudo" / conf.method)
    return replace(conf, cache=cache, out_dir=out)


def resolved_config(
    cfg: dict[str, Any], conf: CalibrateConfig, run_dir: Path, seed: int, manifest_path: Path
) -> dict[str, Any]:
    """The resolved run config written beside the outputs."""
    return {
        "run_dir": str(run_dir),
        "seed": seed,
        "data": {"manifest": str(manifest_path)},
        "calibrate": section_dict(conf),
    }


__all__ = ["Plan", "check_inputs", "merge", "run", "with_defaults", "resolved_config"]
