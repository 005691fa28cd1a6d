"""Method "risk": counting, p-values, the selection rules, and their guarantees statistically.

Statistical tests. A pool of M simulated images stands for the population: sampling images
from it with replacement gives exactly i.i.d. (so exchangeable) images whose true risk
R(τ) = E[ℓ(τ)] is the pool's mean loss, known exactly. Every image has its own difficulty
(most are easy, a few are hard, 4 % are wrong almost everywhere whatever the confidence), so
pixels of one image are strongly dependent: a method that treats pixels as independent fails.

- LTT guarantees P(R(τ̂) > ε) ≤ δ. Over T independent trials the number of violations V is
  Binomial(T, p) with p ≤ δ; the test accepts V ≤ v, v the smallest value with
  P(Binomial(T, δ) > v) ≤ 1e-4, so a correct implementation fails with probability < 1e-4.
  The same simulation shows that a pixel-level binomial bound violates far more often.
- CRC guarantees E[ℓ̃(τ̂)] ≤ ε for the envelope ℓ̃ (hence for ℓ). The mean of the true
  envelope risk at τ̂ over T trials has standard error s/√T (s its standard deviation over
  trials, estimated); the test accepts a mean ≤ ε + 4 s/√T (a false failure has probability
  < 1e-4 by the normal approximation, T = 4000). The plug-in rule without CRC's correction,
  on the same trials, exceeds that bound: the test can fail.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from _calibrate_fixtures import calibrate_run, make_dataset
from typer.testing import CliRunner

from annotate import open_cache
from calibrate import risk as R
from data_manifest import load
from data_manifest.io import read_label_png

runner = CliRunner()
TAU = R.tau_grid()


def test_grid_is_fixed_and_strictly_decreasing() -> None:
    assert TAU.dtype == np.float32 and np.all(np.diff(TAU) < 0)
    assert TAU[0] < 1 and TAU[-1] == 0
    np.testing.assert_array_equal(TAU, R.tau_grid())


def test_image_counts_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    conf = rng.choice(np.concatenate([TAU, rng.random(50).astype(np.float32)]), size=400)
    wrong = rng.random(400) < 0.3
    kept, bad = R.image_counts(conf.astype(np.float32), wrong, TAU)
    for j, t in enumerate(TAU):
        assert kept[j] == int((conf >= t).sum())  # boundary inclusive: conf == τ is kept
        assert bad[j] == int(((conf >= t) & wrong).sum())


def test_fixed_point_losses_round_up_exactly() -> None:
    num = np.array([0, 1, 2, 3, 0, 7])
    den = np.array([0, 3, 3, 3, 5, 7])
    got = R.fixed_ratio(num, den)
    for g, a, b in zip(got, num, den, strict=True):
        exact = Fraction(int(a), int(b)) * R.SCALE if b else Fraction(0)
        assert g == math.ceil(exact)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))


@pytest.mark.parametrize("n", [5, 24, 100])
@pytest.mark.parametrize("risk", [0.0, 0.013, 0.05, 0.099, 0.3])
def test_hb_p_value_against_the_formula(n: int, risk: float) -> None:
    eps = 0.1
    total = round(n * risk * R.SCALE)  # Σ ℓ in fixed point
    mean = Fraction(total, R.SCALE * n)
    r = min(float(mean), eps)
    kl = (r * math.log(r / eps) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - eps))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * _binom_cdf(math.ceil(mean * n), n, eps)
    got = float(R.hb_p_value(np.array([total]), n, eps)[0])
    assert got == pytest.approx(min(1.0, hoeffding, bentkus), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("above", [1, 4])
def test_bentkus_rounds_a_sum_just_above_an_integer_up(above: int) -> None:
    """Σ ℓ = 3 + above/2**32 (within 1e-9 of 3): ⌈Σ ℓ⌉ = 4, so P(Bin(n, ε) ≤ 4), never ≤ 3.

    A ceiling of n·R̂ − 1e-9 in float rounds it down to 3 and gives a smaller, invalid p-value.
    """
    n, eps = 100, 0.1
    total = 3 * R.SCALE + above
    got = float(R.hb_p_value(np.array([total]), n, eps)[0])
    hoeffding = math.exp(-n * ((0.03 * math.log(0.3)) + 0.97 * math.log(0.97 / 0.9)))
    expect = min(1.0, math.e * _binom_cdf(4, n, eps), hoeffding)
    assert got == pytest.approx(expect, rel=1e-6)
    assert got > math.e * _binom_cdf(3, n, eps)  # what the rounded-down k gives


def test_crc_selection_by_brute_force() -> None:
    rng = np.random.default_rng(1)
    n = 9
    loss = rng.random((n, TAU.size)) * np.linspace(0, 0.4, TAU.size)
    env = np.maximum.accumulate(loss, axis=1)
    lf = (loss * R.SCALE).astype(np.int64)
    ef = np.maximum.accumulate(lf, axis=1)
    sel = R.select(lf.sum(0), ef.sum(0), n, TAU, 0.1, "crc")
    ok = [j for j in range(TAU.size) if (env[:, : j + 1].sum(0)[-1] + 1) / (n + 1) <= 0.1 + 1e-9]
    expect = max(j for j in ok if all(k in ok for k in range(j + 1))) if 0 in ok else -1
    assert sel.index == expect
    assert sel.tau == float(TAU[expect])
    assert sel.statistic <= 0.1


def test_ltt_needs_enough_images_and_says_so() -> None:
    zeros = np.zeros(TAU.size, np.int64)
    few = R.select(zeros, zeros, 21, TAU, 0.1, "ltt", 0.1)  # 0.9^21 = 0.109 > δ
    assert few.index == -1 and few.tau > 1 and "at least 22" in few.note
    enough = R.select(zeros, zeros, 22, TAU, 0.1, "ltt", 0.1)  # 0.9^22 = 0.098 ≤ δ
    assert enough.index == TAU.size - 1
    crc = R.select(zeros, zeros, 8, TAU, 0.1, "crc")  # 1/(N+1) = 0.111 > ε
    assert crc.index == -1 and "1/(N+1)" in crc.note


# -- statistical tests -----------------------------------------------------------------------


def simulated_pool(m: int, seed: int) -> dict[str, np.ndarray]:
    """Per-image fixed-point losses ℓ, envelopes ℓ̃ and counts of m simulated images."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((m, TAU.size), np.int64) for k in ("loss", "env", "kept", "wrong")}
    difficulty = rng.beta(0.6, 2.0, size=m)
    hopeless = rng.random(m) < 0.04
    sizes = rng.integers(30, 300, size=m)
    for i in range(m):
        u = 10.0 ** (-6.0 * rng.beta(2.0, 1.2, size=sizes[i]))  # 1 − confidence
        p_wrong = np.minimum(1.0, 3.0 * difficulty[i] * u**0.25)
        if hopeless[i]:
            p_wrong = np.full(sizes[i], 0.9)
        kept, wrong = R.image_counts(
            (1.0 - u).astype(np.float32), rng.random(u.size) < p_wrong, TAU
        )
        loss = R.fixed_ratio(wrong, kept)
        out["loss"][i], out["env"][i] = loss, np.maximum.accumulate(loss)
        out["kept"][i], out["wrong"][i] = kept, wrong
    return out


