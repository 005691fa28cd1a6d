"""``python -m calibrate evaluate``: pseudo-label folders side by side against true labels.

Three image sets, each where it exists:

- ``unlabeled``: the unlabeled rows whose manifest row has a label (benchmarks such as the demo
  or VOC's SBD images have one): each folder's PNGs against it;
- ``held_out``: the labeled images a folder's calibration held out; its rule is re-applied to
  them with the parameters calibrated *without* them (recorded in its calibration.json);
- ``val``: the val images in the cache; the rule that wrote the PNGs, re-applied.

For every folder and set: kept fraction, accuracy of kept pixels, per-class precision (over kept
pixels) and recall (over all labeled pixels, so dropped pixels count as missed), the mean over
images of each class's per-image recall (over the images that contain it: what method "recall"
certifies), and mIoU over kept pixels (dropped pixels excluded, as the trainer ignores
them). For every set, the annotator's risk-coverage curve: kept fraction and error of kept
pixels of its argmax as a confidence threshold on max p moves over
:func:`calibrate.risk.tau_grid`. One Dask pass; every task returns integer count tables that
add up in a tree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annotate.cache import Cache, open_cache
from calibrate import recall as C
from calibrate import risk as R
from calibrate import topk as T
from calibrate.folder import check_pseudo_folder, refuse_changed, refuse_incomplete, state
from calibrate.job import check_inputs
from calibrate.merge import merge
from calibrate.rules import Rule, label_image
from calibrate.runner import Runner
from calibrate.tasks import Item, _cache, load
from data_manifest.errors import UserError
from data_manifest.io import atomic_path, atomic_write_json, read_label_png
from data_manifest.manifest import IGNORE_INDEX, Manifest, id_path, reduce_zero_label
from data_manifest.ownership import claim, holding

SCHEMA = 1
SETS = ("unlabeled", "held_out", "val")
OWNER = "calibrate evaluate"


def written_by_evaluate(folder: Path) -> bool:
    """An unmarked folder that an earlier version of ``calibrate evaluate`` wrote: exactly its
    files (with or without report.html)."""
    files = ("evaluation.json", "risk_coverage.png")
    return holding(*files)(folder) or holding(*files, "report.html")(folder)


@dataclass(frozen=True)
class Folder:
    """One pseudo-label folder under evaluation.

    Attributes:
        name: its column name; path: the folder.
        rule: the rule that wrote its PNGs (None: its calibration.json predates rule records).
        held_rule: the rule calibrated without its held-out images (None: no held-out split).
        held: ids of its held-out labeled images.
        report: its calibration.json.
    """

    name: str
    path: str
    rule: Rule | None
    held_rule: Rule | None
    held: frozenset[str]
    report: dict[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class EvalCtx:
    """What every task of the pass needs (duck-types :class:`calibrate.tasks.Ctx` for load)."""

    cache: str
    num_classes: int
    reduce_zero_label: bool
    quantize: bool
    folders: tuple[Folder, ...]


def read_report(path: Path) -> dict[str, Any]:
    """A folder's calibration.json, checked for the fields evaluate reads.

    Raises:
        UserError: not an output folder of ``calibrate run``, one a run has not finished, or
            an unreadable report.
    """
    refuse_incomplete(path)
    rep_path = path / "calibration.json"
    if not rep_path.is_file():
        raise UserError(
            f"{path}: not a pseudo-label folder (no calibration.json); expected an output "
            "folder of `python -m calibrate run`"
        )
    try:
        rep = json.loads(rep_path.read_text())
        for key in ("manifest", "cache"):
            if not isinstance(rep[key]["path"], str):
                raise TypeError(f"{key}.path is not a string")
        rep["manifest"]["fingerprint"].lower()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{rep_path}: unreadable calibration report ({exc}); expected the "
            "calibration.json of `python -m calibrate run`"
        ) from None
    return rep


def check_manifest(path: Path, manifest: Manifest) -> dict[str, Any]:
    """A folder's calibration.json, after the check every reader of a pseudo-label folder
    applies (:func:`calibrate.folder.check_pseudo_folder`: finished, made from ``manifest``,
    PNGs as recorded).

    Raises:
        UserError: not a calibrate output, unfinished, made from another manifest, or changed.
    """
    check_pseudo_folder(path, manifest, verify=True, need_report=True)
    return read_report(path)


def read_folder(path: Path, manifest: Manifest, cache: Cache) -> Folder:
    """Check a pseudo-label folder against the manifest and the cache.

    Raises:
        UserError: not a calibrate output, another manifest, another annotator.
    """
    rep_path = path / "calibration.json"
    rep = check_manifest(path, manifest)
    sha = rep.get("cache", {}).get("model_sha256")
    if sha is not None and sha != cache.meta.model_sha256:
        raise UserError(
            f"{rep_path}: made from annotator model_sha256 {sha[:16]!r} but cache "
            f"{cache.path} holds {cache.meta.model_sha256[:16]!r}; expected the cache the "
            "pseudo-labels came from (--cache)"
        )
    rules = rep.get("rule") or {}
    rule = Rule.from_json(rules["pngs"]) if rules.get("pngs") else None
    held_rule = Rule.from_json(rules["held_out"]) if rules.get("held_out") else None
    held: frozenset[str] = frozenset()
    ho = rep.get("held_out") or {}
    if held_rule is not None and ho.get("fraction"):
        plan = check_inputs(manifest, cache, float(ho["fraction"]), int(ho["seed"]))
        held = frozenset(plan.held)
    # resolved: tasks may run on other machines (a Dask cluster sharing the file system)
    return Folder(path.name, str(path.resolve()), rule, held_rule, held, rep)


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """int64 (K, K+1): rows the true class, columns the pseudo-label (column K: dropped).

    Pixels whose true label is 255 are left out.
    """
    valid = truth != IGNORE_INDEX
    t = truth[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    p = np.where(p == IGNORE_INDEX, k, p)
    return np.bincount(t * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)


def image_recall(m: np.ndarray) -> dict[str, np.ndarray]:
    """Per class, from one image's confusion table (K, K+1): whether the image contains it and
    its recall in fixed point (:data:`calibrate.risk.SCALE`, rounded up; 0 where absent), so
    that sums over images are exact integers in any order. int64 (K,) each."""
    n = m.sum(axis=1)
    return {"image_present": (n > 0).astype(np.int64), "image_recall": R.fixed_ratio(np.diag(m), n)}


def reachable_miss(truth: np.ndarray, pred: np.ndarray, f: np.ndarray, k: int) -> dict:
    """Method recall's certified quantity on one image: per class c, whether the image has
    reachable pixels of c (true class c, most probable foreground class c) and the fraction
    of them not labeled c, in fixed point (rounded up). int64 (K,) each."""
    valid = truth != IGNORE_INDEX
    reach = valid & (f == truth)
    r = np.bincount(truth[reach], minlength=k)[:k].astype(np.int64)
    tp = np.bincount(truth[reach & (pred == truth)], minlength=k)[:k].astype(np.int64)
    return {"reach_present": (r > 0).astype(np.int64), "reach_miss": R.fixed_ratio(r - tp, r)}


def _read_pseudo(folder: Folder, image_id: str, shape: tuple[int, ...], k: int) -> np.ndarray:
    path = id_path(folder.path, image_id)
    if not path.is_file():
        raise UserError(
            f"{path}: pseudo-label missing; expected one PNG per unlabeled image "
            "(finish `python -m calibrate run`)"
        )
    lab = read_label_png(path)
    if lab.shape != shape:
        raise UserError(
            f"{path}: pseudo-label is {lab.shape[0]}x{lab.shape[1]} but the image is "
            f"{shape[0]}x{shape[1]}; expected the image's size"
        )
    bad = (lab >= k) & (lab != IGNORE_INDEX)
    if bad.any():
        raise UserError(
            f"{path}: value {int(lab[bad][0])} is not a class id; expected 0..{k - 1} or 255"
        )
    return lab


def read_truth(it: Item, ctx: EvalCtx, shape: tuple[int, ...]) -> np.ndarray:
    """The true labels of an unlabeled row that has them, checked like a labeled image's."""
    lab = read_label_png(it.label)
    if ctx.reduce_zero_label:
        lab = reduce_zero_label(lab)
    if lab.shape != tuple(shape):
        raise UserError(
            f"{it.label}: label is {lab.shape[0]}x{lab.shape[1]} but the cache holds image "
            f"{it.id!r} at {shape[0]}x{shape[1]}; expected the same size"
        )
    bad = (lab >= ctx.num_classes) & (lab != IGNORE_INDEX)
    if bad.any():
        raise UserError(
            f"{it.label}: label value {int(lab[bad][0])} is outside the classes; expected "
            f"class ids 0..{ctx.num_classes - 1} or {IGNORE_INDEX} (ignore)"
        )
    return lab


