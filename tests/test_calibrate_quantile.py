"""The exact conformal quantile: two streaming passes equal a plain sort."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from calibrate import quantile as Q


def numpy_qhat(scores: np.ndarray, alpha: float, rank: int | None = None) -> np.float32:
    """The definition, on all scores at once: the rank-th smallest, 1 if rank > n."""
    s = np.sort(np.asarray(scores, np.float32).ravel())
    r = rank if rank is not None else Q.conformal_rank(s.size, alpha)
    return np.float32(1.0) if r > s.size else s[r - 1]


def chunks_of(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.integers(0, x.size + 1, size=5))
    return np.split(x, cuts)


@pytest.mark.parametrize(
    ("n", "alpha", "rank"),
    [
        (99, 0.1, 90),  # 100 * 0.9 = 90.00000000000001 in floats; the exact rank is 90
        (19, 0.05, 19),
        (9, 0.1, 9),
        (1, 0.5, 1),
        (1, 0.05, 2),  # rank > n: q̂ = 1
        (0, 0.1, 1),
        (1000, 0.05, 951),
    ],
)
def test_conformal_rank_exact(n: int, alpha: float, rank: int) -> None:
    assert Q.conformal_rank(n, alpha) == rank


def test_sort_keys_order_matches_float_order() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(0, 1, 1000).astype(np.float32),
            np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e-40, -1e-40], np.float32),
        ]
    )
    k = Q.sort_keys(x)
    assert k.dtype == np.uint64 and int(k.max()) < 2**32
    np.testing.assert_array_equal(np.sort(x), Q.keys_to_float(np.sort(k)))
    # -0.0 and 0.0 get the same key
    assert (
        Q.sort_keys(np.array([-0.0], np.float32))[0] == Q.sort_keys(np.array([0.0], np.float32))[0]
    )


@pytest.mark.parametrize(
    "case", ["continuous", "ties", "all_equal", "one_bin", "zeros_ones", "large"]
)
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.5, 0.9])
def test_exact_quantile_equals_numpy(case: str, alpha: float) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{case}-{alpha}".encode()))
    if case == "continuous":
        x = rng.beta(0.5, 3.0, size=3001).astype(np.float32)
    elif case == "ties":
        x = rng.choice(np.array([0.0, 0.125, 0.5, 0.75, 1.0], np.float32), size=2000)
    elif case == "all_equal":
        x = np.full(777, 0.3, np.float32)
    elif case == "one_bin":  # values that differ only in the low 16 bits of their keys
        base = np.float32(0.4).view(np.uint32) & np.uint32(0xFFFF0000)
        x = (base + rng.integers(0, 2**16, 500).astype(np.uint32)).view(np.float32)
    elif case == "zeros_ones":
        x = rng.choice(np.array([0.0, 1.0], np.float32), size=101)
    else:
        x = rng.random(200_000, dtype=np.float32)
    chunks = chunks_of(x, rng)
    got = Q.exact_quantile(chunks, alpha)
    assert got.dtype == np.float32
    assert got == numpy_qhat(x, alpha)
    assert got == Q.small_quantile(x, alpha)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 19, 20])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_tiny_n_and_rank_beyond_n(n: int, alpha: float) -> None:
    rng = np.random.default_rng(n)
    x = rng.random(n, dtype=np.float32) * np.float32(0.5)
    got = Q.exact_quantile([x[:1], x[1:]], alpha)
    r = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    expect = np.float32(1.0) if r > n else np.sort(x)[r - 1]
    assert got == expect
    if r > n:  # all scores are ≤ 0.5, so 1.0 can only come from the rank > n rule
        assert got == np.float32(1.0)


def test_empty_input_gives_one() -> None:
    assert Q.exact_quantile([np.zeros(0, np.float32)], 0.1) == np.float32(1.0)


def test_grouped_passes_match_per_group_sort() -> None:
    """Class-conditional quantiles: one pass 1 and one pass 2 for every group at once."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, size=4000)
    s = (rng.random(4000) ** (1 + y)).astype(np.float32)
    s[y == 4] = np.float32(0.25)  # a group made of ties only
    keep = (y != 3) | (rng.random(4000) < 0.002)  # group 3 is tiny: rank > n
    s, y = s[keep], y[keep]
    parts = np.array_split(np.arange(s.size), 7)
    c1 = Q.Counts.empty()
    for p in parts:
        c1 = c1 + Q.high_counts(Q.sort_keys(s[p]), y[p])
    alpha = 0.1
    locs = {g: Q.locate(c1, g, Q.conformal_rank(Q.group_total(c1, g), alpha)) for g in range(5)}
    targets = np.array(sorted({v[0] for v in locs.values() if v}), np.uint64)
    c2 = Q.Counts.empty()
    for p in reversed(parts):  # order does not matter
        c2 = c2 + Q.low_counts(Q.sort_keys(s[p]), y[p], targets)
    for g in range(5):
        got = np.float32(1.0) if locs[g] is None else Q.finish(c2, targets, *locs[g])
        assert got == numpy_qhat(s[y == g], alpha), g
    assert Q.group_total(c1, 3) == int((y == 3).sum())


def test_counts_addition_is_order_free() -> None:
    rng = np.random.default_rng(1)
    parts = [Q.Counts.of(rng.integers(0, 50, 100).astype(np.uint64)) for _ in range(6)]
    a = Q.Counts.empty()
    for p in parts:
        a = a + p
    b = Q.Counts.empty()
    for p in reversed(parts):
        b = p + b
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.total() == 600
