"""Calibrate benchmark at PASCAL VOC scale: exactness, throughput, scaling, workers, profile.

The data set is a synthetic VOC-size cache written by annotate's own cache writer: images of
500×375, K = 21 classes; labeled images hold full float16 scores, unlabeled images the top-k
(k = ``auto_topk(21)`` = 4) float16 probabilities at image resolution, as ``annotate run``
stores them; spatially smooth, fairly confident scores. VOC's counts (1,464 labeled, 10,582
unlabeled) do not fit this machine's time budget, so the "1×" data set is ``fraction`` of them
(default 1/128: 11 labeled + 83 unlabeled) and "4×" four times that; the projection to full
VOC scales the 4× time by the image counts (the scaling figure says whether that holds). No val
split (a val split adds one read of each val image to the report pass, like a labeled one).

Every figure is a ratio of two measurements in the same run on the same machine, each job in a
fresh subprocess (same imports; interleaved repeats; medians):

- exactness: q̂ of the job (pixel and class modes) equals ``np.sort(scores)[rank - 1]`` on the
  same scores in memory;
- throughput: a bare read of the same cache (``Cache.probs`` of every image once, same
  scheduler, workers and batches) over the job (target ≥ 0.5); also against the raw stored
  arrays (``Cache.stored``: decompression only), wall and CPU time;
- passes: pass 1, pass 2, the report pass and PNG writing (compute + staging + commit), each
  as a share of the job;
- scaling: the job on 4× the images over 1× (target ≤ 4.4) and peak RSS of both (flat);
- workers: a 2-worker LocalCluster over a 1-worker one (target ≥ 1.5, needs 2 free cores),
  and a 4-worker LocalCluster against threads;
- profile: where the time goes (cProfile of a single-threaded job, top functions);
- argmax: ``calibrate.sets.argmax0`` and the CP pseudo-label rule against the per-class loop
  they replace, at K = 21 (VOC) and K = 150 (ADE20K), one 500×375 image.

Usage: ``python bench/calibrate_bench.py [--fraction 0.0078125] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VOC_LABELED, VOC_UNLABELED = 1464, 10582
H, W, K = 375, 500, 21
CLASSES = ["background", *(f"class{i:02d}" for i in range(1, K))]

_CHILD = r"""
import cProfile, io, json, pstats, resource, sys, time
import dask, dask.callbacks, distributed  # import cost is per process, not per image: not timed
from pathlib import Path
from annotate import open_cache
from calibrate import job
from calibrate.config import CalibrateConfig
from calibrate.runner import Runner
from data_manifest import load

def read_batch(ids, cpath, how):
    c = open_cache(cpath)
    if how == "bare":
        return sum(int(c.probs(i).shape[0]) for i in ids)
    return sum(len(c.stored(i)) for i in ids)

what, mpath, cpath, out, scheduler, workers = sys.argv[1:7]
m = load(mpath)
u0 = resource.getrusage(resource.RUSAGE_SELF)
rss0 = u0.ru_maxrss / 1024
res = {"qhat": None}
if what in ("job", "profile"):
    conf = CalibrateConfig(scheduler=scheduler, workers=int(workers), plots=False,
                           cache=cpath, out_dir=out)
    prof = cProfile.Profile() if what == "profile" else None
    if prof:
        prof.enable()
    r = job.run(m, conf, Path(cpath), Path(out), 0, {}, show_progress=False)
    if prof:
        prof.disable()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        total = sum(v[2] for v in st.stats.values())
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]
        res["profile"] = [[f"{Path(k[0]).name}:{k[2]}", round(v[2], 3), round(v[2] / total, 3)]
                          for k, v in top]
    t = r["timings"]
    res.update({k: t[k] for k in ("pass1_s", "pass2_s", "report_s", "write_s", "commit_s")})
    wall = t["pass1_s"] + t["pass2_s"] + t["report_s"] + t["write_s"] + t["commit_s"]
    res["qhat"] = r["figures"]["qhat"]
    res["undetermined_fraction"] = r["figures"]["unlabeled"]["undetermined_fraction"]