@pytest.fixture(scope="module")
def pool() -> dict[str, np.ndarray]:
    return simulated_pool(20000, 0)


def _max_violations(trials: int, delta: float, tail: float = 1e-4) -> int:
    acc = 0.0
    for v in range(trials + 1):
        acc += math.comb(trials, v) * delta**v * (1 - delta) ** (trials - v)
        if 1 - acc <= tail:
            return v
    return trials


def test_ltt_violation_frequency_is_at_most_delta(pool: dict[str, np.ndarray]) -> None:
    eps, delta, n, trials = 0.1, 0.1, 300, 1000
    risk = pool["loss"].mean(0) / R.SCALE  # the exact R(τ) of the pool
    assert risk[0] < eps < risk[-1]  # the target lies inside the grid
    rng = np.random.default_rng(11)
    ltt = naive = 0
    kept_any = 0
    for _ in range(trials):
        idx = rng.integers(0, len(risk), size=n)
        sel = R.select(pool["loss"][idx].sum(0), pool["env"][idx].sum(0), n, TAU, eps, "ltt", delta)
        ltt += sel.index >= 0 and risk[sel.index] > eps
        kept_any += sel.index >= 0
        # a pixel-level bound (pixels as independent Bernoulli draws, normal 1 − δ upper bound)
        k, w = pool["kept"][idx].sum(0), pool["wrong"][idx].sum(0)
        p = w / np.maximum(k, 1)
        ok = (p + 1.2816 * np.sqrt(p * (1 - p) / np.maximum(k, 1)) <= eps) | (k == 0)
        j = int(np.argmin(ok)) - 1 if not ok.all() else TAU.size - 1
        naive += j >= 0 and risk[j] > eps
    limit = _max_violations(trials, delta)
    assert kept_any > 0.9 * trials  # the test is not vacuous: LTT keeps pixels
    assert ltt <= limit
    assert naive > limit  # treating pixels as independent breaks the guarantee here


