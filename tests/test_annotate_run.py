"""The annotation run: cache round-trip, refusal, resume, shards, kill-and-resume, bad images,
command line, inspect and show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _annotate_fixtures import (
    CLASSES,
    make_dataset,
    reference_logits,
    save_torchscript,
    tree_bytes,
    write_config,
)
from PIL import Image
from typer.testing import CliRunner

import data_manifest
from annotate import open_cache
from annotate.cache import resize_chw
from annotate.cli import app
from annotate.config import AnnotateConfig, auto_topk
from annotate.run import parse_shard, plan_batches, run_annotation
from data_manifest.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
META = {"classes": CLASSES, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@pytest.fixture
def setup(tmp_path):
    man = make_dataset(tmp_path / "ds")
    model = save_torchscript(tmp_path / "model.pt", meta=META)
    return tmp_path, man, model


def _cfg(model, **kw) -> AnnotateConfig:
    kw.setdefault("batch_size", 2)
    kw.setdefault("device", "cpu")
    return AnnotateConfig(annotator="torch", model=str(model), **kw)


def test_round_trip_probs_equal_model_output(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    res = run_annotation(_cfg(model, topk=0), m, tmp / "c.zarr")
    assert sum(res.annotated.values()) == len(m.rows)
    cache = open_cache(tmp / "c.zarr")
    assert cache.ids == sorted(r.id for r in m.rows)
    assert cache.classes == CLASSES and cache.meta.annotator == "torch"
    assert cache.meta.manifest_fingerprint == m.fingerprint
    for row in m.rows:
        ref = softmax(reference_logits(model, m.read_image(row), META["mean"], META["std"]))
        got = cache.probs(row.id)
        assert got.shape == (3, row.height, row.width) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=4e-3)  # logits stored as float16
        assert cache.info(row.id)["mode"] == "scores"


def test_native_resolution_and_topk_for_unlabeled(setup):
    tmp, man, _ = setup
    model = save_torchscript(tmp / "s2.pt", stride=2, meta=META, seed=3)
    m = data_manifest.load(man)
    run_annotation(_cfg(model, topk=1), m, tmp / "c.zarr")
    cache = open_cache(tmp / "c.zarr")
    assert cache.meta.topk == 1 and auto_topk(3) == 0 and auto_topk(7) == 0 and auto_topk(21) == 4
    for row in m.rows:
        logits = reference_logits(model, m.read_image(row), META["mean"], META["std"])
        ref = resize_chw(softmax(logits), row.height, row.width)
        stored = cache.stored(row.id)
        if row.split == "unlabeled":
            assert cache.info(row.id)["mode"] == "topk"
            assert stored["topk_index"].shape == (1, 10, 14)
            np.testing.assert_array_equal(stored["topk_index"][0], softmax(logits).argmax(0))
            np.testing.assert_allclose(stored["topk_prob"][0], softmax(logits).max(0), atol=1e-3)
            assert cache.probs(row.id).shape == (3, row.height, row.width)
        else:
            assert stored["scores"].shape == (3, 10, 14)  # native: half resolution
            np.testing.assert_allclose(cache.probs(row.id), ref, atol=4e-3)


def test_image_resolution_and_input_size(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    run_annotation(_cfg(model, resolution="image", input_size=(16, 16), topk=0), m, tmp / "c.zarr")
    cache = open_cache(tmp / "c.zarr")
    row = m.split("val")[0]
    img = cv2.resize(m.read_image(row), (16, 16), interpolation=cv2.INTER_LINEAR)
    ref = resize_chw(
        softmax(reference_logits(model, img, META["mean"], META["std"])), row.height, row.width
    )
    assert cache.info(row.id)["mode"] == "probs"
    assert cache.stored(row.id)["scores"].shape == (3, row.height, row.width)
    np.testing.assert_allclose(cache.probs(row.id), ref, atol=2e-3)


def test_mixed_sizes_and_odd_ids(tmp_path):
    sizes = [(12, 16), (16, 12), (12, 16), (9, 9), (12, 16), (16, 12)]
    man = make_dataset(tmp_path / "ds", 2, 2, 2, sizes=sizes, odd_ids=True)
    model = save_torchscript(tmp_path / "m.pt", meta=META)
    m = data_manifest.load(man)
    run_annotation(_cfg(model, batch_size=3, topk=0), m, tmp_path / "c.zarr")
    cache = open_cache(tmp_path / "c.zarr")
    assert set(cache.ids) == {r.id for r in m.rows} and "city #l00%" in cache
    for row in m.rows:
        ref = softmax(reference_logits(model, m.read_image(row), META["mean"], META["std"]))
        np.testing.assert_allclose(cache.probs(row.id), ref, atol=4e-3)


def test_refuses_mismatched_cache(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    run_annotation(_cfg(model, splits=("labeled",)), m, tmp / "c.zarr")
    other = save_torchscript(tmp / "other.pt", meta=META, seed=7)
    with pytest.raises(UserError, match=r"c\.zarr: cache was made with model_sha256 = "):
        run_annotation(_cfg(other), m, tmp / "c.zarr")
    with pytest.raises(
        UserError,
        match=r"cache was made with input_size = \[\], this run has "
        r"\[16, 16\]",
    ):
        run_annotation(_cfg(model, input_size=(16, 16)), m, tmp / "c.zarr")
    m.rows.pop()
    m2 = data_manifest.load(m.save(tmp / "ds" / "smaller.jsonl"))
    with pytest.raises(UserError, match="cache was made with manifest_fingerprint"):
        run_annotation(_cfg(model), m2, tmp / "c.zarr")
    assert len(open_cache(tmp / "c.zarr")) == 3  # nothing damaged


def test_resume_skips_done_images_and_gives_same_bytes(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    run_annotation(_cfg(model, batch_size=3), m, tmp / "full.zarr")
    first = run_annotation(_cfg(model, batch_size=3, splits=("unlabeled",)), m, tmp / "part.zarr")
    assert first.annotated == {"unlabeled": 5}
    again = run_annotation(_cfg(model, batch_size=3), m, tmp / "part.zarr")
    assert again.present_before == {"labeled": 0, "unlabeled": 5, "val": 0}
    assert again.annotated == {"labeled": 3, "unlabeled": 0, "val": 2}
    assert tree_bytes(tmp / "full.zarr") == tree_bytes(tmp / "part.zarr")
    done = run_annotation(_cfg(model, batch_size=3), m, tmp / "part.zarr")
    assert sum(done.annotated.values()) == 0 and done.forward_s == 0


def test_plan_and_shard_parsing(setup):
    _, man, _ = setup
    m = data_manifest.load(man)
    plan = plan_batches(m, ("unlabeled", "labeled"), 2)
    assert [(b.index, b.split, [r.id for r in b.rows]) for b in plan] == [
        (0, "unlabeled", ["u00", "u01"]),
        (1, "unlabeled", ["u02", "u03"]),
        (2, "unlabeled", ["u04"]),
        (3, "labeled", ["l00", "l01"]),
        (4, "labeled", ["l02"]),
    ]
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(UserError, match="expected i/n with 0 <= i < n"):
            parse_shard(bad)


def _cli(args, cwd=ROOT, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "annotate", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


@pytest.mark.slow
def test_two_shard_processes_equal_one_run(setup):
    tmp, man, model = setup
    conf = write_config(
        tmp / "run.toml",
        tmp / "run",
        man,
        annotator="torch",
        model=str(model),
        batch_size=2,
        device="cpu",
        topk=2,  # both storage modes
    )
    procs = [
        _cli(["run", "--config", str(conf), "--shard", f"{i}/2", "--no-progress"]) for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    reports = [
        json.loads((tmp / "run" / f"annotate.shard-{i}-of-2.json").read_text()) for i in range(2)
    ]
    assert [sum(r["annotated"].values()) for r in reports] == [5, 5]  # batches 0,2,4 / 1,3,5
    single = _cli(
        ["run", "--config", str(conf), "--cache", str(tmp / "single.zarr"), "--no-progress"]
    )
    assert single.wait(120) == 0
    shard_tree = tree_bytes(tmp / "run" / "cache.zarr")
    single_tree = tree_bytes(tmp / "single.zarr")
    assert len(shard_tree) == 2 + 5 * 3 + 5 * 5  # root + .keep; scores 3 files, top-k 5
    assert shard_tree == single_tree


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    man = make_dataset(tmp_path / "ds", 6, 30, 4, size=(48, 64))
    model = save_torchscript(tmp_path / "m.pt", meta=META)
    conf = write_config(
        tmp_path / "run.toml",
        tmp_path / "run",
        man,
        annotator="torch",
        model=str(model),
        batch_size=2,
        device="cpu",
    )
    ref = _cli(
        ["run", "--config", str(conf), "--cache", str(tmp_path / "ref.zarr"), "--no-progress"]
    )
    assert ref.wait(120) == 0
    images = tmp_path / "run" / "cache.zarr" / "images"
    killed_at = []
    for target in (3, 17):  # kill twice, at different points of the run
        p = _cli(["run", "--config", str(conf), "--no-progress"])
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            # finished images (several writer threads may hold temporaries at once)
            if images.is_dir() and sum(n.startswith("im-") for n in os.listdir(images)) >= target:
                break
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed_at.append(len(open_cache(tmp_path / "run" / "cache.zarr")))
    assert 0 < killed_at[0] < 40 and killed_at[1] < 40, killed_at
    final = _cli(["run", "--config", str(conf), "--no-progress"])
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    report = json.loads((tmp_path / "run" / "annotate.json").read_text())
    assert sum(report["present_before"].values()) == killed_at[1]
    got, want = tree_bytes(tmp_path / "run" / "cache.zarr"), tree_bytes(tmp_path / "ref.zarr")
    assert got == want  # no temporaries left, every file byte-identical


def _break_images(man: Path) -> data_manifest.Manifest:
    m = data_manifest.load(man)
    root = m.root
    (root / m.split("unlabeled")[1].image).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / m.split("unlabeled")[3].image).unlink()
    Image.new("RGB", (5, 5)).save(root / m.split("val")[0].image)  # wrong size
    return m


def test_bad_images_stop_with_a_clear_error(setup):
    tmp, man, model = setup
    m = _break_images(man)
    with pytest.raises(UserError) as exc:
        run_annotation(_cfg(model, splits=("unlabeled",)), m, tmp / "c.zarr")
    msg = str(exc.value)
    assert "u01.png: cannot decode image" in msg and "--skip-bad" in msg
    assert "image 'u01'" in msg


def test_skip_bad_reports_and_annotates_the_rest(setup):
    tmp, man, model = setup
    _break_images(man)
    conf = write_config(
        tmp / "run.toml",
        tmp / "run",
        man,
        annotator="torch",
        model=str(model),
        batch_size=2,
        device="cpu",
    )
    r = runner.invoke(app, ["run", "--config", str(conf), "--skip-bad", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "skipped images" in r.output and "image file not found" in r.output
    report = json.loads((tmp / "run" / "annotate.json").read_text())
    assert sorted(b["id"] for b in report["skipped"]) == ["u01", "u03", "v00"]
    assert any("manifest row says 20x28" in b["error"] for b in report["skipped"])
    assert report["annotated"] == {"labeled": 3, "unlabeled": 3, "val": 1}
    cache = open_cache(tmp / "run" / "cache.zarr")
    assert "u01" not in cache and "u00" in cache and len(cache) == 7


def test_cli_config_overrides_and_resolved_config(setup):
    tmp, man, model = setup
    conf = write_config(
        tmp / "run.toml",
        tmp / "run",
        man,
        annotator="torch",
        model=str(model),
        batch_size=4,
        splits=["labeled"],
        device="cpu",
    )
    r = runner.invoke(
        app,
        [
            "run",
            "--config",
            str(conf),
            "--splits",
            "labeled,val",
            "--batch-size",
            "1",
            "--topk",
            "2",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    resolved = data_manifest.config.load_config(tmp / "run" / "annotate.toml")
    assert resolved["annotate"]["splits"] == ["labeled", "val"]
    assert resolved["annotate"]["batch_size"] == 1 and resolved["annotate"]["topk"] == 2
    assert resolved["data"]["manifest"] == str(man)
    assert len(open_cache(tmp / "run" / "cache.zarr")) == 5
    report = json.loads((tmp / "run" / "annotate.json").read_text())
    assert report["annotated"] == {"labeled": 3, "val": 2} and report["device"] == "cpu"


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ({"batch_size": 0}, "[annotate] batch_size = 0: expected an integer in [1, 1024]"),
        ({"splits": ["train"]}, "[annotate] splits = ['train']: expected distinct names"),
        ({"annotator": "sam"}, "[annotate] annotator = 'sam'; expected one of 'demo', 'torch'"),
        ({"colour": 1}, "[annotate] unknown key 'colour'"),
        ({"model": "missing.pt"}, "model = 'missing.pt': file not found"),
    ],
)
def test_cli_user_errors_are_one_line(setup, extra, expect):
    tmp, man, model = setup
    kw = {"annotator": "torch", "model": str(model), **extra}
    conf = write_config(tmp / "bad.toml", tmp / "run", man, **kw)
    r = runner.invoke(app, ["run", "--config", str(conf), "--no-progress"])
    assert r.exit_code == 1
    assert expect in r.output.replace("\n", ""), r.output
    assert "Traceback" not in r.output


def test_inspect_and_show(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    run_annotation(_cfg(model, topk=2), m, tmp / "run" / "cache.zarr")  # both storage modes
    r = runner.invoke(app, ["inspect", str(tmp / "run"), "--json", str(tmp / "s.json")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp / "s.json").read_text())
    cache = open_cache(tmp / "run" / "cache.zarr")
    probs = [cache.probs(i) for i in cache.ids]
    arg = np.concatenate([p.argmax(0).ravel() for p in probs])
    top = np.concatenate([p.max(0).ravel() for p in probs])
    assert s["images"] == 10 and s["modes"] == {"scores": 5, "topk": 5}
    assert s["bytes_on_disk"] == sum(
        f.stat().st_size for f in (tmp / "run" / "cache.zarr").rglob("*") if f.is_file()
    )
    for j, pc in enumerate(s["per_class"]):
        assert pc["pixel_share"] == pytest.approx(np.mean(arg == j))
        assert pc["mean_top_prob"] == pytest.approx(float(top[arg == j].mean()), rel=1e-5)
    assert "mean top probability" in r.output and "background" in r.output
    # made through the Python API: no annotate.toml beside the cache names the manifest
    r = runner.invoke(app, ["show", str(tmp / "run" / "cache.zarr"), "u02"])
    assert r.exit_code == 1 and "expected --manifest PATH" in r.output
    r = runner.invoke(app, ["show", str(tmp / "run" / "cache.zarr"), "u02", "--manifest", str(man)])
    assert r.exit_code == 0, r.output
    png = tmp / "run" / "show" / "u02.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 3 * 28
    r = runner.invoke(app, ["show", str(tmp / "run"), "nope", "--manifest", str(man)])
    assert r.exit_code == 1 and "image 'nope' is not in the cache" in r.output
    r = runner.invoke(app, ["inspect", str(tmp)])
    assert r.exit_code == 1 and "not a cache, a run folder with cache.zarr" in r.output


def test_group_files_are_the_bytes_zarr_writes(tmp_path):
    import zarr

    from annotate.cache import _COMPRESSORS, encode_group

    rng = np.random.default_rng(0)
    arrays = {
        "topk_index": rng.integers(0, 7, (2, 5, 6)).astype(np.uint8),
        "topk_prob": rng.random((2, 5, 6)).astype(np.float16),
    }
    attrs = {"id": "a/b", "height": 10, "width": 12, "mode": "topk"}
    files = encode_group(arrays, attrs)
    sizes = {name: len(files[f"{name}/c/0/0/0"]) for name in arrays}
    g = zarr.open_group(str(tmp_path / "z"), mode="w", attributes={**attrs, "chunk_bytes": sizes})
    for name, a in arrays.items():
        g.create_array(name, data=a, chunks=a.shape, compressors=_COMPRESSORS)
    assert files == tree_bytes(tmp_path / "z")


@pytest.mark.slow
def test_dask_local_cluster_equals_one_process(setup):
    tmp, man, model = setup
    conf = write_config(
        tmp / "run.toml",
        tmp / "run",
        man,
        annotator="torch",
        model=str(model),
        batch_size=2,
        device="cpu",
    )
    d = _cli(
        ["run", "--config", str(conf), "--scheduler", "local:2", "--shards", "3", "--no-progress"]
    )
    out, err = d.communicate(timeout=180)
    assert d.returncode == 0, err.decode()
    report = json.loads((tmp / "run" / "annotate.json").read_text())
    assert report["annotated"] == {"labeled": 3, "unlabeled": 5, "val": 2}
    single = _cli(
        ["run", "--config", str(conf), "--cache", str(tmp / "single.zarr"), "--no-progress"]
    )
    assert single.wait(120) == 0
    assert tree_bytes(tmp / "run" / "cache.zarr") == tree_bytes(tmp / "single.zarr")
    bad = runner.invoke(
        app,
        ["run", "--config", str(conf), "--scheduler", "local:2", "--shard", "0/2", "--no-progress"],
    )
    assert bad.exit_code == 1 and "exclude each other" in bad.output


def test_reader_matches_zarr_for_any_group_layout(tmp_path):
    import zarr

    from annotate.cache import CacheMeta, create_or_open, image_key

    meta = CacheMeta(("a", "b", "c"), "x", "0", "0", "softmax", topk=2)
    w = create_or_open(tmp_path / "c.zarr", meta)
    rng = np.random.default_rng(1)
    w.write("mine", rng.normal(size=(3, 4, 5)).astype(np.float32), 8, 10, topk=True)
    images = tmp_path / "c.zarr" / "images"
    layouts = {  # written by zarr itself: an all-zero (never written) chunk, several chunks
        "zeros": dict(data=np.zeros((3, 4, 5), np.float16), chunks=(3, 4, 5)),
        "chunked": dict(data=rng.random((3, 4, 5)).astype(np.float16), chunks=(1, 2, 5)),
    }
    for image_id, kw in layouts.items():
        g = zarr.open_group(
            str(images / image_key(image_id)),
            mode="w",
            attributes={"id": image_id, "height": 4, "width": 5, "mode": "scores"},
        )
        g.create_array("scores", **kw)
    cache = open_cache(tmp_path / "c.zarr")
    for image_id in ("mine", "zeros", "chunked"):
        g = zarr.open_group(str(images / image_key(image_id)), mode="r")
        want = {n: a[...] for n, a in g.arrays()}
        got = cache.stored(image_id)
        assert got.keys() == want.keys() and cache.info(image_id) == dict(g.attrs)
        for n in want:
            assert got[n].dtype == want[n].dtype
            np.testing.assert_array_equal(got[n], want[n])
    assert not (images / image_key("zeros") / "scores" / "c").exists()
    np.testing.assert_allclose(cache.probs("zeros"), 1 / 3)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_topk_encode_is_a_stable_sort_and_decode_keeps_the_order(k):
    from annotate.cache import topk_decode, topk_encode

    rng = np.random.default_rng(k)
    p = rng.random((7, 9, 11)).astype(np.float32).round(1)  # many ties
    p /= p.sum(axis=0)
    idx, prob = topk_encode(p, k)
    ref = np.argsort(-p, axis=0, kind="stable")[:k]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(prob, np.take_along_axis(p, ref, 0).astype(np.float16))
    dec = topk_decode(idx, prob, 7)
    np.testing.assert_array_equal(dec.argmax(axis=0), p.argmax(axis=0))
    np.testing.assert_allclose(dec.sum(axis=0), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.take_along_axis(dec, ref, 0), prob.astype(np.float32), atol=1e-6)


def _as_schema_1(cache_path: Path) -> None:
    """Rewrite a cache's root metadata as an earlier version wrote it (schema 1)."""
    meta = json.loads((cache_path / "zarr.json").read_text())
    meta["attributes"]["schema"] = 1
    (cache_path / "zarr.json").write_text(json.dumps(meta))


