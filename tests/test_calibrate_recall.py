"""Method "recall": the rule, the counting, the selection, and the guarantee statistically.

Statistical test. A pool of M simulated images stands for the population: sampling images
from it with replacement gives exactly i.i.d. (so exchangeable) images, and the true risk of
class c at grid index j, R_c(j) = E[ℓ_c(j) | the image has reachable pixels of c], is the mean
over the pool's images that have them, known exactly. Images differ in difficulty (a few are
hopeless: their objects get tiny probabilities), so pixels of one image are strongly
dependent, and the annotator sometimes ranks another object class first (unreachable pixels).

CRC guarantees E[R_c(ĵ_c)] ≤ ε over calibration draws, for ĵ_c the strictest certified index
and for any certified index chosen from the data (the IoU-best one the method uses). Over T
trials the mean of R_c at the chosen index has standard error s/√T (s its standard deviation
over trials, estimated); the test accepts a mean ≤ ε + 4 s/√T, so a correct implementation
fails with probability < 1e-4 per check by the normal approximation (T = 3000; the trials'
means are averages of 3000 bounded values). Calibration sets of N = 16 images hold about 7
images per class, where CRC's +1/(N_c + 1) matters: without it (plug-in) the mean risk
exceeds ε by about 4 standard errors beyond the bound (measured: 0.213 against 0.207), so the
test can fail. Trials where a class has too few images
to be certified (N_c < 1/ε − 1) use CRC's convention (the most lenient threshold, t = 0,
where the loss is 0), which the theorem covers.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from _calibrate_fixtures import calibrate_run, make_dataset

from annotate import open_cache
from calibrate import recall as C
from calibrate import risk as R
from calibrate import topk as T
from data_manifest import load
from data_manifest.io import read_label_png

GRID = C.class_grid()


def test_grid_is_fixed_dense_at_both_ends_and_decreasing() -> None:
    assert GRID.dtype == np.float32 and np.all(np.diff(GRID) < 0)
    assert GRID[-1] == 0 and GRID[0] < 1
    np.testing.assert_array_equal(GRID, C.class_grid())
    # the paper's threshold 1 − q̂ on the demo (q̂ = 0.992) and near 1 are both resolved
    for t in (0.008, 1e-5, 0.5, 1 - 1e-5):
        nearest = GRID[
            np.argmin(np.abs(np.log(GRID[:-1] / (1 - GRID[:-1])) - math.log(t / (1 - t))))
        ]
        assert abs(math.log(nearest / (1 - nearest)) - math.log(t / (1 - t))) <= 0.05 + 1e-6


def loop_label(p: np.ndarray, t: np.ndarray, bg: int | None) -> np.ndarray:
    """The rule pixel by pixel (ties to the lower class index)."""
    k, h, w = p.shape
    out = np.full((h, w), 255, np.uint8)
    for y in range(h):
        for x in range(w):
            v = p[:, y, x]
            fg = [c for c in range(k) if c != bg]
            f = max(fg, key=lambda c: (v[c], -c))
            if v[f] >= t[f]:
                out[y, x] = f
            elif bg is not None and int(np.argmax(v)) == bg:
                out[y, x] = bg
    return out


@pytest.mark.parametrize("bg", [0, 2, None])
def test_rule_matches_a_pixel_loop(bg: int | None) -> None:
    rng = np.random.default_rng(0)
    k = 5
    logits = rng.normal(0, 3, size=(k, 9, 11)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(0)
    p[:, 0, :3] = 0.2  # ties everywhere on a few pixels
    t = np.array([0.3, 0.05, 0.6, 0.0, 1.5], np.float32)  # 1.5: class 4 never labeled
    got = C.label(p.astype(np.float32), t, bg, quantize=False)
    np.testing.assert_array_equal(got, loop_label(p, t, bg))
    assert not (got == 4).any()


def test_topk_entries_give_the_full_rule_where_determined() -> None:
    """A top-k entry (k = 2, float16) decides every pixel but those within a float16 step of
    their threshold; with the confidence rounded (quantize) it decides all of them."""
    rng = np.random.default_rng(1)
    k = 6
    logits = rng.normal(0, 4, size=(k, 20, 30)).astype(np.float32)
    p = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    t = np.full(k, 0.03, np.float32)
    t[3] = 0.4
    order = np.lexsort((np.arange(k)[:, None, None] * np.ones_like(p), -p), axis=0)[:2]
    idx = order.astype(np.uint8)
    prob16 = np.take_along_axis(p, order, 0).astype(np.float16)
    entry = T.TopK.from_stored(idx, prob16, k)
    for quantize in (True, False):
        full = C.label(p, t, 0, quantize)
        got, unsure = C.topk_label(entry, t, 0, quantize)
        np.testing.assert_array_equal(got[~unsure], full[~unsure])
        assert (got[unsure] == 255).all()
        if quantize:
            assert not unsure.any()
        else:
            assert unsure.mean() < 0.01


def test_image_stats_match_loops() -> None:
    rng = np.random.default_rng(2)
    k, bg = 4, 0
    logits = rng.normal(0, 3, size=(k, 12, 16)).astype(np.float32)
    p = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    lab = rng.integers(0, k, size=(12, 16)).astype(np.uint8)
    lab[0] = 255
    st = C.image_stats(p, lab, GRID, bg, quantize=False)
    valid = lab != 255
    pf = p.copy()
    pf[bg] = -1
    f, pi = pf.argmax(0), pf.max(0)
    for c in range(1, k):
        r = (valid & (lab == c) & (f == c)).sum()
        assert st["pixels"][c] == (valid & (lab == c)).sum() and st["reachable"][c] == r
        assert st["present"][c] == int(r > 0)
        for j in (0, 50, 150, 250, GRID.size - 1):
            keep = valid & (f == c) & (pi >= GRID[j])
            tp = (keep & (lab == c)).sum()
            assert st["tp"][c, j] == tp and st["claimed"][c, j] == keep.sum()
            exact = Fraction(int(r - tp), int(r)) * R.SCALE if r else 0
            assert st["loss"][c, j] == math.ceil(exact)
    assert not st["tp"][bg].any() and st["present"][bg] == 0
    assert (np.diff(st["loss"], axis=1) <= 0).all()  # monotone: non-increasing along the grid
    assert (st["loss"][:, -1] == 0).all()  # 0 at t = 0: every reachable pixel is labeled


def _stats(loss: np.ndarray, iou_tp: np.ndarray) -> dict:
    """Summed stats of one class (index 1; class 0 the background) from per-image losses."""
    n, g = loss.shape
    k = 2
    out = {
        "present": np.array([0, n]),
        "pixels": np.array([0, 100]),
        "reachable": np.array([0, 90]),
        "tp": np.zeros((k, g), np.int64),
        "claimed": np.zeros((k, g), np.int64),
        "loss": np.zeros((k, g), np.int64),
    }
    out["loss"][1] = (loss * R.SCALE).astype(np.int64).sum(0)
    out["tp"][1] = iou_tp
    out["claimed"][1] = iou_tp + np.linspace(0, 400, g).astype(np.int64)
    return out


def test_selection_by_brute_force() -> None:
    rng = np.random.default_rng(3)
    n, g = 9, GRID.size
    loss = np.sort(rng.random((n, g)), axis=1)[:, ::-1] * np.linspace(0.6, 0, g)
    tp = np.minimum.accumulate(np.linspace(0, 90, g).astype(np.int64)[::-1])[::-1]
    sel = C.select(_stats(loss, tp), GRID, 0.2, ["bg", "obj"], 0, fallback=0.5)[0]
    lf = (loss * R.SCALE).astype(np.int64).sum(0) / R.SCALE
    ok = [j for j in range(g) if (lf[j] + 1) / (n + 1) <= 0.2]
    assert sel.certified and sel.bound_index == min(ok)
    iou = tp / (100 + (tp + np.linspace(0, 400, g).astype(np.int64)) - tp)
    assert sel.index == min(ok) + int(np.argmax(iou[min(ok) :]))
    assert sel.tau == float(GRID[sel.index]) and sel.statistic <= 0.2


def test_classes_too_rare_to_certify_take_the_papers_threshold() -> None:
    loss = np.zeros((3, GRID.size))
    tp = np.zeros(GRID.size, np.int64)
    sel = C.select(_stats(loss, tp), GRID, 0.2, ["bg", "x"], 0, fallback=0.0123)[0]
    assert not sel.certified and sel.bound_index == -1
    assert "1/(N+1) = 0.25 > ε = 0.2" in sel.note and "paper's threshold" in sel.note
    # rounded down to the grid: it labels the class wherever the paper's rule would
    assert sel.tau <= 0.0123 and GRID[sel.index - 1] > 0.0123
    empty = _stats(np.zeros((0, GRID.size)), tp)
    none = C.select(empty, GRID, 0.2, ["bg", "x"], 0, fallback=0.0123)[0]
    assert none.images == 0 and not none.certified and none.tau == sel.tau
    assert C.thresholds([none], ["bg", "x"]) == (0.0, none.tau)


# -- statistical test ------------------------------------------------------------------------

K_SIM = 4  # background + 3 object classes


def simulated_pool(m: int, seed: int) -> dict[str, np.ndarray]:
    """Per-image :func:`calibrate.recall.image_stats` of m simulated images, stacked."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(m):
        difficulty = rng.beta(0.7, 1.5)
        hopeless = rng.random() < 0.05
        labels, logits = [], []
        n_bg = int(rng.integers(50, 200))
        z = rng.normal(-7.0, 2.5, size=(K_SIM, n_bg))
        z[0] = 0.0
        labels.append(np.zeros(n_bg, np.uint8))
        logits.append(z)
        for c in range(1, K_SIM):
            if rng.random() < 0.45:
                n = int(rng.integers(10, 150))
                z = rng.normal(-4.0, 2.0, size=(K_SIM, n))
                z[0] = 0.0
                mu = -9.0 if hopeless else 5.0 - 12.0 * difficulty
                z[c] = rng.normal(mu, 3.0, size=n)
                labels.append(np.full(n, c, np.uint8))
                logits.append(z)
        lab = np.concatenate(labels)[None]
        z = np.concatenate(logits, axis=1)[:, None]
        p = (np.exp(z) / np.exp(z).sum(0)).astype(np.float32)
        parts.append(C.image_stats(p, lab, GRID, 0, quantize=False))
    return {k: np.stack([s[k] for s in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def pool() -> dict[str, np.ndarray]:
    return simulated_pool(6000, 0)


def test_crc_expected_miss_rate_is_at_most_epsilon(pool: dict[str, np.ndarray]) -> None:
    eps, n, trials = 0.2, 16, 3000  # about 7 images per class: CRC's +1/(N+1) matters
    present = pool["present"].astype(bool)
    # the exact conditional risk of each class at each grid index
    risk = {c: pool["loss"][present[:, c], c].mean(0) / R.SCALE for c in range(1, K_SIM)}
    for c in risk:
        assert risk[c][0] > 0.5 > eps > risk[c][-1] == 0  # the target lies inside the grid
    rng = np.random.default_rng(7)
    crc, chosen, plug_in = (np.zeros((trials, K_SIM - 1)) for _ in range(3))
    certified = 0
    classes = ["bg", "a", "b", "c"]
    for t in range(trials):
        idx = rng.integers(0, len(present), size=n)
        stats = {k: v[idx].sum(0) for k, v in pool.items()}
        sel = C.select(stats, GRID, eps, classes, 0, fallback=0.0)
        for s in sel:
            c = classes.index(s.cls)
            bound = s.bound_index if s.certified else GRID.size - 1  # CRC's convention
            crc[t, c - 1] = risk[c][bound]
            chosen[t, c - 1] = risk[c][s.index] if s.certified else risk[c][bound]
            certified += s.certified
            nc = int(stats["present"][c])
            mean = stats["loss"][c] / R.SCALE / max(nc, 1)
            ok = np.flatnonzero(mean <= eps)  # plug-in: the mean alone, no +1/(N+1)
            plug_in[t, c - 1] = risk[c][ok[0]] if ok.size else 0.0

    def upper(x: np.ndarray) -> float:
        return eps + 4 * x.std(ddof=1) / math.sqrt(trials)

    assert certified > 0.9 * trials * (K_SIM - 1)  # not vacuous
    for c in range(K_SIM - 1):
        assert crc[:, c].mean() <= upper(crc[:, c])
        assert chosen[:, c].mean() <= upper(chosen[:, c])
        assert chosen[:, c].mean() <= crc[:, c].mean() + 1e-12  # at or below t̂: never worse
        assert crc[:, c].mean() > 0.35 * eps  # and not trivially conservative
    assert max(plug_in[:, c].mean() - upper(plug_in[:, c]) for c in range(K_SIM - 1)) > 0


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(
        tmp_path_factory.mktemp("recall") / "ds", n_labeled=30, n_unlabeled=6, n_val=10, topk=2
    )


def numpy_thresholds(mpath: Path, cpath: Path, ids: list[str], eps: float) -> list[float]:
    """The method's thresholds by plain loops: per class, CRC over images with reachable
    pixels, then the IoU-best threshold at or below t̂ (float16-rounded confidences)."""
    m, cache = load(mpath), open_cache(cpath)
    k = m.num_classes
    loss = {c: [] for c in range(1, k)}
    tp = np.zeros((k, GRID.size))
    claimed = np.zeros((k, GRID.size))
    px = np.zeros(k)
    for i in ids:
        p = cache.probs(i)
        lab = m.read_label(m.row(i))
        valid = lab != 255
        pf = p.copy()
        pf[0] = -1
        f, pi = pf.argmax(0), pf.max(0).astype(np.float16).astype(np.float32)
        for c in range(1, k):
            reach = valid & (lab == c) & (f == c)
            px[c] += (valid & (lab == c)).sum()
            hits = np.array([(reach & (pi >= t)).sum() for t in GRID])
            tp[c] += hits
            claimed[c] += np.array([(valid & (f == c) & (pi >= t)).sum() for t in GRID])
            if reach.sum():
                loss[c].append(1 - hits / reach.sum())
    out = [0.0]
    for c in range(1, k):
        arr = np.array(loss[c])
        stat = (arr.sum(0) + 1) / (len(arr) + 1)
        ok = np.flatnonzero(stat <= eps + 1e-9)
        iou = tp[c] / np.maximum(px[c] + claimed[c] - tp[c], 1)
        lo = int(ok[0]) if ok.size else 0
        out.append(float(GRID[lo + int(np.argmax(iou[lo:]))]))
    return out


def test_recall_method_end_to_end(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, cpath = ds
    out = tmp_path / "recall"
    res = calibrate_run(mpath, cpath, out, "--method", "recall", "--miss", "0.2")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "calibration.json").read_text())
    m, cache = load(mpath), open_cache(cpath)
    ids = sorted(r.id for r in m.split("labeled"))
    expect = numpy_thresholds(mpath, cpath, ids, 0.2)
    fig = rep["recall"]
    assert fig["thresholds"] == pytest.approx(expect, rel=0, abs=0)
    assert fig["certified"] == ["cat", "dog", "tree"] and fig["not_certified"] == []
    assert rep["risk"] is None
    for s in fig["selection"]:
        assert s["statistic"] <= 0.2 and s["index"] >= s["bound_index"] >= 0
    rule = rep["rule"]["pngs"]
    assert rule["method"] == "recall" and rule["quantize"] and rule["background"] == 0
    assert rule["thresholds"] == fig["thresholds"]
    assert rep["rule"]["held_out"]["thresholds"] == fig["held_out"]["thresholds"]
    t = np.asarray(fig["thresholds"], np.float32)
    for r in m.split("unlabeled"):
        p = cache.probs(r.id)  # a top-2 entry: the stored classes decide (quantized)
        got = read_label_png(out / f"{r.id}.png")
        full = C.label(p, t, 0, quantize=True)
        np.testing.assert_array_equal(got, full)
    assert rep["unlabeled"]["undetermined_pixels"] == 0
    html = (out / "report.html").read_text()
    assert "recall floor per class" in html and "tree" in html


def test_evaluate_reports_the_certified_quantity(ds: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from calibrate.cli import app

    mpath, cpath = ds
    out = tmp_path / "recall"
    assert calibrate_run(mpath, cpath, out, "--method", "recall").exit_code == 0
    res = CliRunner().invoke(app, ["evaluate", str(out), "--out-dir", str(tmp_path / "ev"), "-q"])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    rep = json.loads((out / "calibration.json").read_text())
    val = ev["sets"]["val"]["folders"]["recall"]
    m, cache = load(mpath), open_cache(cpath)
    t = np.asarray(rep["recall"]["thresholds"], np.float32)
    misses: dict[int, list[float]] = {c: [] for c in range(1, 4)}
    for r in m.split("val"):
        p, lab = cache.probs(r.id), m.read_label(r)
        pred = C.label(p, t, 0, quantize=True)
        f, _, _ = C.foreground(p, 0, True)
        for c in range(1, 4):
            reach = (lab == c) & (f == c)
            if reach.any():
                misses[c].append(1 - (reach & (pred == c)).sum() / reach.sum())
    assert all(misses.values())  # every class has reachable pixels in some val image
    for c, name in enumerate(m.classes):
        if c:
            expect = float(np.mean(misses[c]))
            assert val["mean_reachable_miss"][name] == pytest.approx(expect, abs=2e-6)
            assert rep["recall"]["val"][name]["mean_miss"] == pytest.approx(expect, abs=2e-6)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--miss", "0"), "--miss = 0.0: expected a number in (0, 1)"),
        (("--miss", "1"), "--miss = 1.0: expected a number in (0, 1)"),
    ],
)
def test_bad_miss_is_one_line(
    ds: tuple[Path, Path], tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    mpath, cpath = ds
    out = tmp_path / "bad"
    res = calibrate_run(mpath, cpath, out, "--method", "recall", *args)
    assert res.exit_code == 1
    assert needle in res.output and res.output.count("\n") == 1
    assert not out.exists()


def test_resized_topk_entries_are_refused_in_one_line(tmp_path: Path) -> None:
    mpath, cpath = make_dataset(tmp_path / "ds", topk=2, native_scale=2)
    out = tmp_path / "out"
    res = calibrate_run(mpath, cpath, out, "--method", "recall")
    assert res.exit_code == 1
    assert "method 'recall' cannot rank its classes exactly" in res.output
    assert res.output.count("\n") == 1 and not out.exists()


def test_uncertified_classes_get_the_runs_own_paper_threshold(
    ds: tuple[Path, Path], tmp_path: Path
) -> None:
    """ε = 0.04 needs 24 images per class: rarer classes take 1 − q̂ of this very run."""
    mpath, cpath = ds
    out = tmp_path / "strict"
    res = calibrate_run(mpath, cpath, out, "--method", "recall", "--miss", "0.04")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "calibration.json").read_text())
    fig = rep["recall"]
    assert fig["not_certified"], "expected a class too rare to certify at ε = 0.04"
    fallback = float(1 - np.float32(rep["qhat"]))
    assert fig["fallback"] == pytest.approx(fallback, rel=0, abs=0)
    for s in fig["selection"]:
        if not s["certified"]:
            assert s["images"] < 24 and s["tau"] == float(GRID[GRID <= np.float32(fallback)][0])
        else:
            assert s["images"] >= 24
