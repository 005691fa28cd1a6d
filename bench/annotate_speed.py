"""Annotation speed: images per second of ``annotate run``, wall time over the pure model-forward
time, and where the time goes.

Both times are measured in one process on the same images, batches and model. The forward time
is a bare loop of the model alone over batches already decoded and on the device (nothing
copied, nothing post-processed); the wall time is a full run (decoding, forward passes,
probabilities, top-k, copies to the host, compression and atomic writes) into a fresh cache.
``ratio`` is the median over ``repeats`` back-to-back pairs (forward loop, full run), so a
machine whose load changes over the minutes hurts both sides of a pair alike. The CPU time of
the process per image is reported too (on a machine shared with other jobs, images per second
follow it). A run of this version also reports its time per phase (decode, H2D, forward,
post-process, D2H, encode, write; summed over threads) and, with ``--profile``, a sampling
profile of every thread.

Data sets and models:

- ``--model demo`` (default): the demo annotator on the demo's 128x128 target images.
- ``--model conv1x1`` / ``--model r101`` with ``--size WIDTHxHEIGHT --classes K`` (default
  500x375, K = 21: VOC): synthetic JPEGs of that size, and as the model a 1x1 convolution at
  full resolution (the pipeline's own ceiling) or DeepLabV3+ ResNet-101 with random weights.

``--baseline REV`` measures the pipeline of git revision REV as well, on the same images, model
and settings: REV is exported with ``git archive`` into a temporary folder and each side runs in
its own subprocess with ``PYTHONPATH`` pointing at its code, the two alternating for
``--rounds`` rounds; it prints both, the ratios of images per second and of CPU time, and
whether the image groups the two write are byte-identical.

On a CPU the decoding and writing threads compete with the model for the same cores; with
``--threads 1`` the model computes on one core and the pipeline uses the others, which is the
situation of a GPU run (the model on the device, the pipeline on the host).

    python bench/annotate_speed.py [--images 96] [--batch-size 8] [--device auto] [--threads N]
    python bench/annotate_speed.py --model conv1x1 --size 500x375 --classes 21 --baseline REV
    python bench/annotate_speed.py --model r101 --device cuda --images 320 --baseline REV
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _annotate_common import (  # noqa: E402
    ROOT,
    Sampler,
    annotator_checkpoint,
    conv1x1_model,
    demo_manifest,
    r101_model,
    synthetic_dataset,
)

TARGET = 1.10  # wall / forward on a CPU (a GPU run's target is 1.25)
GPU_TARGET = 1.25
MODELS = ("demo", "conv1x1", "r101")


@dataclass
class Setup:
    """What one measurement runs: model and data, batch size, device, threads, storage."""

    model: str = "demo"
    size: tuple[int, int] = (500, 375)  # width, height (synthetic data sets only)
    classes: int = 21
    images: int = 96
    batch_size: int = 8
    device: str = "auto"
    repeats: int = 5
    workers: int = 2
    threads: int = 0
    topk: int = -1


def prepare(setup: Setup, folder: Path) -> dict[str, str]:
    """Write the manifest and model file that ``setup`` runs on into ``folder``.

    Returns:
        {"manifest": path, "model": path, "model_desc": text}, also saved as inputs.json.
    """
    import data_manifest
    from data_manifest import Manifest

    folder.mkdir(parents=True, exist_ok=True)
    if setup.model == "demo":
        full = demo_manifest()
        meta = dataclasses.replace(full.meta, root=str(full.root))
        m = Manifest(meta=meta, rows=full.split("unlabeled")[: setup.images])
        mpath = m.save(folder / "manifest.jsonl")
        model, desc = annotator_checkpoint(m.classes, m.palette, folder)
    else:
        width, height = setup.size
        mpath = synthetic_dataset(folder / "data", setup.images, width, height, setup.classes)
        m = data_manifest.load(mpath)
        if setup.model == "conv1x1":
            model, desc = conv1x1_model(folder / "conv1x1.pt", m.classes)
        else:
            model, desc = r101_model(folder / "r101.pt", m.classes, m.palette)
    inputs = {"manifest": str(mpath), "model": str(model), "model_desc": desc}
    (folder / "inputs.json").write_text(json.dumps(inputs))
    return inputs


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """What the repeats of one measurement recorded (seconds; one entry per timed run)."""

    forward: list[float] = dataclasses.field(default_factory=list)  # the bare forward loop
    wall: list[float] = dataclasses.field(default_factory=list)  # full runs
    forward_in_run: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU (all threads)
    phases: list[dict[str, float] | None] = dataclasses.field(default_factory=list)
    digests: list[str] = dataclasses.field(default_factory=list)  # of the image groups
    profile: list[dict[str, Any]] | None = None


def _bare_loop(setup: Setup, manifest: Any, ann: Any, dev: Any, amp: bool) -> Any:
    """A function timing the model alone over the batches, decoded and on the device."""
    import numpy as np
    import torch

    from annotate.run import plan_batches

    batches = [  # in the memory layout the run gives the model: (B, H, W, 3) permuted
        torch.from_numpy(np.stack([manifest.read_image(r) for r in b.rows]))
        .permute(0, 3, 1, 2)
        .to(dev)
        for b in plan_batches(manifest, ("unlabeled",), setup.batch_size)
    ]

    def bare() -> float:
        _sync(dev)
        t = time.perf_counter()
        for x in batches:
            with (
                torch.inference_mode(),
                torch.autocast(dev.type, dtype=torch.float16, enabled=amp),
            ):
                ann.predict(x)
        _sync(dev)
        return time.perf_counter() - t

    return bare


def _time_runs(
    setup: Setup, cfg: Any, manifest: Any, ann: Any, bare: Any, profile: bool
) -> Timings:
    """Warm up, then ``setup.repeats`` pairs (bare forward loop, full run into a fresh
    cache), then with ``profile`` one more full run under the sampling profiler."""
    from annotate.run import run_annotation
    from data_manifest import Manifest

    t = Timings()
    work = Path(tempfile.mkdtemp(prefix="annotate-speed-"))

    def full(name: str, m: Any, sampler: Sampler | None = None) -> Any:
        c0 = time.process_time()
        with sampler or contextlib.nullcontext():
            res = run_annotation(cfg, m, work / name, annotator=ann)
        t.cpu.append(time.process_time() - c0)
        t.digests.append(tree_digest(work / name / "images"))
        shutil.rmtree(work / name)
        return res

    try:
        bare()  # warm-up: allocator, kernels, threads, first-call overheads
        rows = manifest.rows[: 2 * setup.batch_size]
        full("warm.zarr", Manifest(meta=manifest.meta, rows=rows, path=manifest.path))
        del t.cpu[:], t.digests[:]
        for r in range(setup.repeats):
            t.forward.append(bare())
            res = full(f"cache{r}.zarr", manifest)
            t.wall.append(res.wall_s)
            t.forward_in_run.append(res.forward_s)
            phases = getattr(res, "phases", None)  # (an earlier version has none)
            t.phases.append(dict(phases, wall=res.wall_s) if phases else None)
        if profile:
            sampler = Sampler()
            full("profile.zarr", manifest, sampler)
            t.profile = sampler.top()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return t


def run_here(setup: Setup, inputs: dict[str, str], profile: bool = False) -> dict[str, Any]:
    """Measure the ``annotate`` package importable in this process on prepared inputs."""
    import numpy as np
    import torch

    if setup.threads:
        torch.set_num_threads(setup.threads)

    import annotate
    import data_manifest
    from annotate.annotators import build_annotator
    from annotate.config import AnnotateConfig
    from annotate.run import select_device

    m = data_manifest.load(inputs["manifest"])
    cfg = AnnotateConfig(
        annotator="torch",
        model=inputs["model"],
        batch_size=setup.batch_size,
        device=setup.device,
        splits=("unlabeled",),
        workers=setup.workers,
        topk=setup.topk,
    )
    ann = build_annotator(cfg, m)
    dev = select_device(setup.device)
    ann.to(dev)
    bare = _bare_loop(setup, m, ann, dev, cfg.amp and dev.type == "cuda")
    t = _time_runs(setup, cfg, m, ann, bare, profile)
    n, wall, fwd = len(m.rows), t.wall, t.forward
    pairs = sorted(w / f for w, f in zip(wall, fwd, strict=True))
    ratio = float(np.median(pairs))
    target = GPU_TARGET if dev.type == "cuda" else TARGET
    return {
        "bench": "annotate_speed",
        "code": str(Path(annotate.__file__).resolve().parents[1]),
        "model": inputs["model_desc"],
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "images": n,
        "image_size": [m.rows[0].height, m.rows[0].width],
        "classes": len(m.classes),
        "topk": setup.topk,
        "batch_size": setup.batch_size,
        "workers": setup.workers,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "forward_s": round(min(fwd), 4),
        "wall_s": round(min(wall), 4),
        "forward_s_all": [round(v, 4) for v in fwd],
        "wall_s_all": [round(v, 4) for v in wall],
        "forward_inside_run_s": [round(v, 4) for v in t.forward_in_run],
        "images_per_s": round(n / float(np.median(wall)), 3),
        "images_per_s_best": round(n / min(wall), 3),
        # CPU time of the whole process per image: what counts when other processes take
        # the cores (a shared machine), where images per second follow the CPU share
        "cpu_ms_per_image": round(1000 * float(np.median(t.cpu[: setup.repeats])) / n, 2),
        "forward_images_per_s": round(n / float(np.median(fwd)), 3),
        "ratio": round(ratio, 4),
        "ratio_pairs": [round(v, 4) for v in pairs],
        "ratio_of_best": round(min(wall) / min(fwd), 4),
        # wall over the forward time measured inside the same run: the part of the run that
        # is not overlapped with the model (the rest of `ratio` is the model itself running
        # slower beside the pipeline's threads, on a CPU, or machine noise)
        "wall_over_forward_inside_run": round(
            float(np.median([w / f for w, f in zip(wall, t.forward_in_run, strict=True)])), 4
        ),
        "phases_s": _median_phases(t.phases),
        "images_sha256": t.digests[0],  # of the first timed run's image groups
        "runs_identical": len(set(t.digests)) == 1,
        "profile": t.profile,
        "target": target,
        "ok": ratio <= target,
    }


def tree_digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file below ``root``."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _median_phases(phases: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Per phase, the median over repeats (None for code that does not report phases)."""
    import numpy as np

    if not phases or phases[0] is None:
        return None
    return {k: round(float(np.median([p[k] for p in phases])), 4) for k in phases[0]}


