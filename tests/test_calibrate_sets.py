"""Scores, prediction sets and the pseudo-label rule on hand-made pixels."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate import sets as S


def px(*probs: list[float]) -> np.ndarray:
    """Pixels given as probability lists → float32 (K, 1, n)."""
    return np.array(probs, np.float32).T[:, None, :]


def test_lac_scores() -> None:
    p = px([0.5, 0.3, 0.2])
    np.testing.assert_allclose(S.class_scores(p, "lac")[:, 0, 0], [0.5, 0.7, 0.8], atol=1e-7)


def test_aps_scores_including_ties() -> None:
    p = px([0.5, 0.3, 0.2], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8])
    s = S.class_scores(p, "aps")[:, 0, :].T
    np.testing.assert_allclose(s[0], [0.5, 0.8, 1.0], atol=1e-6)
    np.testing.assert_allclose(s[1], [1.0, 0.4, 0.8], atol=1e-6)  # tie: lower index ranks first
    np.testing.assert_allclose(s[2], [0.9, 1.0, 0.8], atol=1e-6)


def test_true_class_scores_skip_ignore_and_match_class_scores() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(5, 6)).astype(np.float32).transpose(2, 0, 1)
    lab = rng.integers(0, 4, size=(5, 6)).astype(np.uint8)
    lab[0, :3] = 255
    for score in ("lac", "aps"):
        s, y = S.true_class_scores(p, lab, score)
        valid = lab != 255
        assert s.size == valid.sum() and s.dtype == np.float32
        np.testing.assert_array_equal(y, lab[valid])
        full = S.class_scores(p, score)
        np.testing.assert_array_equal(s, full[lab[valid], *np.nonzero(valid)])


@pytest.mark.parametrize(
    ("probs", "q", "bg", "expect"),
    [
        # background and cat share the set: the rule picks cat; without it, background
        ([0.5, 0.3, 0.2], 0.75, 0, 1),
        ([0.5, 0.3, 0.2], 0.75, None, 0),
        # only background in the set
        ([0.9, 0.06, 0.04], 0.5, 0, 0),
        # empty set → ignore
        ([0.4, 0.35, 0.25], 0.5, 0, 255),
        # background with two foreground classes: the more probable foreground
        ([0.4, 0.25, 0.35], 0.8, 0, 2),
        # foreground only: most probable in set
        ([0.1, 0.5, 0.4], 0.65, 0, 1),
        # a tie between two foreground classes goes to the lower index
        ([0.2, 0.4, 0.4], 0.7, 0, 1),
        # background is not class 0
        ([0.3, 0.6, 0.1], 0.8, 1, 0),
    ],
)
def test_pseudo_label_rule(probs: list[float], q: float, bg: int | None, expect: int) -> None:
    p = px(probs)
    sets = S.prediction_sets(p, np.full(3, q, np.float32), "lac")
    assert S.pseudo_label(p, sets, bg)[0, 0] == expect


@pytest.mark.parametrize(
    ("probs", "q", "max_size", "expect"),
    [
        ([0.5, 0.3, 0.2], 0.75, 0, 1),  # no limit: the paper's rule (set {bg, cat} → cat)
        ([0.5, 0.3, 0.2], 0.75, 2, 1),  # set of 2 kept under a limit of 2
        ([0.5, 0.3, 0.2], 0.75, 1, 255),  # ... dropped under a limit of 1
        ([0.9, 0.06, 0.04], 0.5, 1, 0),  # singleton kept
        ([0.4, 0.35, 0.25], 0.5, 1, 255),  # empty stays 255
    ],
)
def test_max_set_size(probs: list[float], q: float, max_size: int, expect: int) -> None:
    p = px(probs)
    sets = S.prediction_sets(p, np.full(3, q, np.float32), "lac")
    assert S.pseudo_label(p, sets, 0, max_size)[0, 0] == expect


def test_class_wise_thresholds() -> None:
    p = px([0.5, 0.3, 0.2])
    # cat's threshold admits it (0.7 ≤ 0.72), background's does not (0.5 > 0.45)
    sets = S.prediction_sets(p, np.array([0.45, 0.72, 0.1], np.float32), "lac")
    assert sets[:, 0, 0].tolist() == [False, True, False]
    assert S.pseudo_label(p, sets, 0)[0, 0] == 1


def test_set_membership_boundary_is_inclusive() -> None:
    p = px([0.75, 0.25])
    q = S.class_scores(p, "lac")[1, 0, 0]  # exactly cat's score
    sets = S.prediction_sets(p, np.array([q, q], np.float32), "lac")
    assert sets[:, 0, 0].tolist() == [True, True]


def test_threshold_and_raw_labels() -> None:
    p = px([0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33])
    assert S.raw_label(p)[0].tolist() == [0, 1, 0]
    assert S.threshold_label(p, 0.5)[0].tolist() == [0, 1, 255]
    assert S.threshold_label(p, 0.6)[0].tolist() == [255, 1, 255]


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_prediction_sets_agree_with_scores(score: str) -> None:
    """Membership is exactly "class score ≤ q̂_j", including p = 0, p = 1 and q̂ = 0 or 1."""
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(4) * 0.3, size=(20, 30)).astype(np.float32).transpose(2, 0, 1)
    p[:, 0, :4] = np.eye(4, dtype=np.float32)  # one-hot pixels: p = 1 and p = 0
    s = S.class_scores(p, score)
    for q in (np.zeros(4), np.ones(4), np.array([0.1, 0.5, 0.9, 0.3]), s[:, 3, 3]):
        q = q.astype(np.float32)
        np.testing.assert_array_equal(S.prediction_sets(p, q, score), s <= q[:, None, None])


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("bg", [None, 0, 3])
def test_pseudo_label_against_a_pixel_loop(score: str, bg: int | None) -> None:
    """Class-wise thresholds (sets not monotone in p), APS, exact ties, size limits: the
    vectorised rule equals the rule written out pixel by pixel."""
    rng = np.random.default_rng(17)
    k = 7
    p = rng.dirichlet(np.ones(k) * 0.4, size=(12, 15)).astype(np.float32).transpose(2, 0, 1)
    p[:, 0, :7] = np.round(p[:, 0, :7] * 8) / 8  # ties
    p[3, 1] = p[5, 1]
    for q, one in (
        (rng.choice([0.3, 0.6, 0.9, 0.97, 1.0], size=k).astype(np.float32), False),
        (np.full(k, 0.8, np.float32), True),  # one q̂: the unmasked search
        (np.full(k, 0.8, np.float32), False),
    ):
        _check_against_loop(p, S.prediction_sets(p, q, score), bg, one)
    assert (S.raw_label(p) == p.argmax(axis=0)).all()


def _check_against_loop(p: np.ndarray, sets: np.ndarray, bg: int | None, one: bool) -> None:
    k = p.shape[0]
    for m in (0, 1, 2):
        got = S.pseudo_label(p, sets, bg, m, one)
        for yy, xx in np.ndindex(*p.shape[1:]):
            members = [c for c in range(k) if sets[c, yy, xx]]
            fg = [c for c in members if c != bg]
            pick = fg or ([bg] if bg in members else [])
            want = max(pick, key=lambda c: (p[c, yy, xx], -c)) if pick else 255
            if m and len(members) > m:
                want = 255
            assert got[yy, xx] == want, (yy, xx, members)