def test_crc_expected_risk_is_at_most_epsilon(pool: dict[str, np.ndarray]) -> None:
    eps, n, trials = 0.1, 10, 4000
    env_risk = pool["env"].mean(0) / R.SCALE
    risk = pool["loss"].mean(0) / R.SCALE
    rng = np.random.default_rng(12)
    crc, plug_in, plain = np.zeros(trials), np.zeros(trials), np.zeros(trials)
    for t in range(trials):
        idx = rng.integers(0, len(env_risk), size=n)
        es = pool["env"][idx].sum(0)
        sel = R.select(pool["loss"][idx].sum(0), es, n, TAU, eps, "crc")
        crc[t] = env_risk[sel.index] if sel.index >= 0 else 0.0
        plain[t] = risk[sel.index] if sel.index >= 0 else 0.0
        j = R._leading_true(es / R.SCALE / n <= eps)  # plug-in, without CRC's +B/(N+1)
        plug_in[t] = env_risk[j] if j >= 0 else 0.0

    def upper(x: np.ndarray) -> float:
        return eps + 4 * x.std(ddof=1) / math.sqrt(trials)

    assert (crc > 0).mean() > 0.5  # not vacuous
    assert crc.mean() <= upper(crc)
    assert plain.mean() <= crc.mean()  # ℓ ≤ ℓ̃
    assert plug_in.mean() > upper(plug_in)


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("risk") / "ds", n_labeled=30, n_unlabeled=6, topk=2)


def invoke(mpath: Path, cpath: Path, out: Path, *args: str) -> object:
    return calibrate_run(mpath, cpath, out, "--method", "risk", *args)