def measure(
    images: int = 96,
    batch_size: int = 8,
    device: str = "auto",
    repeats: int = 5,
    workers: int = 2,
    threads: int = 0,
    **setup: Any,
) -> dict[str, Any]:
    """Run the benchmark in this process; returns its figures as a dict.

    ``ratio`` is the median over ``repeats`` back-to-back pairs (bare forward, full run) of
    wall / forward; ``ratio_of_best`` is best wall / best forward. ``threads`` sets torch's
    CPU threads (0 = leave the default). Further keywords are :class:`Setup` fields (``model``,
    ``size``, ``classes``, ``topk``).
    """
    s = Setup(
        images=images,
        batch_size=batch_size,
        device=device,
        repeats=repeats,
        workers=workers,
        threads=threads,
        **setup,
    )
    with tempfile.TemporaryDirectory() as tmp:
        return run_here(s, prepare(s, Path(tmp)))


# -- against another revision --------------------------------------------------------------


def export_revision(rev: str, dest: Path) -> str:
    """Write the tree of git revision ``rev`` of this repository into ``dest``; its commit."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"--baseline {rev}: not a revision of {ROOT}") from None
    tar = dest.with_suffix(".tar")
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, stdout=f)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return commit


def describe_checkout() -> str:
    """The current commit, and whether the tree has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + (" + uncommitted changes" if git("status", "--porcelain") else "")


