"""The per-image work of each pass (module-level functions, so any Dask worker can run them).

Every task gets a batch of :class:`Item` and a :class:`Ctx`, opens the cache itself, and returns
a small, mergeable result (see :func:`calibrate.merge.merge`): count tables and integer sums.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from annotate.cache import Cache, open_cache
from calibrate import quantile as Q
from calibrate import recall as C
from calibrate import risk as R
from calibrate import rules as RU
from calibrate import sets as S
from calibrate import topk as T
from calibrate.merge import merge
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_bytes, encode_label_png, read_label_png
from data_manifest.manifest import IGNORE_INDEX, id_path, reduce_zero_label


def _cache(path: str) -> Cache:
    """The cache reader, opened once per process and cache version (thread-safe, read-only)."""
    try:
        stamp = os.stat(os.path.join(path, "zarr.json")).st_mtime_ns
    except OSError:
        stamp = 0  # open_cache raises the user error
    return _open_cache(path, stamp)


@functools.lru_cache(maxsize=8)
def _open_cache(path: str, stamp: int) -> Cache:
    return open_cache(path)


# zlib level of the pseudo-label PNGs: 1 encodes ~2.5x faster than 6 for ~3 % more bytes
PNG_LEVEL = 1


@dataclass(frozen=True)
class Item:
    """One image of a pass: its id, label file (None if unlabeled) and role.

    role: "cal" / "held" (labeled images: calibration part / held-out part), "val", "unlabeled".
    """

    id: str
    label: str | None
    role: str


@dataclass(frozen=True)
class Ctx:
    """What every task needs to know about the run."""

    cache: str
    num_classes: int
    score: str
    mode: str
    reduce_zero_label: bool
    background: int | None
    alphas: tuple[float, ...]  # the α grid (includes the run's α)
    main: int = 0  # index of the run's α in ``alphas``
    max_set_size: int = 0  # larger sets become 255 (0 = no limit)


def load(cache: Cache, item: Item, ctx: Ctx) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities float32 (K, H, W) and, for labeled items, checked labels uint8 (H, W).

    Labeled and val images must hold full scores: a top-k entry cannot give the score of a
    true class outside its top k.
    """
    if item.label is not None and cache.info(item.id)["mode"] == "topk":
        raise UserError(
            f"{cache.path}: {item.role} image {item.id!r} is stored as top-k; expected full "
            "scores for labeled and val images (annotate stores top-k only for the "
            "unlabeled split)"
        )
    probs = cache.probs(item.id)
    if not np.isfinite(probs).all():
        raise UserError(
            f"{cache.path}: image {item.id!r} has non-finite scores; expected "
            "finite annotator outputs (re-annotate this image)"
        )
    if item.label is None:
        return probs, None
    lab = read_label_png(item.label)
    if ctx.reduce_zero_label:
        lab = reduce_zero_label(lab)
    if lab.shape != probs.shape[1:]:
        raise UserError(
            f"{item.label}: label is {lab.shape[0]}x{lab.shape[1]} but the cache "
            f"holds image {item.id!r} at {probs.shape[1]}x{probs.shape[2]}; expected "
            "the same size (cache made from another dataset?)"
        )
    bad = (lab >= ctx.num_classes) & (lab != IGNORE_INDEX)
    if bad.any():
        v = int(lab[bad][0])
        raise UserError(
            f"{item.label}: label value {v} is outside the classes; expected "
            f"class ids 0..{ctx.num_classes - 1} or {IGNORE_INDEX} (ignore)"
        )
    return probs, lab


Unlabeled = np.ndarray | T.TopK | T.Bounds


def load_unlabeled(cache: Cache, item: Item) -> Unlabeled:
    """An unlabeled image: probabilities (K, H, W), or a top-k entry (see :mod:`calibrate.topk`)."""
    x = T.read_unlabeled(cache, item.id)
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        raise UserError(
            f"{cache.path}: image {item.id!r} has non-finite scores; expected "
            "finite annotator outputs (re-annotate this image)"
        )
    return x