def numpy_losses(mpath: Path, cpath: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ℓ and ℓ̃ (float64, (N, G)) by plain loops over the grid."""
    m, cache = load(mpath), open_cache(cpath)
    losses = []
    for i in ids:
        p = cache.probs(i)
        conf = p.max(axis=0).astype(np.float16).astype(np.float32)  # top-k cache: float16
        lab = m.read_label(m.row(i))
        valid = lab != 255
        wrong = (p.argmax(axis=0) != lab) & valid
        row = []
        for t in TAU:
            keep = (conf >= t) & valid
            row.append((wrong & keep).sum() / keep.sum() if keep.sum() else 0.0)
        losses.append(row)
    loss = np.array(losses)
    return loss, np.maximum.accumulate(loss, axis=1)


@pytest.mark.parametrize("control", ["crc", "ltt"])
def test_risk_method_end_to_end(ds: tuple[Path, Path], tmp_path: Path, control: str) -> None:
    mpath, cpath = ds
    out = tmp_path / control
    res = invoke(
        mpath, cpath, out, "--risk", "0.2", "--risk-control", control, "--held-out-fraction", "0"
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "calibration.json").read_text())
    m, cache = load(mpath), open_cache(cpath)
    ids = sorted(r.id for r in m.split("labeled"))
    loss, env = numpy_losses(mpath, cpath, ids)
    n = len(ids)
    if control == "crc":
        ok = (env.sum(0) + 1) / (n + 1) <= 0.2 + 1e-9
    else:
        ok = R.hb_p_value(np.ceil(loss * R.SCALE).astype(np.int64).sum(0), n, 0.2) <= 0.1
    j = (int(np.argmin(ok)) if not ok.all() else TAU.size) - 1
    assert rep["risk"]["selection"]["index"] == j
    tau = rep["risk"]["tau"]
    assert tau == (float(TAU[j]) if j >= 0 else R.KEEP_NOTHING)
    assert rep["rule"]["pngs"] == {**rep["rule"]["pngs"], "method": "risk", "quantize": True}
    if j >= 0:
        assert rep["risk"]["calibration"]["mean_image_error"] == pytest.approx(
            loss[:, j].mean(), abs=1e-6
        )
    for r in m.split("unlabeled"):
        p = cache.probs(r.id)
        conf = p.max(axis=0).astype(np.float16).astype(np.float32)
        expect = np.where(conf >= np.float32(tau), p.argmax(axis=0), 255)
        np.testing.assert_array_equal(read_label_png(out / f"{r.id}.png"), expect)


def test_risk_held_out_figures(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, cpath = ds
    out = tmp_path / "held"
    res = invoke(mpath, cpath, out, "--risk", "0.2")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "calibration.json").read_text())
    ho = rep["risk"]["held_out"]
    assert ho["images"] == 15 and ho["selection"]["images"] == 15
    assert rep["rule"]["held_out"]["tau"] == ho["tau"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--risk", "0"), "--risk = 0.0: expected a number in (0, 1)"),
        (("--risk", "1.5"), "--risk = 1.5: expected a number in (0, 1)"),
        (("--delta", "1"), "--delta = 1.0: expected a number in (0, 1)"),
        (
            ("--risk-control", "bonferroni"),
            "--risk-control = 'bonferroni'; expected one of 'crc', 'ltt'",
        ),
    ],
)
def test_risk_bad_input_is_one_line(
    ds: tuple[Path, Path], tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    mpath, cpath = ds
    out = tmp_path / "bad"
    res = invoke(mpath, cpath, out, *args)
    assert res.exit_code == 1
    assert needle in res.output and res.output.count("\n") == 1
    assert not out.exists()


def test_labeled_rows_without_labels_are_one_line(ds: tuple[Path, Path]) -> None:
    """Risk control (like q̂) needs every labeled row's label: one line naming the row."""
    from dataclasses import replace
    from types import SimpleNamespace

    from calibrate.job import check_inputs
    from data_manifest.errors import UserError
    from data_manifest.manifest import Manifest

    mpath, cpath = ds
    m = load(mpath)
    first = m.split("labeled")[0]
    rows = [replace(r, label=None) if r.id == first.id else r for r in m.rows]
    bad = Manifest(meta=m.meta, rows=rows, path=m.path)
    cache = open_cache(cpath)
    fake = SimpleNamespace(
        path=cache.path,
        classes=cache.classes,
        ids=cache.ids,
        meta=SimpleNamespace(manifest_fingerprint=bad.fingerprint),
    )
    with pytest.raises(UserError, match=rf"labeled image '{first.id}' has label = null"):
        check_inputs(bad, fake, 0.5, 0)