def count_batch(batch: list[Item], ctx: EvalCtx) -> dict:
    """The pass: per image set, the annotator's curve counts and every folder's confusion.

    Returns ``{role: {"images", "pixels", "curve_kept" (G,), "curve_wrong" (G,), "argmax"
    (K, K+1), "folders": {name: {"images", "confusion" (K, K+1)}}}}``; role is "unlabeled",
    "held_out" or "val".
    """
    cache = _cache(ctx.cache)
    tau = R.tau_grid()
    k = ctx.num_classes
    out: dict = {}
    for it in batch:
        if it.role == "unlabeled":  # may be a top-k entry: its labels are read separately
            probs, _ = load(cache, Item(it.id, None, it.role), ctx)  # type: ignore[arg-type]
            truth = read_truth(it, ctx, probs.shape[1:])
        else:
            probs, truth = load(cache, it, ctx)  # type: ignore[arg-type]
        valid = truth != IGNORE_INDEX
        idx, conf = R.confidence(probs, ctx.quantize)
        kept, wrong = R.image_counts(conf[valid], idx[valid] != truth[valid], tau)
        r: dict = {
            "images": 1,
            "pixels": int(valid.sum()),
            "curve_kept": kept,
            "curve_wrong": wrong,
            "argmax": confusion(truth, idx, k),
            "folders": {},
        }
        for f in ctx.folders:
            if it.role == "unlabeled":
                pred = _read_pseudo(f, it.id, truth.shape, k)
            elif it.role == "held_out" and f.held_rule is not None and it.id in f.held:
                pred = label_image(probs, f.held_rule)
            elif it.role == "val" and f.rule is not None:
                pred = label_image(probs, f.rule)
            else:
                continue
            cm = confusion(truth, pred, k)
            r["folders"][f.name] = {"images": 1, "confusion": cm, **image_recall(cm)}
            if f.rule is not None and f.rule.method == "recall":
                x = T.read_unlabeled(cache, it.id) if it.role == "unlabeled" else probs
                fg = C.top_foreground(x, f.rule.background)[0]
                r["folders"][f.name].update(reachable_miss(truth, pred, fg, k))
        out = merge(out, {it.role: r})
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(float(a) / float(b), 6) if b else None


