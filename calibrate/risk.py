"""Method "risk": a confidence threshold whose kept-pixel error is controlled over images.

The pseudo-label is the annotator's argmax where its confidence c = max_j p_j is at least τ,
else 255. τ is chosen on the labeled images from a grid fixed in advance (:func:`tau_grid`,
descending, so index 0 keeps the fewest pixels). For image i (pixels labeled 255 left out)::

    kept_i(τ)  = #{pixels with c ≥ τ}
    wrong_i(τ) = #{kept pixels whose argmax is not the label}
    ℓ_i(τ)     = wrong_i(τ) / kept_i(τ), and 0 when kept_i(τ) = 0

ℓ_i is the image's error among its kept pixels (the per-image false-label proportion, 0/0 = 0
as in the false discovery rate), bounded in [0, 1]. R(τ) = E[ℓ(τ)] is its expectation over a
new image exchangeable with the labeled ones. Two ways to choose τ (both assume that the
labeled and the unlabeled images are exchangeable: one pool split at random):

- ``crc`` (conformal risk control, Angelopoulos et al. 2022): ℓ_i is not monotone in τ (a
  stricter threshold can drop more right pixels than wrong ones), so CRC runs on its monotone
  envelope ℓ̃_i(τ_j) = max over the grid thresholds τ_0 ≥ ... ≥ τ_j of ℓ_i, which is
  non-increasing in τ, bounded by B = 1, 0 where nothing is kept, and ≥ ℓ_i. τ̂ is the lowest
  grid threshold with (Σ_i ℓ̃_i(τ) + 1) / (N + 1) ≤ ε. Guarantee: E[ℓ_{N+1}(τ̂)] ≤ ε, the
  expectation taken over the N calibration images and the new image together.
- ``ltt`` (Learn then Test, Angelopoulos et al. 2021): for each grid threshold the null
  hypothesis R(τ_j) > ε is tested with the Hoeffding-Bentkus p-value of the mean of ℓ over the
  N images, in the fixed order τ_0, τ_1, ... (fixed-sequence testing, no multiplicity cost)
  until the first p-value above δ. Guarantee: with probability ≥ 1 − δ over the calibration
  images, R(τ̂) ≤ ε. It needs many images: even N images with no error at all give the
  p-value (1 − ε)^N, so N ≥ log δ / log(1 − ε) (22 for ε = δ = 0.1) is a hard minimum.

Both are counted in one Dask pass (:func:`calibrate.tasks.labeled_stats`): every image
contributes its kept and wrong counts at every grid threshold and its ℓ and ℓ̃ in fixed point
(:data:`SCALE`, rounded up, so sums are exact integers, identical in any order, and never below
the true sum).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from calibrate.rules import confidence
from data_manifest.manifest import IGNORE_INDEX

CONTROLS = ("crc", "ltt")
GUARANTEE = {
    "crc": "E[loss of a new image at tau] <= epsilon, in expectation over the calibration "
    "images and the new image (conformal risk control on the loss's monotone envelope); "
    "assumes labeled and unlabeled images are exchangeable",
    "ltt": "with probability >= 1 - delta over the calibration images, E[loss of a new image "
    "at tau] <= epsilon (Learn then Test, Hoeffding-Bentkus p-values, fixed-sequence testing "
    "from the strictest threshold); assumes labeled and unlabeled images are exchangeable",
}
SCALE = 1 << 32  # fixed-point unit of the per-image losses
_DECADES, _PER_DECADE = 7, 20


def tau_grid() -> np.ndarray:
    """The confidence thresholds, float32, strictly decreasing from 1 − 1e-7 to 0.

    1 − τ is spaced evenly in log scale, 20 points per decade from 1e-7 to 1 (141 values; fewer
    after float32 rounding merges neighbours near 1). Fixed in advance, never from data.
    """
    u = 10.0 ** np.linspace(-_DECADES, 0, _DECADES * _PER_DECADE + 1)
    tau = np.unique((1.0 - u).astype(np.float32))[::-1]
    return np.ascontiguousarray(tau)


def first_kept(conf: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """For each confidence, the first grid index whose threshold keeps it (len(tau): none).

    Args:
        conf: float32 (n,); tau: float32 (G,) strictly decreasing.
    Returns:
        intp (n,) in [0, G].
    """
    asc = tau[::-1]
    return tau.size - np.searchsorted(asc, conf, side="right")


def image_counts(
    conf: np.ndarray, wrong: np.ndarray, tau: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """kept_i and wrong_i at every grid threshold for one image's labeled pixels.

    Args:
        conf: float32 (n,) confidences; wrong: bool (n,) argmax ≠ label; tau: float32 (G,).
    Returns:
        (kept int64 (G,), wrong int64 (G,)), both non-decreasing along the grid.
    """
    g = tau.size
    j = first_kept(conf, tau)
    kept = np.cumsum(np.bincount(j, minlength=g + 1)[:g])
    bad = np.cumsum(np.bincount(j[wrong], minlength=g + 1)[:g])
    return kept.astype(np.int64), bad.astype(np.int64)


def fixed_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """⌈num · SCALE / den⌉ as int64, 0 where den is 0 (num ≤ den < 2**31)."""
    num = np.asarray(num, np.int64)
    den = np.asarray(den, np.int64)
    safe = np.maximum(den, 1)
    return np.where(den > 0, (num * SCALE + safe - 1) // safe, 0).astype(np.int64)


def image_stats(probs: np.ndarray, labels: np.ndarray, tau: np.ndarray, quantize: bool) -> dict:
    """One labeled image's contribution to the risk pass (all values add across images).

    Args:
        probs: float32 (K, H, W); labels: uint8 (H, W), 255 = ignore; tau: float32 (G,).
    Returns:
        ``{"images": 1, "pixels": int, "kept": int64 (G,), "wrong": int64 (G,),
        "loss": int64 (G,) ℓ_i in fixed point, "envelope": int64 (G,) ℓ̃_i in fixed point}``.
    """
    idx, conf = confidence(probs, quantize)
    valid = labels != IGNORE_INDEX
    kept, bad = image_counts(conf[valid], idx[valid] != labels[valid], tau)
    loss = fixed_ratio(bad, kept)
    return {
        "images": 1,
        "pixels": int(valid.sum()),
        "kept": kept,
        "wrong": bad,
        "loss": loss,
        "envelope": np.maximum.accumulate(loss),
    }


@dataclass(frozen=True)
class Selection:
    """The chosen threshold and what certifies it.

    Attributes:
        control: "crc" or "ltt"; epsilon: target ε; delta: LTT's δ (None for CRC).
        index: grid index of τ̂, −1 when no threshold qualifies (then nothing is kept).
        tau: τ̂ (float32 value as a float); above 1 when nothing is kept.
        images: N, the calibration images.
        risk: mean ℓ over the calibration images at τ̂ (None when nothing is kept).
        statistic: CRC: (Σ ℓ̃ + 1)/(N + 1) at τ̂ (≤ ε); LTT: the p-value at τ̂ (≤ δ).
        note: why nothing could be kept, when nothing is.
    """

    control: str
    epsilon: float
    delta: float | None
    index: int
    tau: float
    images: int
    risk: float | None
    statistic: float | None
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


KEEP_NOTHING = float(np.nextafter(np.float32(1.0), np.float32(2.0)))


def _leading_true(ok: np.ndarray) -> int:
    """Index of the last element of the leading run of True values (−1 if ok[0] is False)."""
    bad = np.flatnonzero(~ok)
    return (int(bad[0]) if bad.size else ok.size) - 1


def crc_statistic(envelope_sum: np.ndarray, n: int) -> np.ndarray:
    """(Σ ℓ̃ + B)/(N + 1) with B = 1 at every grid threshold, float64 (G,)."""
    return (np.asarray(envelope_sum, np.float64) / SCALE + 1.0) / (n + 1)


def log_binom_cdf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) ≤ k) for integer k (array), exact up to float64 rounding."""
    k = np.asarray(k, np.int64)
    i = np.arange(n + 1)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    logpmf = logfact[n] - logfact[i] - logfact[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    m = logpmf.max()
    logcdf = m + np.log(np.cumsum(np.exp(logpmf - m)))
    out = np.where(k >= n, 0.0, logcdf[np.clip(k, 0, n)])
    return np.where(k < 0, -np.inf, np.minimum(out, 0.0))


def hb_p_value(loss_sum: np.ndarray, n: int, eps: float) -> np.ndarray:
    """Hoeffding-Bentkus p-values of H: E[ℓ] > ε from the summed losses of n images in [0, 1].

    Args:
        loss_sum: int64 (G,) Σ_i ℓ_i in fixed point (units of 1/SCALE); n ≥ 1; eps: ε.
    Returns:
        float64 (G,). Hoeffding (relative-entropy form): exp(−n·kl(min(R̂, ε) ‖ ε)) with
        R̂ = Σ ℓ / n; Bentkus: e·P(Bin(n, ε) ≤ ⌈n R̂⌉) = e·P(Bin(n, ε) ≤ ⌈Σ ℓ⌉), the ceiling
        taken on the integer sum (exact: a sum a hair above an integer rounds up). The smaller
        of the two (Bates et al. 2021, Angelopoulos et al. 2021).
    """
    total = np.asarray(loss_sum, np.int64)
    r = np.minimum(total.astype(np.float64) / SCALE / n, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(r > 0, r * np.log(r / eps), 0.0) + (1 - r) * np.log((1 - r) / (1 - eps))
    hoeffding = np.exp(-n * kl)
    k = -(-total // SCALE)  # ⌈Σ ℓ⌉ in integers
    bentkus = np.exp(1.0 + log_binom_cdf(k, n, eps))
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def select(
    loss_sum: np.ndarray,
    envelope_sum: np.ndarray,
    n: int,
    tau: np.ndarray,
    eps: float,
    control: str,
    delta: float = 0.1,
) -> Selection:
    """Choose τ̂ from the summed per-image losses of the N calibration images.

    Args:
        loss_sum, envelope_sum: int64 (G,) Σ_i ℓ_i and Σ_i ℓ̃_i in fixed point.
        n: N; tau: float32 (G,) the grid; eps: ε in (0, 1); control: "crc" or "ltt";
        delta: LTT's δ in (0, 1).
    """
    if control not in CONTROLS:
        raise ValueError(f"unknown risk control {control!r}; expected one of {CONTROLS}")
    risk = np.asarray(loss_sum, np.float64) / SCALE / max(n, 1)
    note = ""
    if control == "crc":
        stat = crc_statistic(envelope_sum, n)
        j = _leading_true(stat <= eps) if n else -1
        if j < 0 and 1.0 / (n + 1) > eps:
            note = (
                f"CRC cannot keep any pixel: ε = {eps} is below 1/(N+1) = {1 / (n + 1):.4g} "
                f"with N = {n} calibration images"
            )
        elif j < 0:
            note = (
                f"CRC keeps no pixel: even the strictest threshold has (Σ envelope + 1)/(N+1) "
                f"= {stat[0]:.4g} > ε = {eps}"
            )
        d = None
    else:
        stat = hb_p_value(loss_sum, n, eps) if n else np.ones(tau.size)
        j = _leading_true(stat <= delta)
        need = math.ceil(math.log(delta) / math.log1p(-eps))
        if j < 0 and n < need:
            note = (
                f"LTT cannot keep any pixel: certifying ε = {eps} at δ = {delta} needs at least "
                f"{need} calibration images even if none has an error; there are {n}"
            )
        elif j < 0:
            note = (
                f"LTT keeps no pixel: the strictest threshold's p-value {stat[0]:.4g} is above "
                f"δ = {delta} (mean loss {risk[0]:.4g} over N = {n} images)"
            )
        d = delta
    if j < 0:
        return Selection(control, eps, d, -1, KEEP_NOTHING, n, None, None, note)
    return Selection(control, eps, d, j, float(tau[j]), n, float(risk[j]), float(stat[j]), note)


def at(stats: dict | None, j: int) -> dict:
    """Figures of a role's summed :func:`image_stats` at grid index j (−1: nothing kept).

    Returns ``{"images", "pixels", "kept_fraction", "kept_error" (pooled over pixels),
    "mean_image_error" (mean ℓ_i)}``; rates are None where undefined.
    """
    if not stats:
        return {"images": 0}
    n, px = int(stats["images"]), int(stats["pixels"])
    kept = int(stats["kept"][j]) if j >= 0 else 0
    wrong = int(stats["wrong"][j]) if j >= 0 else 0
    loss = float(stats["loss"][j]) / SCALE / n if j >= 0 and n else 0.0
    return {
        "images": n,
        "pixels": px,
        "kept_fraction": round(kept / px, 6) if px else None,
        "kept_error": round(wrong / kept, 6) if kept else None,
        "mean_image_error": round(loss, 6) if n else None,
    }
