"""Calibrate benchmark: exactness, throughput against a bare cache read, scaling, workers.

Every figure is a ratio of two measurements taken in the same run on the same machine, each in
a fresh subprocess (same imports, same code, interleaved repeats, medians):

- exactness: q̂ of a calibrate run (pixel and class modes) equals ``np.sort(scores)[rank - 1]``
  on the same scores held in memory (target: identical);
- throughput: a bare read of every image's probabilities (same scheduler, workers and batches)
  over the calibrate job on the same cache (target ≥ 0.5), in wall time and in CPU time (the
  CPU ratio is robust to other processes on a shared machine);
- scaling: the job on 4× the images over the job on 1× (target ≤ 4.4), and the peak RSS of the
  two runs (target: flat);
- workers: the job on a 2-worker LocalCluster over a 1-worker one (target ≥ 1.5; needs two
  free cores).

Job times are the passes' wall time (calibration, report, PNG writing): no interpreter start,
no imports, no cluster start, no plots. Usage: ``python bench/calibrate_bench.py [--images N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CLASSES = ["background", "person", "car", "tree", "road", "sky", "building"]

_CHILD = r"""
import json, resource, sys, time
import dask, dask.callbacks, distributed  # import cost is per process, not per image: not timed
from pathlib import Path
from annotate import open_cache
from calibrate import job
from calibrate.config import CalibrateConfig
from calibrate.runner import Runner
from data_manifest import load

def read_batch(ids, cpath):
    c = open_cache(cpath)
    return sum(int(c.probs(i).shape[0]) for i in ids)

what, mpath, cpath, out, scheduler, workers = sys.argv[1:7]
m = load(mpath)
u0 = resource.getrusage(resource.RUSAGE_SELF)
rss0 = u0.ru_maxrss / 1024
if what == "job":
    conf = CalibrateConfig(scheduler=scheduler, workers=int(workers), plots=False,
                           cache=cpath, out_dir=out)
    r = job.run(m, conf, Path(cpath), Path(out), 0, {}, show_progress=False)
    t = r["timings"]
    wall = t["calibration_s"] + t["report_s"] + t["write_s"]
    qhat = r["figures"]["qhat"]
else:
    ids = open_cache(cpath).ids
    batches = [ids[i:i + 8] for i in range(0, len(ids), 8)]
    with Runner(scheduler, int(workers), show_progress=False) as runner:
        t0 = time.perf_counter()
        runner.map_reduce(read_batch, batches, "bare read", cpath=cpath)
        wall = time.perf_counter() - t0
    qhat = None
u1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "qhat": qhat,
                  "peak_rss_mb": u1.ru_maxrss / 1024, "peak_rss_before_mb": rss0}))