else:
    ids = open_cache(cpath).ids
    batches = [ids[i:i + 8] for i in range(0, len(ids), 8)]
    with Runner(scheduler, int(workers), show_progress=False) as runner:
        t0 = time.perf_counter()
        runner.map_reduce(read_batch, batches, "read", cpath=cpath, how=what)
        wall = time.perf_counter() - t0
u1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
res.update({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": u1.ru_maxrss / 1024,
            "peak_rss_before_mb": rss0})
print(json.dumps(res))
"""


def make(root: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """A VOC-size synthetic data set: ``fraction`` of VOC's labeled and unlabeled counts."""
    from _calibrate_fixtures import make_dataset

    from annotate.config import auto_topk

    if (root / "cache.zarr" / "zarr.json").is_file():
        return root / "manifest.jsonl", root / "cache.zarr"
    return make_dataset(
        root,
        n_labeled=max(round(VOC_LABELED * fraction), 2),
        n_unlabeled=max(round(VOC_UNLABELED * fraction), 2),
        n_val=0,
        h=H,
        w=W,
        seed=seed,
        topk=auto_topk(K),
        classes=CLASSES,
        smooth=16,
        strength=4.0,
        write_images=False,
    )


def child(what: str, ds: tuple[Path, Path], out: Path, scheduler: str, workers: int) -> dict:
    """Run the job ("job", "profile") or a read ("bare", "raw") in a fresh subprocess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", _CHILD, what, str(ds[0]), str(ds[1]), str(out), scheduler]
    res = subprocess.run([*cmd, str(workers)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def exactness(mpath: Path, cpath: Path, out: Path) -> dict:
    """q̂ of the job against np.sort over all labeled scores in memory (pixel and class mode)."""
    from annotate import open_cache
    from calibrate import job
    from calibrate.config import CalibrateConfig
    from calibrate.quantile import conformal_rank
    from data_manifest import load

    m, cache = load(mpath), open_cache(cpath)
    s, y = [], []
    for r in m.split("labeled"):
        p, lab = cache.probs(r.id), m.read_label(r)
        v = lab != 255
        s.append(np.float32(1) - p[:, v][lab[v], np.arange(int(v.sum()))])
        y.append(lab[v])
    s, y = np.concatenate(s), np.concatenate(y)

    def np_q(x: np.ndarray, alpha: float) -> float:
        r = conformal_rank(x.size, alpha)
        return 1.0 if r > x.size else float(np.sort(x)[r - 1])

    ok = True
    for mode in ("pixel", "class"):
        conf = CalibrateConfig(
            mode=mode,
            plots=False,
            class_min_pixels=0,
            cache=str(cpath),
            out_dir=str(out / mode),
            topk_undetermined_max=1.0,
        )
        q = job.run(m, conf, cpath, out / mode, 0, {}, show_progress=False)["figures"]["qhat"]
        if mode == "pixel":
            ok &= q == np_q(s, 0.05)
        else:
            ok &= all(q["per_class"][c] == np_q(s[y == k], 0.05) for k, c in enumerate(CLASSES))
    return {"qhat_identical_to_numpy": bool(ok), "calibration_pixels": int(s.size)}


def _old_argmax0(a: np.ndarray, mask: np.ndarray | None = None, skip: int | None = None):
    """The per-class loop argmax0 replaced (for the before/after figure)."""
    idx = np.zeros(a.shape[1:], np.uint8)
    best = np.full(a.shape[1:], -1.0, np.float32)
    for k in range(a.shape[0]):
        if k == skip:
            continue
        upd = a[k] > best
        if mask is not None:
            upd &= mask[k]
        best = np.where(upd, a[k], best)
        idx = np.where(upd, np.uint8(k), idx)
    return idx, best


def _old_pseudo_label(p: np.ndarray, sets: np.ndarray, bg: int) -> np.ndarray:
    """The CP rule as it was, on the per-class loop (for the before/after figure)."""
    idx, val = _old_argmax0(p, sets, skip=bg)
    out = np.where(val >= 0, idx, np.uint8(255))
    return np.where((val < 0) & sets[bg], np.uint8(bg), out).astype(np.uint8)


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def argmax_figures(repeats: int = 5) -> dict:
    """argmax0 and the CP rule (LAC, foreground preference) before/after, one 500×375 image of
    full probabilities: one q̂ (pixel mode) and class-wise q̂ (sets not monotone in p)."""
    from calibrate import sets as S

    out: dict = {}
    rng = np.random.default_rng(0)
    for k in (21, 150):
        coarse = rng.normal(size=(k, H // 25 + 1, W // 25 + 1)).astype(np.float32)
        logits = 4 * np.repeat(np.repeat(coarse, 25, axis=1), 25, axis=2)[:, :H, :W]
        logits += rng.normal(size=(k, H, W)).astype(np.float32)
        p = np.exp(logits - logits.max(axis=0))
        p /= p.sum(axis=0, keepdims=True)
        fig: dict = {}
        for name, q in (
            ("pixel", np.full(k, 0.9, np.float32)),
            ("class", rng.uniform(0.5, 0.99, k).astype(np.float32)),
        ):
            sets = S.prediction_sets(p, q, "lac")
            one = name == "pixel"
            assert (
                S.pseudo_label(p, sets, 0, 0, one_threshold=one) == _old_pseudo_label(p, sets, 0)
            ).all()
            old = _median_time(lambda p=p, s=sets: _old_pseudo_label(p, s, 0), repeats)
            new = _median_time(
                lambda p=p, s=sets, o=one: S.pseudo_label(p, s, 0, 0, one_threshold=o), repeats
            )
            fig[f"cp_rule_{name}_loop_ms"] = round(1000 * old, 2)
            fig[f"cp_rule_{name}_vectorised_ms"] = round(1000 * new, 2)
            fig[f"cp_rule_{name}_speedup"] = round(old / new, 2)
        assert (S.argmax0(p)[0] == _old_argmax0(p)[0]).all()
        old = _median_time(lambda p=p: _old_argmax0(p), repeats)
        new = _median_time(lambda p=p: S.argmax0(p), repeats)
        fig["argmax_loop_ms"] = round(1000 * old, 2)
        fig["argmax_vectorised_ms"] = round(1000 * new, 2)
        fig["argmax_speedup"] = round(old / new, 2)
        out[f"K{k}"] = fig
    return out


def _med(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def run(
    images: int | None = None,
    workdir: str | None = None,
    repeats: int = 3,
    fraction: float | None = None,
) -> dict:
    """All figures as a dict (for bench/run_all.py). ``images`` (the 1× image count) or
    ``fraction`` (of VOC's counts, default 1/128) sets the size."""
    if fraction is None:
        fraction = images / (VOC_LABELED + VOC_UNLABELED) if images else 1 / 128
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="calib-bench-") as tmp:
            return _run(Path(tmp), repeats, fraction)
    return _run(Path(workdir), repeats, fraction)