def setup_args(s: Setup) -> list[str]:
    """Command-line flags that reproduce ``s``."""
    return [
        f"--model={s.model}",
        f"--size={s.size[0]}x{s.size[1]}",
        f"--classes={s.classes}",
        f"--images={s.images}",
        f"--batch-size={s.batch_size}",
        f"--device={s.device}",
        f"--repeats={s.repeats}",
        f"--workers={s.workers}",
        f"--threads={s.threads}",
        f"--topk={s.topk}",
    ]


def run_child(s: Setup, inputs: Path, code: Path, out: Path, profile: bool) -> dict[str, Any]:
    """``run_here`` in a subprocess that imports the project from ``code``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *setup_args(s)]
    cmd += ["--child", str(inputs), "--out", str(out)] + (["--profile"] if profile else [])
    env = dict(os.environ, PYTHONPATH=str(code))
    p = subprocess.run(cmd, cwd=inputs.parent, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"benchmark of {code} failed:\n{p.stderr[-3000:]}")
    r = json.loads(out.read_text())
    if Path(r["code"]).resolve() != code.resolve():
        raise SystemExit(f"the child measured {r['code']}, not {code}")
    return r


def compare(s: Setup, rev: str, rounds: int, profile: bool) -> dict[str, Any]:
    """Measure revision ``rev`` and the current tree on the same inputs, alternating."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        inputs = prepare(s, tmp_path / "inputs")
        if s.topk == -1:  # one storage for both sides: this tree's auto choice, made explicit
            import data_manifest
            from annotate.config import auto_topk

            k = len(data_manifest.load(inputs["manifest"]).classes)
            s = dataclasses.replace(s, topk=auto_topk(k))
        commit = export_revision(rev, tmp_path / "baseline")
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
        for r in range(rounds):
            last = profile and r == rounds - 1
            for name, code in (("baseline", tmp_path / "baseline"), ("current", ROOT)):
                out = tmp_path / f"{name}-{r}.json"
                runs[name].append(
                    run_child(s, tmp_path / "inputs" / "inputs.json", code, out, last)
                )
    pairs = list(zip(runs["baseline"], runs["current"], strict=True))
    speedups = [c["images_per_s"] / b["images_per_s"] for b, c in pairs]
    cpu_ratios = [b["cpu_ms_per_image"] / c["cpu_ms_per_image"] for b, c in pairs]

    def summary(side: list[dict[str, Any]]) -> dict[str, Any]:
        last = side[-1]
        return {
            "images_per_s": round(float(np.median([x["images_per_s"] for x in side])), 3),
            "cpu_ms_per_image": round(float(np.median([x["cpu_ms_per_image"] for x in side])), 2),
            "ratio": round(float(np.median([x["ratio"] for x in side])), 4),
            "phases_s": last["phases_s"],
            "profile": last["profile"],
            "runs": side,
        }

    return {
        "bench": "annotate_speed_vs_baseline",
        "baseline_rev": rev,
        "baseline_commit": commit,
        "current": describe_checkout(),
        "setup": dataclasses.asdict(s),
        "model": runs["current"][0]["model"],
        "device_name": runs["current"][0]["device_name"],
        "baseline": summary(runs["baseline"]),
        "current_code": summary(runs["current"]),
        "speedup": round(float(np.median(speedups)), 4),
        "speedup_rounds": [round(v, 4) for v in speedups],
        "cpu_time_ratio": round(float(np.median(cpu_ratios)), 4),
        # the image groups of the current code's runs against the baseline's, byte for byte
        "cache_identical_to_baseline": all(
            b["images_sha256"] == c["images_sha256"] for b, c in pairs
        ),
    }


