"""Every benchmark under bench/, one table of ratios beside the targets from the design brief.

    python bench/run_all.py            # make bench
    python bench/run_all.py --quick    # fewer images and repeats (a smoke run, noisier)

Each ratio is measured within one run on this machine (both sides of a ratio in the same
process or interleaved), so machine speed cancels out; on a shared machine they still move
from run to run. Writes ``runs/bench/bench.json`` with every figure of every benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]

from data_manifest.cli_support import console, table  # noqa: E402
from data_manifest.io import atomic_write_json  # noqa: E402

Row = tuple[str, str, Any, str, bool | None]


def _annotate(quick: bool) -> tuple[dict, list[Row]]:
    import annotate_cache
    import annotate_speed

    speed = annotate_speed.measure(images=32 if quick else 96, repeats=2 if quick else 5, threads=1)
    cache = annotate_cache.measure(images=40 if quick else 100)
    rows: list[Row] = [
        (
            "annotate",
            "wall / pure forward (1 torch thread)",
            speed["ratio"],
            "≤ 1.10",
            speed["ratio"] <= 1.10,
        ),
        (
            "annotate",
            "cache bytes / float32 logits (unlabeled, top-2)",
            cache["size_ratio"],
            "≤ 0.125",
            cache["size_ratio"] <= 0.125,
        ),
        (
            "annotate",
            "identical LAC pseudo-label pixels",
            cache["identical_lac"],
            "≥ 0.999",
            cache["identical_lac"] >= 0.999,
        ),
    ]
    return {"annotate_speed": speed, "annotate_cache": cache}, rows


def _calibrate(quick: bool) -> tuple[dict, list[Row]]:
    import calibrate_bench

    f = calibrate_bench.run(fraction=1 / 512 if quick else 1 / 128, repeats=1 if quick else 3)
    rows: list[Row] = [
        (
            "calibrate",
            "q̂ identical to numpy",
            f["qhat_identical_to_numpy"],
            "identical",
            bool(f["qhat_identical_to_numpy"]),
        ),
        (
            "calibrate",
            "throughput / bare cache read",
            f["throughput_vs_bare_read"],
            "≥ 0.5",
            f["throughput_vs_bare_read"] >= 0.5,
        ),
        (
            "calibrate",
            "time for 4× the data",
            f["time_ratio_4x_data"],
            "≤ 4.4",
            f["time_ratio_4x_data"] <= 4.4,
        ),
        (
            "calibrate",
            "peak memory, 4× / 1× data",
            f["peak_rss_ratio_4x_data"],
            "≈ 1 (flat)",
            f["peak_rss_ratio_4x_data"] <= 1.1,
        ),
        (
            "calibrate",
            "2 Dask workers / 1 worker",
            f["speedup_2_workers"],
            "≥ 1.5",
            f["speedup_2_workers"] >= 1.5,
        ),
    ]
    return {"calibrate": f}, rows


def _train(quick: bool) -> tuple[dict, list[Row]]:
    import train_step

    # One torch thread: the loader's worker gets the other core, as the host has beside a GPU.
    f = train_step.measure(iters=4 if quick else 12, repeats=2 if quick else 3, threads=1)
    rows: list[Row] = [
        (
            "train",
            "real training loop / bare in-memory loop (1 torch thread)",
            f["ratio"],
            "≤ 1.10",
            f["ratio"] <= 1.10,
        )
    ]
    return {"train_step": f}, rows


BENCHES: dict[str, Callable[[bool], tuple[dict, list[Row]]]] = {
    "annotate": _annotate,
    "calibrate": _calibrate,
    "train": _train,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument(
        "--only", default=",".join(BENCHES), help="comma-separated: " + ", ".join(BENCHES)
    )
    ap.add_argument("--out", default="runs/bench/bench.json", help="JSON with every figure")
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    rows: list[Row] = []
    for name in args.only.split(","):
        t0 = time.perf_counter()
        console.print(f"[bold]bench:[/] {name} ...")
        f, r = BENCHES[name](args.quick)
        figures.update(f)
        figures.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        rows += r
    shown = [
        [s, what, round(v, 4) if isinstance(v, float) else v, target, "yes" if ok else "no"]
        for s, what, v, target, ok in rows
    ]
    console.print(
        table(
            "benchmarks (ratios measured in one run)",
            ["stage", "figure", "measured", "target", "met"],
            shown,
        )
    )
    atomic_write_json(
        args.out,
        {
            "rows": [
                dict(zip(["stage", "figure", "value", "target", "met"], r, strict=True))
                for r in rows
            ],
            "figures": figures,
        },
    )
    console.print(f"all figures: {args.out}")


if __name__ == "__main__":
    main()