"""


def make(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A synthetic dataset of n images (1/8 labeled, 1/16 val, the rest unlabeled), 128×128."""
    from _calibrate_fixtures import make_dataset

    n_lab, n_val = max(n // 8, 2), max(n // 16, 1)
    return make_dataset(
        root,
        n_labeled=n_lab,
        n_val=n_val,
        n_unlabeled=n - n_lab - n_val,
        h=128,
        w=128,
        seed=seed,
        classes=CLASSES,
    )


def child(what: str, ds: tuple[Path, Path], out: Path, scheduler: str, workers: int) -> dict:
    """Run the job ("job") or a bare read ("bare") in a fresh subprocess; returns its figures."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        what,
        str(ds[0]),
        str(ds[1]),
        str(out),
        scheduler,
        str(workers),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
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
            scheduler="threads",
        )
        q = job.run(m, conf, cpath, out / mode, 0, {}, show_progress=False)["figures"]["qhat"]
        if mode == "pixel":
            ok &= q == np_q(s, 0.05)
        else:
            ok &= all(q["per_class"][c] == np_q(s[y == k], 0.05) for k, c in enumerate(CLASSES))
    return {"qhat_identical_to_numpy": bool(ok), "calibration_pixels": int(s.size)}


def _med(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def run(images: int = 128, workdir: str | None = None, repeats: int = 3) -> dict:
    """All figures as a dict (for bench/run_all.py)."""
    tmp = Path(workdir or tempfile.mkdtemp(prefix="calib-bench-"))
    small = make(tmp / "x1", images, seed=1)
    big = make(tmp / "x4", 4 * images, seed=2)
    fig: dict = {"images_1x": images, "images_4x": 4 * images, "repeats": repeats}
    fig.update(exactness(*small, tmp / "exact"))
    child("job", big, tmp / "o4", "threads", 2)  # writes the PNGs: later runs find them in place
    child("job", small, tmp / "o1", "threads", 2)
    r1, r4, bare = [], [], []
    for _ in range(repeats):  # interleaved, so that a load change hits both sides of a ratio
        bare.append(child("bare", big, tmp / "o4", "threads", 2))
        r4.append(child("job", big, tmp / "o4", "threads", 2))
        r1.append(child("job", small, tmp / "o1", "threads", 2))
    fig["bare_read_s"] = round(_med(bare, "wall_s"), 3)
    fig["job_s_4x"] = round(_med(r4, "wall_s"), 3)
    fig["throughput_vs_bare_read"] = round(_med(bare, "wall_s") / _med(r4, "wall_s"), 3)
    fig["bare_read_cpu_s"] = round(_med(bare, "cpu_s"), 3)
    fig["job_cpu_s_4x"] = round(_med(r4, "cpu_s"), 3)
    fig["throughput_vs_bare_read_cpu"] = round(_med(bare, "cpu_s") / _med(r4, "cpu_s"), 3)
    fig["job_s_1x"] = round(_med(r1, "wall_s"), 3)
    fig["time_ratio_4x_data"] = round(_med(r4, "wall_s") / _med(r1, "wall_s"), 3)
    fig["cpu_ratio_4x_data"] = round(_med(r4, "cpu_s") / _med(r1, "cpu_s"), 3)
    rss1 = max(r["peak_rss_mb"] for r in r1)
    rss4 = max(r["peak_rss_mb"] for r in r4)
    fig["peak_rss_mb_1x"] = round(rss1, 1)
    fig["peak_rss_mb_4x"] = round(rss4, 1)
    fig["peak_rss_ratio_4x_data"] = round(rss4 / rss1, 3)
    # growth of the peak during the job above the peak after imports and manifest loading
    fig["job_rss_growth_mb_4x"] = round(
        max(r["peak_rss_mb"] - r["peak_rss_before_mb"] for r in r4), 1
    )
    w1, w2 = [], []
    for _ in range(repeats):
        w1.append(child("job", big, tmp / "w1", "processes", 1))
        w2.append(child("job", big, tmp / "w2", "processes", 2))
    fig["job_s_1_worker"] = round(_med(w1, "wall_s"), 3)
    fig["job_s_2_workers"] = round(_med(w2, "wall_s"), 3)
    fig["speedup_2_workers"] = round(_med(w1, "wall_s") / _med(w2, "wall_s"), 3)
    fig["cpu_cores"] = os.cpu_count()
    fig["load_avg_1min"] = round(os.getloadavg()[0], 2)
    fig["targets"] = {
        "qhat_identical_to_numpy": True,
        "throughput_vs_bare_read": ">= 0.5",
        "time_ratio_4x_data": "<= 4.4",
        "peak_rss_ratio_4x_data": "~1 (flat)",
        "speedup_2_workers": ">= 1.5",
    }
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128, help="images of the 1x dataset")
    ap.add_argument("--workdir", default=None, help="folder for the synthetic data")
    ap.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    a = ap.parse_args()
    print(json.dumps(run(a.images, a.workdir, a.repeats), indent=2))


if __name__ == "__main__":
    main()
