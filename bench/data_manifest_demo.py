"""Time the demo dataset generator and the manifest tools on it.

    python bench/data_manifest_demo.py [--out runs/bench/data_manifest_demo.json]

Generates the default demo (784 images) into a temporary folder twice (checking that the bytes
are identical), then times ``validate`` and ``summarize`` on the target manifest. The target
in the project brief: generation under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from data_manifest import load
from data_manifest.demo import DemoParams, generate, total_images
from data_manifest.io import atomic_write_json
from data_manifest.summary import summarize
from data_manifest.validate import validate


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/data_manifest_demo.json")
    ap.add_argument("--gap", type=float, default=0.5)
    args = ap.parse_args()
    params = DemoParams(gap=args.gap)
    figures: dict[str, float | int | str | bool] = {"images": total_images(params)}
    with tempfile.TemporaryDirectory() as tmp:
        digests = []
        for run in (1, 2):
            root = Path(tmp) / f"demo{run}"
            t0 = time.perf_counter()
            target = generate(root, params)
            figures[f"generate_s_run{run}"] = round(time.perf_counter() - t0, 2)
            digests.append(_digest(root))
        figures["byte_identical"] = digests[0] == digests[1]
        t0 = time.perf_counter()
        report = validate(target)
        figures["validate_s"] = round(time.perf_counter() - t0, 2)
        figures["validate_ok"] = report.ok
        t0 = time.perf_counter()
        summarize(load(target))
        figures["summary_s"] = round(time.perf_counter() - t0, 2)
    figures["images_per_s"] = round(figures["images"] / figures["generate_s_run1"], 1)
    atomic_write_json(args.out, figures)
    for k, v in figures.items():
        print(f"{k:>16}: {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