def _run(tmp: Path, repeats: int, fraction: float) -> dict:
    t0 = time.perf_counter()
    small = make(tmp / "x1", fraction, seed=1)
    big = make(tmp / "x4", 4 * fraction, seed=2)
    from data_manifest import load

    m1, m4 = load(small[0]), load(big[0])
    fig: dict = {
        "size": f"{W}x{H}, K = {K}, top-{_k()} unlabeled",
        "fraction_of_voc": round(fraction, 6),
        "images_1x": {s: len(m1.split(s)) for s in ("labeled", "unlabeled")},
        "images_4x": {s: len(m4.split(s)) for s in ("labeled", "unlabeled")},
        "repeats": repeats,
        "data_generation_s": round(time.perf_counter() - t0, 1),
    }
    fig.update(exactness(*small, tmp / "exact"))
    child("job", big, tmp / "o4", "threads", 2)  # writes the PNGs once: later runs stage none
    child("job", small, tmp / "o1", "threads", 2)
    r1, r4, bare, raw = [], [], [], []
    for _ in range(repeats):  # interleaved, so that a load change hits both sides of a ratio
        bare.append(child("bare", big, tmp / "o4", "threads", 2))
        raw.append(child("raw", big, tmp / "o4", "threads", 2))
        r4.append(child("job", big, tmp / "o4", "threads", 2))
        r1.append(child("job", small, tmp / "o1", "threads", 2))
    fig["threads_2"] = _job_figures(r4, bare, raw)
    fig["job_s_1x"] = round(_med(r1, "wall_s"), 3)
    fig["time_ratio_4x_data"] = round(_med(r4, "wall_s") / _med(r1, "wall_s"), 3)
    fig["cpu_ratio_4x_data"] = round(_med(r4, "cpu_s") / _med(r1, "cpu_s"), 3)
    fig["peak_rss_mb_1x"] = round(max(r["peak_rss_mb"] for r in r1), 1)
    fig["peak_rss_mb_4x"] = round(max(r["peak_rss_mb"] for r in r4), 1)
    fig["peak_rss_ratio_4x_data"] = round(fig["peak_rss_mb_4x"] / fig["peak_rss_mb_1x"], 3)
    # growth of the peak during the job above the peak after imports and manifest loading
    fig["job_rss_growth_mb_4x"] = round(
        max(r["peak_rss_mb"] - r["peak_rss_before_mb"] for r in r4), 1
    )
    # flat per-image cost: project the 4x time to VOC's counts
    n4 = sum(fig["images_4x"].values())
    fig["projected_voc_job_min_2_threads"] = round(
        _med(r4, "wall_s") * (VOC_LABELED + VOC_UNLABELED) / n4 / 60, 1
    )
    w1, w2, w4, b4 = [], [], [], []
    for _ in range(repeats):
        w1.append(child("job", big, tmp / "w1", "processes", 1))
        w2.append(child("job", big, tmp / "w2", "processes", 2))
        w4.append(child("job", big, tmp / "w4", "processes", 4))
        b4.append(child("bare", big, tmp / "w4", "processes", 4))
    fig["job_s_1_worker"] = round(_med(w1, "wall_s"), 3)
    fig["job_s_2_workers"] = round(_med(w2, "wall_s"), 3)
    fig["speedup_2_workers"] = round(_med(w1, "wall_s") / _med(w2, "wall_s"), 3)
    fig["local_cluster_4"] = _job_figures(w4, b4, None)
    fig["local_cluster_4_over_threads_2"] = round(_med(w4, "wall_s") / _med(r4, "wall_s"), 3)
    fig["profile_1_thread"] = child("profile", big, tmp / "prof", "synchronous", 1)["profile"]
    fig["argmax"] = argmax_figures()
    fig["cpu_cores"] = os.cpu_count()
    fig["load_avg_1min"] = round(os.getloadavg()[0], 2)
    fig["targets"] = {
        "qhat_identical_to_numpy": True,
        "throughput_vs_bare_read": ">= 0.5",
        "time_ratio_4x_data": "<= 4.4",
        "peak_rss_ratio_4x_data": "~1 (flat)",
        "speedup_2_workers": ">= 1.5",
    }
    fig["throughput_vs_bare_read"] = fig["threads_2"]["throughput_vs_bare_read"]
    return fig


