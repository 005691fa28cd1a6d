"""The same data through a full cache and a top-k cache: the same pseudo-label PNGs (≥ 99.9 %
of pixels, the rest 255 and counted), for every mode, score and rule, or a one-line refusal."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from _calibrate_fixtures import make_dataset
from typer.testing import CliRunner

from calibrate.cli import app
from data_manifest import load
from data_manifest.io import read_label_png

runner = CliRunner()
IDENTICAL = 0.999
PIXELS = 8 * 40 * 48  # unlabeled pixels of a pair (see pair)
CLASSES_10 = ["background", *(f"c{i}" for i in range(1, 10))]


def pair(root: Path, topk: int, **kw: object) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """(full cache dataset, top-k cache dataset): same seed, so the same scores."""
    opts = dict(n_labeled=6, n_unlabeled=8, n_val=0, h=40, w=48, seed=4, smooth=6, **kw)
    return make_dataset(root / "full", topk=0, **opts), make_dataset(
        root / "topk", topk=topk, **opts
    )


@pytest.fixture(scope="module")
def k4(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return pair(tmp_path_factory.mktemp("k4"), topk=2)


@pytest.fixture(scope="module")
def k10(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return pair(tmp_path_factory.mktemp("k10"), topk=2, classes=CLASSES_10)


def calibrate(ds: tuple[Path, Path], out: Path, *args: str) -> object:
    return runner.invoke(
        app,
        ["run", "--manifest", str(ds[0]), "--cache", str(ds[1]), "--out-dir", str(out)]
        + ["--quiet", "--no-plots", "--held-out-fraction", "0", "--class-min-pixels", "50"]
        + list(args),
    )


def agreement(pair_: tuple, tmp: Path, args: tuple[str, ...]) -> tuple[float, int] | None:
    """(fraction of identical pixels, undetermined pixels reported), or None when the top-k
    run refused with one line because too many pixels would be undetermined."""
    full, topk = pair_
    a, b = tmp / "a", tmp / "b"
    res = calibrate(full, a, *args)
    assert res.exit_code == 0, (args, res.output)
    res = calibrate(topk, b, *args)
    if res.exit_code == 1:
        msg = res.output.strip()
        assert msg.startswith("error:") and len(msg.splitlines()) == 1, msg
        assert "cannot be labeled exactly from the top 2 classes" in msg, msg
        assert "topk_undetermined_max" in msg and not b.exists()
        return None
    assert res.exit_code == 0, (args, res.output)
    m = load(full[0])
    same = total = 0
    for r in m.split("unlabeled"):
        la, lb = read_label_png(a / f"{r.id}.png"), read_label_png(b / f"{r.id}.png")
        same += int((la == lb).sum())
        total += la.size
    rep = json.loads((b / "calibration.json").read_text())["unlabeled"]
    assert json.loads((a / "calibration.json").read_text())["unlabeled"]["undetermined_pixels"] == 0
    return same / total, rep["undetermined_pixels"]


GRID = list(
    itertools.product(
        ["pixel", "class", "image"],
        ["lac", "aps"],
        ["prefer_foreground", "most_probable"],
        ["0", "1", "2"],
    )
)


def check_grid(pair_: tuple, tmp: Path, alphas: tuple[str, ...]) -> None:
    bad, refused = [], []
    for (mode, score, rule, m), alpha in itertools.product(GRID, alphas):
        args = ("--mode", mode, "--score", score, "--background-rule", rule)
        args += ("--max-set-size", m, "--alpha", alpha)
        got = agreement(pair_, tmp / "-".join(args), args)
        if got is None:
            refused.append(args)
            # LAC with one q̂ and no size limit: k = 2 decides every label (calibrate.topk) but
            # within float16 rounding of q̂, which is rare: never refused
            assert mode == "class" or m != "0" or score == "aps", args
        elif got[0] < IDENTICAL:
            bad.append((args, round(got[0], 5)))
    for method in ("raw", "threshold"):
        got = agreement(pair_, tmp / method, ("--method", method, "--alpha", alphas[0]))
        assert got is not None and got[1] == 0
        if got[0] < IDENTICAL:
            bad.append((method, round(got[0], 5)))
    assert not bad, bad


@pytest.mark.slow
def test_every_mode_score_and_rule_k4(k4: tuple, tmp_path: Path) -> None:
    check_grid(k4, tmp_path, ("0.1",))


@pytest.mark.slow
def test_every_mode_score_and_rule_k10(k10: tuple, tmp_path: Path) -> None:
    check_grid(k10, tmp_path, ("0.2",))


@pytest.mark.parametrize(
    "args",
    [
        ("--mode", "pixel", "--alpha", "0.2"),
        ("--mode", "image", "--alpha", "0.2"),
        ("--method", "threshold", "--alpha", "0.1"),
    ],
)
def test_topk_matches_full_cache(k10: tuple, tmp_path: Path, args: tuple[str, ...]) -> None:
    got = agreement(k10, tmp_path, args)
    assert got is not None and got[0] >= IDENTICAL, got


def test_undetermined_pixels_are_255_and_counted(k10: tuple, tmp_path: Path) -> None:
    """Class mode with a size limit leaves pixels open at k = 2: refused by default; accepted
    with a higher limit, each open pixel is 255 and counted, and only those differ from the
    labels of the full cache."""
    args = ("--mode", "class", "--alpha", "0.1", "--max-set-size", "1")
    assert agreement(k10, tmp_path / "strict", args) is None
    args += ("--topk-undetermined-max", "1")
    frac, unsure = agreement(k10, tmp_path / "loose", args)
    assert unsure > 0
    m = load(k10[1][0])
    differ = n_open_255 = 0
    for r in m.split("unlabeled"):
        la = read_label_png(tmp_path / "loose" / "a" / f"{r.id}.png")
        lb = read_label_png(tmp_path / "loose" / "b" / f"{r.id}.png")
        differ += int((la != lb).sum())
        n_open_255 += int(((lb == 255) & (la != 255)).sum())
    total = sum(r.height * r.width for r in m.split("unlabeled"))
    assert differ == round((1 - frac) * total)
    assert n_open_255 <= unsure  # 255 where the full cache has a label: undetermined pixels
    assert differ - n_open_255 <= 0.001 * total  # elsewhere only float16 rounding


@pytest.fixture(scope="module")
def coarse(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Scores at 1/4 of the image resolution (resized when read); a confident annotator."""
    root = tmp_path_factory.mktemp("coarse")
    return pair(root, topk=2, classes=CLASSES_10, native_scale=4, strength=6.0)


