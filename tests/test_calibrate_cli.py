"""``python -m calibrate run`` end to end on tiny datasets: q̂, PNGs, re-runs, clusters, errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from _calibrate_fixtures import make_dataset
from typer.testing import CliRunner

from annotate import open_cache
from annotate.cache import CacheMeta, create_or_open
from calibrate.cli import app
from calibrate.config import CalibrateConfig
from calibrate.quantile import conformal_rank
from data_manifest import load
from data_manifest.config import load_config, parse_section
from data_manifest.io import read_label_png, write_label_png

runner = CliRunner()


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("cal") / "ds", topk=2)


def invoke(mpath: Path, cpath: Path, out: Path, *args: str, plots: bool = False) -> object:
    return runner.invoke(
        app,
        [
            "run",
            "--manifest",
            str(mpath),
            "--cache",
            str(cpath),
            "--out-dir",
            str(out),
            "--quiet",
            "--plots" if plots else "--no-plots",
            *args,
        ],
    )


def pngs(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*.png"))
        if "plots" not in p.parts
    }


def labeled_scores(
    mpath: Path, cpath: Path, ids: list[str] | None = None, score: str = "lac"
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Independent computation of the calibration scores: per pixel loops in plain numpy."""
    m, cache = load(mpath), open_cache(cpath)
    rows = [r for r in m.split("labeled") if ids is None or r.id in ids]
    all_s, all_y, per_image = [], [], []
    for r in rows:
        p = cache.probs(r.id).astype(np.float64)
        lab = m.read_label(r)
        valid = lab != 255
        pv, yv = p[:, valid], lab[valid].astype(int)
        if score == "lac":
            s = np.float32(1) - p[:, valid][yv, np.arange(yv.size)].astype(np.float32)
        else:
            s = np.empty(yv.size, np.float32)
            for j in range(yv.size):
                col = pv[:, j].astype(np.float32)
                order = sorted(range(col.size), key=lambda c, col=col: (-col[c], c))
                acc = np.float32(0)
                for c in order:
                    acc = np.float32(acc + col[c])
                    if c == yv[j]:
                        break
                s[j] = 0.0 if yv[j] == order[0] else min(acc, np.float32(1))  # argmax: 0
        all_s.append(s.astype(np.float32))
        all_y.append(yv)
        per_image.append(s.astype(np.float32))
    return np.concatenate(all_s), np.concatenate(all_y), per_image


def expected_pseudo(p: np.ndarray, q: float, bg: int = 0) -> np.ndarray:
    """The paper's rule, pixel by pixel: LAC set, then the most probable foreground class in it,
    else background if in it, else 255."""
    inset = (np.float32(1) - p) <= np.float32(q)
    expect = np.full(p.shape[1:], 255, np.uint8)
    for yy, xx in np.ndindex(*p.shape[1:]):
        cand = [c for c in range(p.shape[0]) if inset[c, yy, xx] and c != bg]
        if not cand and inset[bg, yy, xx]:
            cand = [bg]
        if cand:
            expect[yy, xx] = max(cand, key=lambda c: (p[c, yy, xx], -c))
    return expect


def np_qhat(s: np.ndarray, alpha: float) -> float:
    r = conformal_rank(s.size, alpha)
    return 1.0 if r > s.size else float(np.sort(s)[r - 1])