# -- command line --------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 8 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 500x375")
    return int(parts[0]), int(parts[1])


def _print_result(r: dict[str, Any]) -> None:
    from data_manifest.cli_support import console, table

    if r["bench"] == "annotate_speed_vs_baseline":
        b, c = r["baseline"], r["current_code"]
        rows = [
            ["images / s (median)", b["images_per_s"], c["images_per_s"], r["speedup"]],
            [
                "CPU ms per image (all threads)",
                b["cpu_ms_per_image"],
                c["cpu_ms_per_image"],
                f"1 / {r['cpu_time_ratio']}",
            ],
            ["wall / forward (median of pairs)", b["ratio"], c["ratio"], ""],
        ]
        title = (
            f"annotate speed: {r['baseline_rev']} ({r['baseline_commit'][:9]}) against "
            f"{r['current']}; {r['model']} on {r['device_name']}"
        )
        console.print(table(title, ["figure", "baseline", "current", "current / baseline"], rows))
        console.print(
            f"speed-up per round: {r['speedup_rounds']}; image groups byte-identical to the "
            f"baseline's: {'yes' if r['cache_identical_to_baseline'] else 'no'}"
        )
        phases = c["phases_s"]
        profiles = [("baseline", b["profile"]), ("current", c["profile"])]
    else:
        console.print(
            f"annotate wall / forward = {r['ratio']:.3f} (median of pairs; target <= "
            f"{r['target']}), {r['images_per_s']:.2f} images/s on {r['device_name']} with "
            f"{r['torch_threads']} torch threads, {r['images']} images of "
            f"{r['image_size'][0]}x{r['image_size'][1]}, {r['model']}"
        )
        phases, profiles = r["phases_s"], [("this", r["profile"])]
    if phases:
        wall = phases.get("wall", 0.0) or 1.0
        shown = [[k, v, f"{100 * v / wall:.0f} %"] for k, v in phases.items() if k != "wall"]
        console.print(
            table(
                f"where the time goes (seconds summed over threads, one run of {wall:.2f} s wall)",
                ["phase", "seconds", "of wall"],
                shown,
            )
        )
    for name, top in profiles:
        if top:
            _print_profile(name, top)