@pytest.mark.parametrize(
    "args",
    [
        ("--mode", "pixel", "--alpha", "0.2"),
        ("--mode", "class", "--alpha", "0.1"),
        ("--mode", "pixel", "--alpha", "0.2", "--max-set-size", "2"),
        ("--method", "threshold", "--alpha", "0.1"),
        ("--method", "raw"),
    ],
)
def test_topk_at_native_resolution(coarse: tuple, tmp_path: Path, args: tuple[str, ...]) -> None:
    """Entries stored at 1/4 of the image's resolution: blended pixels whose label depends on
    classes stored at some neighbours only are open; identical elsewhere, or refused."""
    got = agreement(coarse, tmp_path, args)
    assert got is None or got[0] >= IDENTICAL, got
    loose = agreement(coarse, tmp_path / "loose", (*args, "--topk-undetermined-max", "1"))
    assert loose is not None and (1 - loose[0]) * PIXELS <= loose[1] + 0.001 * PIXELS, loose


def test_aps_on_resized_topk_is_refused(coarse: tuple, tmp_path: Path) -> None:
    out = tmp_path / "o"
    res = calibrate(coarse[1], out, "--score", "aps")
    assert res.exit_code == 1, res.output
    msg = res.output.strip()
    assert msg.startswith("error:") and len(msg.splitlines()) == 1, msg
    assert "score 'aps' cannot be computed exactly" in msg and "resolution" in msg
    assert not out.exists()


def test_labeled_images_stored_as_topk_are_refused(tmp_path: Path) -> None:
    """Calibration needs the true class's score, which a top-k entry may not hold."""
    import numpy as np

    from annotate.cache import CacheWriter
    from data_manifest import load

    mpath, cpath = make_dataset(tmp_path / "d", topk=2, cache_splits=("unlabeled", "val"))
    m, writer = load(mpath), CacheWriter(cpath)
    rng = np.random.default_rng(0)
    for r in m.split("labeled"):
        writer.write(
            r.id,
            rng.normal(size=(4, r.height, r.width)).astype(np.float32),
            r.height,
            r.width,
            topk=True,
        )
    out = tmp_path / "o"
    res = calibrate((mpath, cpath), out)
    assert res.exit_code == 1, res.output
    msg = res.output.strip()
    assert len(msg.splitlines()) == 1 and "is stored as top-k" in msg, msg
    assert "expected full scores for labeled and val images" in msg and not out.exists()