def test_pixel_mode_qhat_and_pngs(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, cpath = ds
    out = tmp_path / "cp"
    res = invoke(mpath, cpath, out, "--alpha", "0.1", plots=True)
    assert res.exit_code == 0, res.output
    cal = json.loads((out / "calibration.json").read_text())
    s, _, _ = labeled_scores(mpath, cpath)
    q = np_qhat(s, 0.1)
    assert cal["qhat"] == q
    assert cal["calibration"]["pixels"] == s.size
    assert cal["calibration"]["images"] == 6
    m, cache = load(mpath), open_cache(cpath)
    unl = m.split("unlabeled")
    assert sorted(pngs(out)) == sorted(f"{r.id}.png" for r in unl)
    assert (out / "sub u000.png").is_file()  # an id is the file name, as it is
    kept = 0
    for r in unl:
        expect = expected_pseudo(cache.probs(r.id), q)
        got = read_label_png(out / f"{r.id}.png")
        np.testing.assert_array_equal(got, expect)
        kept += int((expect != 255).sum())
    assert cal["unlabeled"]["kept_pixels"] == kept
    for name in ("coverage_vs_alpha", "per_class_coverage", "kept_fraction", "overlays"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    # the resolved config feeds back
    cfg = load_config(out / "config.toml")
    conf = parse_section(cfg, "calibrate", CalibrateConfig)
    assert conf.alpha == 0.1 and conf.out_dir == str(out)


def test_held_out_figures_use_the_calibration_part(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, cpath = ds
    out = tmp_path / "cp"
    assert invoke(mpath, cpath, out, "--alpha", "0.2", "--seed", "3").exit_code == 0
    cal = json.loads((out / "calibration.json").read_text())
    ho = cal["held_out"]
    m = load(mpath)
    labeled = sorted(r.id for r in m.split("labeled"))
    assert ho["images"] == 3
    perm = np.random.default_rng(3).permutation(len(labeled))
    held = {labeled[i] for i in perm[:3]}
    s_cal, _, _ = labeled_scores(mpath, cpath, [i for i in labeled if i not in held])
    q_cal = np_qhat(s_cal, 0.2)
    assert ho["qhat"] == q_cal
    s_h, y_h, _ = labeled_scores(mpath, cpath, held)
    assert ho["pixels"] == s_h.size
    assert ho["coverage"] == round(float((s_h <= q_cal).mean()), 6)
    # per image: the spread, and the image-level interval around the pooled figure
    _, _, per = labeled_scores(mpath, cpath, sorted(held))
    cov_i = np.array([(v <= q_cal).mean() for v in per])
    spread = ho["coverage_per_image"]
    assert spread["images"] == 3 and spread["median"] == round(float(np.median(cov_i)), 6)
    assert spread["p05"] == round(float(np.percentile(cov_i, 5)), 6)
    assert spread["min"] == round(float(cov_i.min()), 6)
    assert spread["images_below_target"] == int((cov_i < 0.8).sum())
    lo, hi = ho["coverage_interval_95"]
    assert lo < ho["coverage"] < hi or ho["coverage"] == 1.0
    for k, name in enumerate(cal["classes"]):
        sel = y_h == k
        exp = round(float((s_h[sel] <= q_cal).mean()), 6) if sel.any() else None
        assert ho["coverage_per_class"][name] == exp
    cache = open_cache(cpath)
    kept = correct = raw = 0
    for i in held:
        p, lab = cache.probs(i), m.read_label(m.row(i))
        v = lab != 255
        pl = expected_pseudo(p, q_cal)[v]
        kept += int((pl != 255).sum())
        correct += int((pl == lab[v]).sum())
        raw += int((p.argmax(axis=0)[v] == lab[v]).sum())
    assert ho["kept_fraction"] == round(kept / s_h.size, 6)
    assert ho["kept_accuracy"] == round(correct / kept, 6)
    assert ho["raw_accuracy"] == round(raw / s_h.size, 6)
    # val figures use the q̂ of all labeled images
    assert cal["val"]["images"] == 3


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_class_and_image_modes(ds: tuple[Path, Path], tmp_path: Path, score: str) -> None:
    mpath, cpath = ds
    s, y, per_image = labeled_scores(mpath, cpath, score=score)
    res = invoke(
        mpath,
        cpath,
        tmp_path / "c",
        "--mode",
        "class",
        "--class-min-pixels",
        "400",
        "--score",
        score,
        "--method",
        "raw",
    )
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "c" / "calibration.json").read_text())["qhat"]
    names = load(mpath).classes
    pooled = np_qhat(s, 0.05)
    assert q["pooled"] == pooled
    for k, name in enumerate(names):
        n_k = int((y == k).sum())
        assert q["own"][name] == (n_k >= 400)
        assert q["per_class"][name] == (np_qhat(s[y == k], 0.05) if n_k >= 400 else pooled)
    res = invoke(
        mpath,
        cpath,
        tmp_path / "i",
        "--mode",
        "image",
        "--score",
        score,
        "--alpha",
        "0.3",
        "--method",
        "raw",
    )
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "i" / "calibration.json").read_text())["qhat"]
    # image score: the ⌈m(1−α)⌉-th smallest pixel score; q̂ over the 6 images: rank 5
    img = np.array(
        [np.sort(v)[int(np.ceil(v.size * 0.7 - 1e-9)) - 1] for v in per_image], np.float32
    )
    assert q == float(np.sort(img)[conformal_rank(6, 0.3) - 1])