def unlabeled_label(
    x: Unlabeled,
    ctx: Ctx,
    method: str,
    qhat: np.ndarray,
    tau: float | None,
    quantize: bool = False,
    thresholds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The pseudo-label of one unlabeled image by ``method`` ("cp", "threshold", "risk",
    "recall" or "raw").

    In class mode, "cp" uses the rule of :func:`calibrate.sets.informative`; "risk" keeps the
    argmax where the confidence (rounded to float16 when ``quantize``) is at least ``tau``;
    "recall" applies the per-class ``thresholds`` float32 (K,) (:mod:`calibrate.recall`).

    Returns:
        (label uint8 (H, W), undetermined bool (H, W) or None): pixels whose label a top-k
        entry leaves open are 255 and marked (see :mod:`calibrate.topk`).
    """
    if method == "risk":
        return RU.risk_label(x, float(tau), quantize)
    if method == "recall":
        if isinstance(x, np.ndarray):
            return C.label(x, thresholds, ctx.background, quantize), None
        return C.topk_label(x, thresholds, ctx.background, quantize)
    fg = S.informative(qhat, ctx.mode) if method == "cp" else None
    if isinstance(x, np.ndarray):
        if method == "cp":
            sets = S.prediction_sets(x, qhat, ctx.score)
            one = bool(qhat.min() == qhat.max())
            label = S.pseudo_label(
                x, sets, ctx.background, ctx.max_set_size, informative=fg, one_threshold=one
            )
            return label, None
        if method == "threshold":
            return S.threshold_label(x, float(tau)), None
        return S.raw_label(x), None
    if fg is not None:
        return RU.informative_topk_label(x, qhat, ctx.score, ctx.background, ctx.max_set_size, fg)
    if isinstance(x, T.TopK):
        if method == "cp":
            return T.topk_cp_label(x, qhat, ctx.score, ctx.background, ctx.max_set_size)
        if method == "threshold":
            return T.topk_threshold_label(x, float(tau))
        return x.index[0].copy(), None
    if method == "cp":
        return T.bounds_cp_label(x, qhat, ctx.score, ctx.background, ctx.max_set_size)
    label, unsure, low, high = T.bounds_argmax(x)
    if method == "threshold":
        t = np.float32(tau)
        unsure = unsure | ((low < t) & (t < high))
        label = np.where(~unsure & (low >= t), label, np.uint8(IGNORE_INDEX)).astype(np.uint8)
    return label, unsure


def max_prob(x: Unlabeled) -> np.ndarray:
    """float32 (n,): the confidence the threshold method compares with τ, for every pixel whose
    argmax is determined (the maximum probability; its lower bound for top-k entries)."""
    if isinstance(x, np.ndarray):
        return x.max(axis=0).ravel()
    if isinstance(x, T.TopK):
        return x.lo[0].ravel()
    _, unsure, low, _ = T.bounds_argmax(x)
    return low[~unsure]


def image_rank(m: int, alpha: float) -> int:
    """⌈m(1−α)⌉: the rank of an image's own (1−α) pixel quantile (image-wise mode)."""
    return max(1, math.ceil(m * (1 - Fraction(repr(float(alpha))))))


def calib_high(batch: list[Item], ctx: Ctx) -> dict:
    """Pass 1 over labeled images: high-bit counts of the calibration scores.

    Returns ``{role: {"pooled": Counts, "class": Counts, "n_class": int64 (K,),
    "images": int, "img_scores": [(id, float32 (len(alphas),))]}}``.
    """
    cache = _cache(ctx.cache)
    out: dict = {}
    for it in batch:
        probs, lab = load(cache, it, ctx)
        s, y = S.true_class_scores(probs, lab, ctx.score)
        r: dict = {"images": 1, "n_class": np.bincount(y, minlength=ctx.num_classes)}
        if ctx.mode == "image":
            if s.size:
                srt = np.sort(s)
                r["img_scores"] = [
                    (
                        it.id,
                        np.array([srt[image_rank(s.size, a) - 1] for a in ctx.alphas], np.float32),
                    )
                ]
        else:
            keys = Q.sort_keys(s)
            r["pooled"] = Q.high_counts(keys)
            if ctx.mode == "class":
                r["class"] = Q.high_counts(keys, y)
        out = merge_role(out, it.role, r)
    return out


def calib_low(batch: list[Item], ctx: Ctx, targets: dict) -> dict:
    """Pass 2 over labeled images: low-bit counts inside the target bins.

    Args:
        targets: ``{(subset, kind): sorted uint64 bin codes}``; subset "all" takes every labeled
            image, "cal" only the calibration part; kind "pooled" or "class".
    Returns:
        ``{(subset, kind): Counts}``.
    """
    cache = _cache(ctx.cache)
    out: dict = {}
    for it in batch:
        probs, lab = load(cache, it, ctx)
        s, y = S.true_class_scores(probs, lab, ctx.score)
        keys = Q.sort_keys(s)
        for (subset, kind), tg in targets.items():
            if subset == "cal" and it.role != "cal":
                continue
            c = Q.low_counts(keys, y if kind == "class" else None, tg)
            out[(subset, kind)] = out.get((subset, kind), Q.Counts.empty()) + c
    return out


def evaluate(batch: list[Item], ctx: Ctx, qhats: dict) -> dict:
    """Report figures on held-out or val images.

    Args:
        qhats: ``{role: float32 (len(alphas), K)}``, q̂ per α of the grid and class.
    Returns:
        ``{role: {...integer sums...}}`` (see :func:`calibrate.report.figures`).
    """
    cache = _cache(ctx.cache)
    k = ctx.num_classes
    out: dict = {}
    for it in batch:
        probs, lab = load(cache, it, ctx)
        q = qhats[it.role]
        valid = lab != IGNORE_INDEX
        y = lab[valid].astype(np.int64)
        n = y.size
        pv = probs.reshape(k, -1)[:, valid.ravel()][:, None, :]  # (K, 1, n): labeled pixels
        r: dict = {"images": 1, "pixels": int(n), "per_alpha": {}, "per_image": []}
        allscores = S.class_scores(pv, ctx.score)
        raw = S.raw_label(pv)[0]
        pixels_class = np.bincount(y, minlength=k).astype(np.int64)
        s_true = allscores[y, 0, np.arange(n)]
        r["pixels_class"] = pixels_class
        for a in range(q.shape[0]):  # the coverage curve: the true class's score against q̂
            covered = s_true <= q[a][y]
            r["per_alpha"][a] = np.bincount(y[covered], minlength=k).astype(np.int64)
        r["per_image"] = [(it.id, int(r["per_alpha"][ctx.main].sum()), int(n))]
        # set figures at the run's α
        sets = allscores <= q[ctx.main].reshape(-1, 1, 1)
        size = np.count_nonzero(sets[:, 0], axis=0)
        one = bool(q[ctx.main].min() == q[ctx.main].max())
        fg = S.informative(q[ctx.main], ctx.mode)
        pl = S.pseudo_label(
            pv, sets, ctx.background, ctx.max_set_size, informative=fg, one_threshold=one
        )[0]
        kept = pl != IGNORE_INDEX
        r["set_size"] = int(size.sum())
        r["singletons"] = int((size == 1).sum())
        r["empty"] = int((size == 0).sum())
        r["kept"] = int(kept.sum())
        r["kept_correct"] = int((kept & (pl == y)).sum())
        r["raw_correct"] = int((raw == y).sum())
        out = merge_role(out, it.role, r)
    return out


def labeled_stats(batch: list[Item], ctx: Ctx, method: str, quantize: bool) -> dict:
    """Methods risk and recall: the per-image tables of every labeled (and val) image of the
    batch (:func:`calibrate.risk.image_stats`, :func:`calibrate.recall.image_stats`).

    Returns ``{role: summed image stats}`` (role "cal", "held" or "val").
    """
    cache = _cache(ctx.cache)
    out: dict = {}
    for it in batch:
        probs, lab = load(cache, it, ctx)
        if method == "risk":
            stats = R.image_stats(probs, lab, R.tau_grid(), quantize)
        else:
            stats = C.image_stats(probs, lab, C.class_grid(), ctx.background, quantize)
        out = merge_role(out, it.role, stats)
    return out


def unlabeled_counts(
    batch: list[Item], ctx: Ctx, qhat: np.ndarray, targets: np.ndarray | None
) -> dict:
    """Threshold matching on unlabeled images.

    With ``targets`` None (pass 1): CP's kept pixels, the pixels the threshold may keep (all
    of them, but for resized top-k entries those with an undetermined argmax), and high-bit
    counts of their max probability. With targets (pass 2): low-bit counts of max
    probabilities in those bins.
    """
    cache = _cache(ctx.cache)
    out: dict = {}
    for it in batch:
        x = load_unlabeled(cache, it)
        keys = Q.sort_keys(max_prob(x))
        if targets is None:
            lab, _ = unlabeled_label(x, ctx, "cp", qhat, None)
            r = {
                "kept": int(np.count_nonzero(lab != IGNORE_INDEX)),
                "pixels": int(keys.size),
                "high": Q.high_counts(keys),
            }
        else:
            r = {"low": Q.low_counts(keys, None, targets)}
        out = merge(out, r)
    return out


def stage_png(
    label: np.ndarray, palette: list[list[int]], final: Path, staged: Path
) -> tuple[str, bool]:
    """Encode a pseudo-label PNG; write it to ``staged`` (atomically) unless ``final`` already
    holds these exact bytes.

    Returns:
        (sha256 hex digest of the PNG bytes, whether it was staged).
    """
    data = encode_label_png(label, palette, PNG_LEVEL)
    digest = hashlib.sha256(data).hexdigest()
    if final.is_file() and final.stat().st_size == len(data) and final.read_bytes() == data:
        return digest, False
    atomic_write_bytes(staged, data)
    return digest, True


def write_pseudo(
    batch: list[Item],
    ctx: Ctx,
    method: str,
    qhat: np.ndarray,
    tau: float | None,
    out_dir: str,
    stage_dir: str,
    palette: list[list[int]],
    thresholds: np.ndarray | None = None,
) -> dict:
    """Compute one pseudo-label PNG per unlabeled image; those that differ from the PNG in
    ``out_dir`` are written to ``stage_dir`` (see :func:`calibrate.folder.commit`).

    Returns ``{"images": [(id, kept pixels, pixels, staged, undetermined pixels, sha256)]}``.
    """
    cache = _cache(ctx.cache)
    quantize = 0 < cache.meta.topk < cache.num_classes  # risk, recall: see calibrate.risk
    rows = []
    for it in batch:
        x = load_unlabeled(cache, it)
        lab, unsure = unlabeled_label(x, ctx, method, qhat, tau, quantize, thresholds)
        final, staged = id_path(out_dir, it.id), id_path(stage_dir, it.id)
        digest, was_staged = stage_png(lab, palette, final, staged)
        n_unsure = 0 if unsure is None else int(np.count_nonzero(unsure))
        kept = int(np.count_nonzero(lab != IGNORE_INDEX))
        rows.append((it.id, kept, int(lab.size), was_staged, n_unsure, digest))
    return {"images": rows}


def merge_role(out: dict, role: str, r: dict) -> dict:
    """Add one image's result ``r`` under ``role``."""
    return merge(out, {role: r})