def _k() -> int:
    from annotate.config import auto_topk

    return auto_topk(K)


def _job_figures(jobs: list[dict], bare: list[dict], raw: list[dict] | None) -> dict:
    """Throughput against the reads and each pass's share of the job's wall time."""
    wall = _med(jobs, "wall_s")
    out = {
        "job_s": round(wall, 3),
        "bare_read_s": round(_med(bare, "wall_s"), 3),
        "throughput_vs_bare_read": round(_med(bare, "wall_s") / wall, 3),
        "throughput_vs_bare_read_cpu": round(_med(bare, "cpu_s") / _med(jobs, "cpu_s"), 3),
        "share": {
            name: round(_med(jobs, f"{name}_s") / wall, 3)
            for name in ("pass1", "pass2", "report", "write", "commit")
        },
        "undetermined_fraction": jobs[0]["undetermined_fraction"],
    }
    if raw:
        out["raw_read_s"] = round(_med(raw, "wall_s"), 3)
        out["throughput_vs_raw_read"] = round(_med(raw, "wall_s") / wall, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1 / 128, help="of VOC's image counts")
    ap.add_argument("--workdir", default=None, help="folder for the synthetic data (reused)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    a = ap.parse_args()
    print(json.dumps(run(workdir=a.workdir, repeats=a.repeats, fraction=a.fraction), indent=2))


if __name__ == "__main__":
    main()