def test_max_set_size_drops_large_sets_and_threshold_matches_it(
    ds: tuple[Path, Path], tmp_path: Path
) -> None:
    mpath, cpath = ds
    m, cache = load(mpath), open_cache(cpath)
    res = invoke(mpath, cpath, tmp_path / "cp1", "--alpha", "0.1", "--max-set-size", "1")
    assert res.exit_code == 0, res.output
    cal = json.loads((tmp_path / "cp1" / "calibration.json").read_text())
    q = cal["qhat"]
    kept = 0
    for r in m.split("unlabeled"):
        p = cache.probs(r.id)
        expect = expected_pseudo(p, q)
        expect[((np.float32(1) - p) <= np.float32(q)).sum(axis=0) > 1] = 255
        np.testing.assert_array_equal(read_label_png(tmp_path / "cp1" / f"{r.id}.png"), expect)
        kept += int((expect != 255).sum())
    assert cal["unlabeled"]["kept_pixels"] == kept and cal["max_set_size"] == 1
    res = invoke(
        mpath,
        cpath,
        tmp_path / "thr",
        "--method",
        "threshold",
        "--alpha",
        "0.1",
        "--max-set-size",
        "1",
    )
    thr = json.loads((tmp_path / "thr" / "calibration.json").read_text())["unlabeled"]
    assert thr["threshold_matched_to_cp_kept_pixels"] == kept


def top1_lower(cache: object, image_id: str) -> np.ndarray:
    """float32 (n,): lower bound of the top-1 probability of a top-k entry."""
    v = cache.stored(image_id)["topk_prob"][0].ravel()
    return v.astype(np.float32) - np.spacing(v).astype(np.float32) / 2