def _print_profile(name: str, top: list[dict[str, Any]]) -> None:
    from data_manifest.cli_support import console, table

    rows = [[x["thread"], x["function"], x["seconds"], f"{100 * x['share']:.1f} %"] for x in top]
    console.print(
        table(
            f"profile of one run ({name} code; busy samples of every thread)",
            ["thread", "function", "seconds", "share"],
            rows,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="demo")
    ap.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT (not demo)")
    ap.add_argument("--classes", type=int, default=21, help="K (not demo)")
    ap.add_argument("--images", type=int, default=0, help="default: demo 96, conv1x1 64, r101 8")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=0, help="default: demo 5, else 3")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--topk", type=int, default=-1, help="-1 auto, 0 full scores")
    ap.add_argument("--baseline", metavar="REV", help="also measure git revision REV")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds with --baseline")
    ap.add_argument("--profile", action="store_true", help="sampling profile of one more run")
    ap.add_argument("--out", help="write every figure to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # inputs.json: measure, write --out
    a = ap.parse_args()
    default_images = {"demo": 96, "conv1x1": 64, "r101": 8}[a.model]
    s = Setup(
        model=a.model,
        size=a.size,
        classes=a.classes,
        images=a.images or default_images,
        batch_size=a.batch_size,
        device=a.device,
        repeats=a.repeats or (5 if a.model == "demo" else 3),
        workers=a.workers,
        threads=a.threads,
        topk=a.topk,
    )
    if a.child:
        r = run_here(s, json.loads(Path(a.child).read_text()), a.profile)
        Path(a.out).write_text(json.dumps(r, indent=2))
        return
    if a.baseline:
        r = compare(s, a.baseline, a.rounds, a.profile)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_here(s, prepare(s, Path(tmp)), a.profile)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=2))
    else:
        print(json.dumps({k: v for k, v in r.items() if k not in ("profile",)}, indent=2))
    _print_result(r)


if __name__ == "__main__":
    main()