def test_schema_1_caches_are_read_but_not_extended(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    run_annotation(_cfg(model, splits=("labeled", "unlabeled")), m, tmp / "c.zarr")
    _as_schema_1(tmp / "c.zarr")
    before = tree_bytes(tmp / "c.zarr")
    old = open_cache(tmp / "c.zarr")
    assert old.meta.schema == 1 and len(old) == 8
    row = m.split("labeled")[0]
    ref = softmax(reference_logits(model, m.read_image(row), META["mean"], META["std"]))
    np.testing.assert_allclose(old.probs(row.id), ref, atol=4e-3)
    assert old.probs(m.split("unlabeled")[0].id).shape == (3, 20, 28)
    with pytest.raises(UserError) as exc:
        run_annotation(_cfg(model), m, tmp / "c.zarr")
    msg = str(exc.value)
    assert "c.zarr: cache schema is 1, written by an earlier version; this version reads" in msg
    assert "use a new cache path" in msg and "\n" not in msg
    assert tree_bytes(tmp / "c.zarr") == before  # nothing added, nothing damaged


def test_cpu_run_stores_what_schema_1_stored(setup):
    """The arrays of a CPU run are schema 1's numpy computation on the model's batched output
    (made contiguous), bit for bit: probabilities, a stable sort, float16."""
    import torch

    from annotate.annotators import build_annotator

    tmp, man, model = setup
    m = data_manifest.load(man)
    cfg = _cfg(model, batch_size=3, topk=2)
    run_annotation(cfg, m, tmp / "c.zarr")
    cache = open_cache(tmp / "c.zarr")
    ann = build_annotator(cfg, m)
    for b in plan_batches(m, cfg.splits, cfg.batch_size):
        x = torch.from_numpy(np.stack([m.read_image(r) for r in b.rows])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            scores = ann.predict(x).float().numpy()
        for row, s in zip(b.rows, scores, strict=True):
            if row.split == "unlabeled":
                c = np.ascontiguousarray(s)  # schema 1's formula
                p = np.exp(c - c.max(axis=0)) / np.exp(c - c.max(axis=0)).sum(axis=0)
                order = np.argsort(-p, axis=0, kind="stable")[:2]
                want = {
                    "topk_index": order.astype(np.uint8),
                    "topk_prob": np.take_along_axis(p, order, 0).astype(np.float16),
                }
            else:
                want = {"scores": s.astype(np.float16)}
            got = cache.stored(row.id)
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])