def quality(
    m: np.ndarray, classes: list[str], per_image: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Figures of one confusion table (K, K+1) (see :func:`confusion`), and with the summed
    :func:`image_recall` of its images each class's mean per-image recall."""
    k = len(classes)
    kept_m = m[:, :k]
    tp = np.diag(kept_m)
    pixels, kept, correct = int(m.sum()), int(kept_m.sum()), int(tp.sum())
    pred_c, true_c = kept_m.sum(axis=0), m.sum(axis=1)
    union = pred_c + kept_m.sum(axis=1) - tp
    ious = [tp[c] / union[c] for c in range(k) if union[c] > 0]
    return {
        "pixels": pixels,
        "kept_pixels": kept,
        "kept_fraction": _ratio(kept, pixels),
        "kept_accuracy": _ratio(correct, kept),
        "kept_error": _ratio(kept - correct, kept),
        "miou": round(float(np.mean(ious)), 6) if ious else None,
        "precision": {c: _ratio(tp[i], pred_c[i]) for i, c in enumerate(classes)},
        "recall": {c: _ratio(tp[i], true_c[i]) for i, c in enumerate(classes)},
        "iou": {c: _ratio(tp[i], union[i]) for i, c in enumerate(classes)},
        **_per_image_figures(per_image, classes),
    }


def _per_image_figures(r: dict | None, classes: list[str]) -> dict[str, Any]:
    """Per class, means over images: ``mean_image_recall`` (over the images that contain the
    class) and, for method recall's folders, ``mean_reachable_miss`` (its certified quantity,
    over the images with reachable pixels of the class)."""

    def mean(total: np.ndarray, n: np.ndarray) -> dict[str, float | None]:
        return {
            c: round(float(total[i]) / R.SCALE / int(n[i]), 6) if n[i] else None
            for i, c in enumerate(classes)
        }

    out: dict[str, Any] = {}
    if r is not None and "image_recall" in r:
        out["mean_image_recall"] = mean(r["image_recall"], r["image_present"])
    if r is not None and "reach_miss" in r:
        out["mean_reachable_miss"] = mean(r["reach_miss"], r["reach_present"])
    return out


def curve(r: dict) -> dict[str, Any]:
    """The risk-coverage curve of one set from its summed counts (grid thresholds with ≥ 1 kept
    pixel; kept fraction and error of the kept pixels of the argmax)."""
    tau = R.tau_grid()
    kept, wrong, px = r["curve_kept"], r["curve_wrong"], r["pixels"]
    sel = np.flatnonzero(kept > 0)
    return {
        "tau": [float(tau[j]) for j in sel],
        "kept_fraction": [round(int(kept[j]) / px, 6) for j in sel],
        "kept_error": [round(int(wrong[j]) / int(kept[j]), 6) for j in sel],
    }


def plan_items(manifest: Manifest, cache: Cache, folders: list[Folder]) -> list[Item]:
    """The images of the pass, each with the role it is counted under."""
    present = set(cache.ids)
    items: list[Item] = []
    for r in manifest.split("unlabeled"):
        if r.label is not None and r.id in present:
            items.append(Item(r.id, str(manifest.label_path(r)), "unlabeled"))
    held = sorted(set().union(*(f.held for f in folders)))
    items += [Item(i, str(manifest.label_path(manifest.row(i))), "held_out") for i in held]
    if any(f.rule is not None for f in folders):
        items += [
            Item(r.id, str(manifest.label_path(r)), "val")
            for r in manifest.split("val")
            if r.label is not None and r.id in present
        ]
    return items


def run(
    manifest: Manifest,
    cache_path: Path,
    folder_paths: list[Path],
    out_dir: Path,
    scheduler: str = "threads",
    workers: int = 0,
    batch: int = 8,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the folders; writes ``evaluation.json`` and ``risk_coverage.png`` into
    ``out_dir`` and returns the JSON content. A folder that a calibrate run changed while it
    was read is refused (:func:`calibrate.folder.refuse_changed`). Hold ``out_dir``'s writer
    lock while calling it (:func:`data_manifest.ownership.writer_lock`; the command line does,
    around the report.html it writes next)."""
    before = [state(p) for p in folder_paths]
    for p in folder_paths:
        check_manifest(p, manifest)
    cache = open_cache(cache_path)
    if cache.meta.manifest_fingerprint != manifest.fingerprint:
        raise UserError(
            f"{cache.path}: manifest_fingerprint {cache.meta.manifest_fingerprint[:16]!r} but "
            f"manifest {manifest.path} has {manifest.fingerprint[:16]!r}; expected the cache "
            "annotated from this manifest"
        )
    folders = [read_folder(p, manifest, cache) for p in folder_paths]
    names = [f.name for f in folders]
    if len(set(names)) < len(names):  # same folder names in different parents: use the paths
        folders = [
            Folder(str(p), f.path, f.rule, f.held_rule, f.held, f.report)
            for p, f in zip(folder_paths, folders, strict=True)
        ]
    items = plan_items(manifest, cache, folders)
    if not items:
        raise UserError(
            f"{manifest.path}: no image to compare with: no unlabeled row has a label, no "
            "folder has held-out labeled images and no val image with a label is in the "
            f"cache {cache.path}; expected ground truth for some of them"
        )
    ctx = EvalCtx(
        cache=str(cache.path.resolve()),
        num_classes=manifest.num_classes,
        reduce_zero_label=manifest.meta.reduce_zero_label,
        quantize=0 < cache.meta.topk < cache.num_classes,
        folders=tuple(folders),
    )
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    with Runner(scheduler, workers, show_progress, ("calibrate.evaluate",)) as runner:
        res = runner.map_reduce(
            count_batch, batches, "evaluate", unit_per_batch=[len(b) for b in batches], ctx=ctx
        )
    for p, b in zip(folder_paths, before, strict=True):
        refuse_changed(p, b, "this evaluation", "evaluate again")
    result = summarise(res or {}, manifest, cache, folders)
    claim(out_dir, OWNER, "--out-dir", legacy=written_by_evaluate)
    atomic_write_json(out_dir / "evaluation.json", result)
    plot(result, out_dir / "risk_coverage.png")
    return result


def _settings(f: Folder) -> dict[str, Any]:
    rep = f.report
    out = {k: rep.get(k) for k in ("method", "alpha", "mode", "score", "background_rule")}
    if rep.get("risk"):
        out["risk"] = {k: rep["risk"].get(k) for k in ("epsilon", "delta", "control", "tau")}
    if rep.get("unlabeled", {}).get("threshold") is not None:
        out["threshold"] = rep["unlabeled"]["threshold"]
    return out


def summarise(res: dict, manifest: Manifest, cache: Cache, folders: list[Folder]) -> dict[str, Any]:
    """evaluation.json's content from the pass's counts."""
    classes = list(manifest.classes)
    sets: dict[str, Any] = {}
    for s in SETS:
        r = res.get(s)
        if not r:
            continue
        sets[s] = {
            "images": int(r["images"]),
            "pixels": int(r["pixels"]),
            "annotator_argmax": quality(r["argmax"], classes),
            "risk_coverage": curve(r),
            "folders": {
                name: {"images": int(v["images"]), **quality(v["confusion"], classes, v)}
                for name, v in r["folders"].items()
            },
        }
    notes = []
    for f in folders:
        if f.rule is None:
            notes.append(
                f"{f.path}: its calibration.json records no rule; held-out and val figures "
                "skipped (re-run `calibrate run` to record it)"
            )
    if "unlabeled" not in sets:
        notes.append("unlabeled figures skipped: no unlabeled row of the manifest has a label")
    return {
        "schema": SCHEMA,
        "classes": classes,
        "manifest": {"path": str(manifest.path), "fingerprint": manifest.fingerprint},
        "cache": {"path": str(cache.path), "model_sha256": cache.meta.model_sha256},
        "confidence_rounded_to_float16": 0 < cache.meta.topk < cache.num_classes,
        "folders": [
            {"name": f.name, "path": f.path, "held_out_images": len(f.held), **_settings(f)}
            for f in folders
        ],
        "sets": sets,
        "notes": notes,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """risk_coverage.png: one panel per image set, the annotator's curve and every folder's
    operating point (kept fraction, error of kept pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["sets"]
    n = max(len(sets), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.2), squeeze=False)
    markers = "osD^vP*Xh<>"
    for ax, (name, s) in zip(axes[0], sets.items(), strict=False):
        c = s["risk_coverage"]
        ax.plot(c["kept_fraction"], c["kept_error"], "-", color="0.3", label="threshold on max p")
        for i, (fname, v) in enumerate(s["folders"].items()):
            if v["kept_fraction"] is None or v["kept_error"] is None:
                continue
            ax.plot(
                v["kept_fraction"],
                v["kept_error"],
                markers[i % len(markers)],
                ms=8,
                label=fname,
            )
        ax.set_xlim(0, 1.02)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("kept fraction")
        ax.set_ylabel("error of kept pixels")
        ax.set_title(f"{name} ({s['images']} images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})
    plt.close(fig)


def summary_tables(result: dict[str, Any]) -> list[Any]:
    """Rich tables: per set, one row per folder (and the annotator's argmax from the cache):
    images, kept %, kept accuracy %, mIoU %; then per-class precision / recall % on the first
    set."""
    from data_manifest.cli_support import table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    sets = result["sets"]
    rows = []
    for sname, s in sets.items():
        entries = [("annotator argmax", {"images": s["images"], **s["annotator_argmax"]})]
        entries += list(s["folders"].items())
        for name, v in entries:
            rows.append(
                [
                    sname,
                    name,
                    str(v["images"]),
                    pct(v["kept_fraction"]),
                    pct(v["kept_accuracy"]),
                    pct(v["miou"]),
                ]
            )
    cols = ["set", "folder", "images", "kept %", "kept acc %", "mIoU %"]
    out = [table("pseudo-label quality (mIoU over kept pixels)", cols, rows)]
    if sets:
        first, s = next(iter(sets.items()))
        names = list(s["folders"])
        pc = [
            [
                c,
                *(
                    f"{pct(s['folders'][f]['precision'][c])} / {pct(s['folders'][f]['recall'][c])}"
                    for f in names
                ),
            ]
            for c in result["classes"]
        ]
        out.append(table(f"precision / recall % per class ({first})", ["class", *names], pc))
    return out