def test_raw_and_threshold_methods(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, cpath = ds
    m, cache = load(mpath), open_cache(cpath)
    unl = m.split("unlabeled")
    assert invoke(mpath, cpath, tmp_path / "raw", "--method", "raw").exit_code == 0
    for r in unl:
        np.testing.assert_array_equal(
            read_label_png(tmp_path / "raw" / f"{r.id}.png"), cache.argmax(r.id)
        )
    assert invoke(mpath, cpath, tmp_path / "cp", "--alpha", "0.3").exit_code == 0
    cp = json.loads((tmp_path / "cp" / "calibration.json").read_text())["unlabeled"]
    res = invoke(mpath, cpath, tmp_path / "thr", "--method", "threshold", "--alpha", "0.3")
    assert res.exit_code == 0, res.output
    thr = json.loads((tmp_path / "thr" / "calibration.json").read_text())["unlabeled"]
    # top-k entries: the threshold compares the lower end of the stored float16 top-1's
    # rounding step (so that a matched τ never falls inside a step)
    maxp = np.concatenate([top1_lower(cache, r.id) for r in unl])
    n_cp = cp["kept_pixels"]
    assert 0 < n_cp < maxp.size
    assert thr["threshold_matched_to_cp_kept_pixels"] == n_cp
    tau = float(np.sort(maxp)[maxp.size - n_cp])  # the n_cp-th largest max-probability
    assert thr["threshold"] == tau
    assert thr["kept_pixels"] == int((maxp >= np.float32(tau)).sum()) >= n_cp
    res = invoke(mpath, cpath, tmp_path / "thr2", "--method", "threshold", "--threshold", "0.9")
    thr2 = json.loads((tmp_path / "thr2" / "calibration.json").read_text())["unlabeled"]
    assert thr2["threshold"] == 0.9 and thr2["kept_pixels"] == int((maxp >= 0.9).sum())


def test_rerun_rewrites_nothing_and_recovers_from_a_kill(
    ds: tuple[Path, Path], tmp_path: Path
) -> None:
    mpath, cpath = ds
    out = tmp_path / "cp"
    assert invoke(mpath, cpath, out).exit_code == 0
    first = pngs(out)
    js = (out / "calibration.json").read_bytes()
    mtimes = {p: (out / p).stat().st_mtime_ns for p in first}
    assert invoke(mpath, cpath, out).exit_code == 0
    assert pngs(out) == first
    assert {p: (out / p).stat().st_mtime_ns for p in first} == mtimes
    assert (out / "calibration.json").read_bytes() == js
    run = json.loads((out / "run.json").read_text())
    assert run["rewritten"] == 0 and run["removed_temporaries"] == run["removed_orphans"] == 0
    # a killed run (of a manifest with two more unlabeled ids): one PNG missing, one
    # half-written temporary, one stale; PNGs of ids that are no longer unlabeled, listed in
    # the marker it left; and a PNG the user put there, which is not calibrate's to remove
    victims = sorted(first)
    (out / victims[0]).unlink()
    v1 = out / victims[1]
    (v1.parent / f".{v1.name}.x.png.tmp").write_bytes(b"partial")
    (out / ".calibration.json.y.tmp").write_bytes(b"{")
    write_label_png(out / victims[2], np.zeros((24, 32), np.uint8), [[0, 0, 0]])
    write_label_png(out / "gone.png", np.zeros((24, 32), np.uint8), [[0, 0, 0]])
    write_label_png(out / "old.png", np.zeros((24, 32), np.uint8), [[0, 0, 0]])
    ids = [p.removesuffix(".png") for p in first]
    marker = {"pngs": [*ids, "gone", "old"]}
    (out / "calibration.incomplete").write_text(json.dumps(marker))
    (out / "notes.png").write_bytes(b"the user's")
    res = runner.invoke(
        app,
        ["run", "--manifest", str(mpath), "--cache", str(cpath), "--out-dir", str(out)]
        + ["--no-plots"],
    )
    assert res.exit_code == 0, res.output
    assert "stale temporaries removed" in res.output and "orphan PNGs removed" in res.output
    assert (out / "notes.png").read_bytes() == b"the user's"
    (out / "notes.png").unlink()
    assert pngs(out) == first
    assert (out / "calibration.json").read_bytes() == js
    run = json.loads((out / "run.json").read_text())
    assert run["rewritten"] == 2
    assert run["removed_temporaries"] == 2 and run["removed_orphans"] == 2
    assert not (out / "old.png").exists() and not list(out.rglob("*.tmp"))


def test_refuses_a_foreign_non_empty_out_dir(ds: tuple[Path, Path], tmp_path: Path) -> None:
    """Orphan clean-up only ever runs in folders calibrate wrote."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "photo.png").write_bytes(b"not ours")
    res = invoke(*ds, out)
    assert res.exit_code == 1
    assert "mine: holds files that python -m calibrate run did not write" in res.output
    assert (out / "photo.png").read_bytes() == b"not ours"


@pytest.mark.slow
def test_local_cluster_gives_identical_bytes(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, cpath = ds
    loose = ("--topk-undetermined-max", "1")  # class mode leaves a few top-k pixels open
    res = invoke(mpath, cpath, tmp_path / "t", "--mode", "class", "--batch", "2", *loose)
    assert res.exit_code == 0, res.output
    res = invoke(
        mpath,
        cpath,
        tmp_path / "p",
        *loose,
        "--mode",
        "class",
        "--batch",
        "3",
        "--scheduler",
        "processes",
        "--workers",
        "2",
    )
    assert res.exit_code == 0, res.output
    assert pngs(tmp_path / "t") == pngs(tmp_path / "p")
    a = json.loads((tmp_path / "t" / "calibration.json").read_text())
    b = json.loads((tmp_path / "p" / "calibration.json").read_text())
    assert a == b


@pytest.mark.slow
def test_joins_a_running_cluster_by_address(ds: tuple[Path, Path], tmp_path: Path) -> None:
    """A real 2-worker LocalCluster on loopback, joined with --scheduler tcp://HOST:PORT."""
    import logging

    from distributed import LocalCluster

    mpath, cpath = ds
    assert invoke(mpath, cpath, tmp_path / "t", "--method", "threshold").exit_code == 0
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        res = invoke(mpath, cpath, tmp_path / "c", "--method", "threshold", "--scheduler", address)
        assert res.exit_code == 0, res.output
    assert pngs(tmp_path / "t") == pngs(tmp_path / "c")
    a = (tmp_path / "t" / "calibration.json").read_bytes()
    assert a == (tmp_path / "c" / "calibration.json").read_bytes()


# -- bad input: one line naming file and field, exit 1, nothing written ----------------------


def assert_user_error(res: object, out: Path, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    msg = res.output.strip()
    assert msg.startswith("error:") and "Traceback" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert not out.exists()


@pytest.mark.parametrize("alpha", ["0", "1", "1.5", "-0.1"])
def test_alpha_out_of_range(ds: tuple[Path, Path], tmp_path: Path, alpha: str) -> None:
    out = tmp_path / "o"
    assert_user_error(invoke(*ds, out, "--alpha", alpha), out, "--alpha = ", "(0, 1)")


def test_alpha_out_of_range_in_config(ds: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[calibrate]\nalpha = 2.0\n")
    out = tmp_path / "o"
    res = runner.invoke(
        app, ["run", "--config", str(cfg), "--manifest", str(ds[0]), "--out-dir", str(out)]
    )
    assert_user_error(res, out, str(cfg), "alpha = 2.0", "expected a number in (0, 1)")


def test_no_labeled_images_in_cache(tmp_path: Path) -> None:
    mpath, cpath = make_dataset(tmp_path / "d", cache_splits=("unlabeled",))
    out = tmp_path / "o"
    assert_user_error(invoke(mpath, cpath, out), out, str(cpath), "no labeled images")


def test_missing_images(tmp_path: Path) -> None:
    mpath, cpath = make_dataset(tmp_path / "d", cache_splits=("labeled", "val"))
    out = tmp_path / "o"
    assert_user_error(
        invoke(mpath, cpath, out), out, "5 of 5 unlabeled images are missing", "'sub u000'"
    )


def test_cache_from_another_dataset(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, _ = ds
    _, other = make_dataset(tmp_path / "d", seed=5, n_labeled=4)
    out = tmp_path / "o"
    assert_user_error(
        invoke(mpath, other, out),
        out,
        str(other),
        "manifest_fingerprint",
        "expected a cache made from this manifest",
    )


def test_cache_with_other_classes(ds: tuple[Path, Path], tmp_path: Path) -> None:
    mpath, _ = ds
    m = load(mpath)
    bad = tmp_path / "bad.zarr"
    create_or_open(
        bad,
        CacheMeta(
            classes=("a", "b", "c", "d"),
            annotator="x",
            model_sha256="0",
            manifest_fingerprint=m.fingerprint,
            normalization="softmax",
        ),
    )
    out = tmp_path / "o"
    assert_user_error(
        invoke(mpath, bad, out),
        out,
        str(bad),
        "classes",
        "'background'",
        "expected a cache annotated with this manifest's class list",
    )


def test_label_value_outside_classes(tmp_path: Path) -> None:
    mpath, cpath = make_dataset(tmp_path / "d")
    m = load(mpath)
    row = m.split("labeled")[2]
    lab = m.read_label(row)
    lab[5, 5] = 7
    write_label_png(m.label_path(row), lab, m.palette)
    out = tmp_path / "o"
    assert_user_error(
        invoke(mpath, cpath, out),
        out,
        f"{row.id}.png",
        "label value 7",
        "expected class ids 0..3 or 255",
    )


def test_bad_mode_and_scheduler(ds: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert_user_error(
        invoke(*ds, out, "--mode", "region"), out, "mode = 'region'", "'pixel', 'class', 'image'"
    )
    assert_user_error(invoke(*ds, out, "--scheduler", "mpi"), out, "scheduler = 'mpi'")


def test_resolved_config_is_toml(ds: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert invoke(*ds, out, "--threshold", "0.8", "--method", "threshold").exit_code == 0
    data = tomllib.loads((out / "config.toml").read_text())
    assert data["calibrate"]["threshold"] == 0.8
    assert data["data"]["manifest"] == str(ds[0])


def test_config_file_drives_the_run(ds: tuple[Path, Path], tmp_path: Path) -> None:
    """[data] manifest, [calibrate] keys and run_dir from a config; no held-out part."""
    mpath, cpath = ds
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'run_dir = "{tmp_path / "run"}"\nseed = 1\n[data]\nmanifest = "{mpath}"\n'
        f'[calibrate]\nalpha = 0.2\nheld_out_fraction = 0.0\nplots = false\ncache = "{cpath}"\n'
    )
    res = runner.invoke(app, ["run", "--config", str(cfg), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run" / "pseudo" / "cp"
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["held_out"] is None and cal["val"]["images"] == 3
    s, _, _ = labeled_scores(mpath, cpath)
    assert cal["qhat"] == np_qhat(s, 0.2)
    assert len(pngs(out)) == 5 and not (out / "plots").exists()