def test_unknown_schema_is_refused_in_one_line(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    run_annotation(_cfg(model, splits=("val",)), m, tmp / "c.zarr")
    meta = json.loads((tmp / "c.zarr" / "zarr.json").read_text())
    meta["attributes"]["schema"] = 9
    (tmp / "c.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"c\.zarr: cache schema is 9; this version reads schemas 1, 2$"
    ):
        open_cache(tmp / "c.zarr")


def test_report_says_where_the_time_goes(setup):
    tmp, man, model = setup
    m = data_manifest.load(man)
    res = run_annotation(_cfg(model), m, tmp / "c.zarr")
    phases = res.report()["phases_s"]
    assert list(phases) == ["decode", "h2d", "forward", "post", "d2h", "encode", "write"]
    assert all(v >= 0 for v in phases.values())
    assert phases["decode"] > 0 and phases["post"] > 0 and phases["encode"] > 0
    assert phases["write"] > 0 and phases["d2h"] == 0  # nothing to copy on a CPU
    assert res.forward_s == pytest.approx(res.phases["forward"])


# -- CUDA: pinned memory, non-blocking copies, post-processing on the device ------------------

CUDA = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@CUDA
def test_cuda_run_is_resumable_byte_identical_and_close_to_the_cpu(tmp_path):
    from annotate.run import load_batch

    man = make_dataset(tmp_path / "ds", 4, 9, 2, size=(375, 500))  # VOC size, one size
    model = save_torchscript(tmp_path / "m.pt", num_classes=3, meta=META)
    m = data_manifest.load(man)
    cuda = _cfg(model, batch_size=4, device="cuda", topk=2)
    res = run_annotation(cuda, m, tmp_path / "gpu.zarr")
    assert res.device.startswith("cuda") and res.phases["d2h"] > 0 and res.forward_s > 0
    run_annotation(cuda, m, tmp_path / "again.zarr")
    assert tree_bytes(tmp_path / "gpu.zarr") == tree_bytes(tmp_path / "again.zarr")
    part = _cfg(model, batch_size=4, device="cuda", topk=2, splits=("unlabeled",))
    run_annotation(part, m, tmp_path / "part.zarr")
    run_annotation(cuda, m, tmp_path / "part.zarr")
    assert tree_bytes(tmp_path / "gpu.zarr") == tree_bytes(tmp_path / "part.zarr")
    run_annotation(_cfg(model, batch_size=4, topk=2), m, tmp_path / "cpu.zarr")
    gpu, cpu = open_cache(tmp_path / "gpu.zarr"), open_cache(tmp_path / "cpu.zarr")
    for row in m.rows:
        np.testing.assert_allclose(gpu.probs(row.id), cpu.probs(row.id), atol=3e-3)
        if row.split == "unlabeled":
            same = gpu.stored(row.id)["topk_index"] == cpu.stored(row.id)["topk_index"]
            assert same.mean() > 0.999
    loaded = load_batch(m, plan_batches(m, ("val",), 2)[0], (), pin=True)
    assert all(g.images.is_pinned() for g in loaded.groups)


@pytest.mark.gpu
@CUDA
def test_cuda_with_amp_and_image_resolution(tmp_path):
    man = make_dataset(tmp_path / "ds", 2, 4, 1, size=(60, 90))
    model = save_torchscript(tmp_path / "m.pt", stride=2, meta=META)
    m = data_manifest.load(man)
    cfg = _cfg(model, device="cuda", amp=True, resolution="image", topk=1)
    run_annotation(cfg, m, tmp_path / "c.zarr")
    cache = open_cache(tmp_path / "c.zarr")
    for row in m.rows:
        logits = reference_logits(model, m.read_image(row), META["mean"], META["std"])
        ref = resize_chw(softmax(logits), row.height, row.width)
        got = cache.stored(row.id)
        if row.split == "unlabeled":
            assert got["topk_index"].shape == (1, 60, 90)
            assert (got["topk_index"][0] == ref.argmax(0)).mean() > 0.99  # float16 autocast
        else:
            np.testing.assert_allclose(cache.probs(row.id), ref, atol=2e-2)
