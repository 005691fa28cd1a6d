"""``python -m train``: fit, evaluate, predict, export-splits.

Each command's parameters are its command-line options (Typer), hence more than eight.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from calibrate.folder import check_pseudo_folder, nothing_kept, refuse_changed
from calibrate.folder import state as pseudo_state
from data_manifest.cli_support import (
    check_not_same_file,
    check_output_dir,
    console,
    err_console,
    handle_errors,
    is_quiet,
    make_app,
    progress,
    rate_text,
)
from data_manifest.config import (
    check_seed,
    load_config,
    locate,
    parse_section,
    run_dir,
    section_dict,
)
from data_manifest.errors import UserError
from data_manifest.manifest import SPLITS, Manifest, id_path, load
from data_manifest.ownership import check_claim, claim, writer_lock
from train.config import TrainConfig
from train.run_folder import check_out

app = make_app(
    "train",
    "Train a segmentation model on labeled images and filtered "
    "pseudo-labels (Stage I), then on its own predictions (Stage II).",
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Run config (TOML).")]
ManifestOpt = Annotated[
    Path | None,
    typer.Option("--manifest", help="Manifest to use instead of the one [data] describes."),
]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Run folder (overrides run_dir).")]


def _manifest(cfg: dict[str, Any], override: Path | None) -> Manifest:
    """The run's manifest: ``--manifest``, else what ``[data]`` describes (demo generated if
    configured and absent)."""
    from data_manifest import resolve_manifest

    return load(resolve_manifest(cfg, None if override is None else str(override), quiet=False))


def _seed(cfg: dict[str, Any], override: int | None) -> int:
    return check_seed(override, "--seed") if override is not None else int(cfg.get("seed", 0))


@app.command()
@handle_errors
def fit(
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out", "-o", help="Training folder (default: [train] out, else {run_dir}/train)."
        ),
    ] = None,
    run_dir_opt: RunDirOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the config's seed).")] = None,
    pseudo_dir: Annotated[
        str | None, typer.Option(help="Pseudo-label PNG folder (default: {run_dir}/pseudo/cp).")
    ] = None,
    stage2: Annotated[
        bool | None,
        typer.Option("--stage2/--no-stage2", help="Run Stage II (self-reliance) after Stage I."),
    ] = None,
    labeled_only: Annotated[
        bool | None,
        typer.Option(
            "--labeled-only/--semi-supervised",
            help="Train on the labeled split only (the baseline), same schedule.",
        ),
    ] = None,
    stage2_mode: Annotated[
        str | None,
        typer.Option(
            help="Stage II: self (own predictions, same view), fixmatch (UniMatch's "
            "fixmatch.py) or unimatch (UniMatch's unimatch.py)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--restart",
            help="Continue from latest.pt in the run folder (default), or start again.",
        ),
    ] = True,
) -> None:
    """Train (Stage I, then Stage II) and evaluate on the val split.

    Writes to the run folder: config.toml, metrics.jsonl, latest.pt, best.pt, loss.png,
    miou.png and final.json. Under torchrun every process runs this command (DDP).
    """
    cfg = load_config(config)
    overrides = {
        "out": out,
        "pseudo_dir": pseudo_dir,
        "stage2": stage2,
        "labeled_only": labeled_only,
        "stage2_mode": stage2_mode,
        "device": device,
        "workers": workers,
    }
    options = {"stage2": "--stage2", "labeled_only": "--labeled-only"}
    tcfg = parse_section(cfg, "train", TrainConfig, overrides=overrides, options=options)
    given = [k for k, v in overrides.items() if v is not None]
    try:
        check_limits(tcfg)
    except UserError as exc:
        raise UserError(locate(str(exc), cfg, "train", given, options)) from None
    rd = run_dir(cfg, run_dir_opt)
    seed_value = _seed(cfg, seed)
    out_dir = Path(tcfg.out) if tcfg.out else rd / "train"
    where = "--out" if out else "[train] out" if tcfg.out else "--run-dir"
    check_output_dir(out_dir, where)
    pdir = Path(tcfg.pseudo_dir) if tcfg.pseudo_dir else rd / "pseudo" / "cp"
    check_not_same_file(
        out_dir,
        pdir,
        f"{where} = {out_dir}: is the pseudo-label folder; expected another folder for the "
        "training run (calibrate's files there must not be replaced)",
    )
    check_out(out_dir, where)
    m = _manifest(cfg, manifest)
    data = dict(cfg.get("data", {}))
    if manifest is not None:
        data["manifest"] = str(manifest)
    resolved = {
        "run_dir": str(rd),
        "seed": seed_value,
        "data": data,
        "train": {**section_dict(tcfg), "out": str(out_dir), "pseudo_dir": str(pdir)},
    }
    from train.trainer import fit as run_fit

    if tcfg.uses_pseudo and nothing_kept(pdir):
        err_console.print(
            f"warning: {pdir / 'calibration.json'}: the pseudo-labels keep 0 % of the unlabeled "
            "pixels, so Stage I learns from the labeled images only (as --labeled-only "
            "would); calibrate with another alpha or method to use them",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    writer = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 writes the folder
    try:
        before = pseudo_state(pdir)
        with writer_lock(out_dir) if writer else contextlib.nullcontext():
            run_fit(
                tcfg,
                manifest=m,
                out=out_dir,
                pseudo_dir=pdir,
                seed=seed_value,
                resume=resume,
                resolved=resolved,
                show_progress=not is_quiet(),
            )
        if tcfg.uses_pseudo:
            refuse_changed(pdir, before, f"the run in {out_dir}", "train again with --restart")
    except UserError as exc:  # "[train] key = ...": name the option or the config file
        if not str(exc).startswith("[train] "):
            raise
        raise UserError(locate(str(exc), cfg, "train", given, options)) from None
    if not is_quiet() and os.environ.get("RANK", "0") == "0":
        console.print(
            f"[bold]results:[/] {out_dir}/ (final.json: per-class IoU; best.pt, latest.pt; "
            f"loss.png, miou.png; metrics.jsonl)"
        )
        if not tcfg.labeled_only:
            console.print(
                f"[bold]pseudo-labels:[/] {pdir}/ (calibration.json and plots/ from calibrate)"
            )


# Upper bounds of the values that size what is held in memory at once: beyond them a typo
# (crop = 32100, scale_max = 200) exhausts the machine instead of failing.
LIMITS = {"crop": 4096, "eval_crop": 8192, "batch_size": 1024, "accum_steps": 1024, "workers": 64}
SCALE_MAX = 8.0  # UniMatch and AllSpark use 2.0


def check_limits(cfg: TrainConfig) -> None:
    """Refuse values that would exhaust the machine rather than train.

    Raises:
        UserError: ``"[train] key = value: expected ..."`` for the first one out of bounds.
    """
    for key, top in LIMITS.items():
        if getattr(cfg, key) > top:
            raise UserError(f"[train] {key} = {getattr(cfg, key)}: expected at most {top}")
    if cfg.scale_max > SCALE_MAX:
        raise UserError(
            f"[train] scale_max = {cfg.scale_max}: expected at most {SCALE_MAX:g} (images are "
            "resized by up to this factor before cropping)"
        )


def _check_inference_options(split: str, mode: str, crop: int, stride: int, device: str) -> None:
    if split not in SPLITS:
        raise UserError(f"--split = {split!r}: expected one of {', '.join(SPLITS)}")
    if mode not in ("whole", "sliding"):
        raise UserError(f"--mode = {mode!r}: expected 'whole' or 'sliding'")
    for name, value in (("--crop", crop), ("--stride", stride)):
        if not 1 <= value <= LIMITS["eval_crop"]:
            raise UserError(
                f"{name} = {value}: expected a positive number of pixels, at most "
                f"{LIMITS['eval_crop']}"
            )
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device = {device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device = 'cuda': CUDA is not available here; expected auto or cpu")


def _open_checkpoint(
    config: Path | None, manifest: Path | None, checkpoint: Path, device: str, mode: str
) -> tuple[dict[str, Any], Manifest, Any, dict]:
    """Config, manifest, and the checkpoint's model checked against the manifest's classes."""
    cfg = load_config(config)
    m = _manifest(cfg, manifest)
    model, info = _load_for_split(checkpoint, m, device)
    return cfg, m, model, info


def _load_for_split(checkpoint: Path, m: Manifest, device: str) -> tuple[Any, dict]:
    import torch

    from train.inference import load_checkpoint_model

    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    model, info = load_checkpoint_model(checkpoint, map_location=dev)
    if list(info["classes"]) != list(m.classes):
        raise UserError(
            f"{checkpoint}: classes = {info['classes']} ({len(info['classes'])}); "
            f"expected the manifest's {m.classes} ({m.num_classes})"
        )
    return model, info


@app.command()
@handle_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint (best.pt or latest.pt).")],
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    split: Annotated[str, typer.Option(help="Split with labels to evaluate on.")] = "val",
    mode: Annotated[str, typer.Option(help="whole or sliding.")] = "whole",
    crop: Annotated[int, typer.Option(help="Sliding-window size in px.")] = 512,
    stride: Annotated[int, typer.Option(help="Sliding-window stride in px.")] = 341,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the figures to this JSON file.")
    ] = None,
) -> None:
    """mIoU and per-class IoU of a checkpoint on a labeled split."""
    import torch

    from data_manifest.io import atomic_write_json
    from train.evaluation import EvalSettings, evaluate_rows, print_iou_table
    from train.metrics import summarize

    _check_inference_options(split, mode, crop, stride, device)
    if out is not None:
        if out.is_dir():
            raise UserError(f"--out = {out}: is a folder; expected the path of a JSON file")
        check_output_dir(out.parent, "--out")
    _, m, model, info = _open_checkpoint(config, manifest, checkpoint, device, mode)
    rows = m.split(split)
    if not rows or any(r.label is None for r in rows):
        problem = "no images" if not rows else "images without labels"
        raise UserError(
            f"{m.path}: split {split!r} has {problem}; expected a labeled split such as 'val'"
        )
    dev = next(model.parameters()).device
    settings = EvalSettings(info["mean"], info["std"], mode, crop, stride)
    conf = evaluate_rows(model, m, rows, settings, torch.device(dev))
    summary = summarize(conf, m.classes)
    print_iou_table(f"{checkpoint} on {split} ({len(rows)} images, {mode})", summary)
    if out is not None:
        atomic_write_json(
            out, {"checkpoint": str(checkpoint), "split": split, "mode": mode, **summary}
        )


@app.command()
@handle_errors
def predict(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint (best.pt or latest.pt).")],
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    split: Annotated[str, typer.Option(help="Split to predict.")] = "val",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: {run_dir}/predict/<split>)."),
    ] = None,
    run_dir_opt: RunDirOpt = None,
    mode: Annotated[str, typer.Option(help="whole or sliding.")] = "whole",
    crop: Annotated[int, typer.Option(help="Sliding-window size in px.")] = 512,
    stride: Annotated[int, typer.Option(help="Sliding-window stride in px.")] = 341,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    limit: Annotated[int, typer.Option(help="Predict only the first N images (0 = all).")] = 0,
) -> None:
    """Colourised predictions: one palette PNG per image (dataset palette), <out>/<id>.png."""
    import time

    import torch

    from data_manifest.io import write_label_png
    from train.inference import normalize, predict_logits

    _check_inference_options(split, mode, crop, stride, device)
    if limit < 0:
        raise UserError(f"--limit = {limit}: expected 0 (all images) or more")
    cfg = load_config(config)
    out_dir = out or run_dir(cfg, run_dir_opt) / "predict" / split
    check_output_dir(out_dir, "--out" if out else "--run-dir")
    where = "--out" if out else "--run-dir"
    check_claim(out_dir, "train predict", where)
    _, m, model, info = _open_checkpoint(config, manifest, checkpoint, device, mode)
    rows = m.split(split)[: limit or None]
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    with writer_lock(out_dir), progress() as bar:
        claim(out_dir, "train predict", where)
        task = bar.add_task(f"predict {split}", total=len(rows), rate="")
        for i, row in enumerate(rows):
            x = torch.from_numpy(m.read_image(row)).permute(2, 0, 1)[None].to(dev)
            logits = predict_logits(
                model, normalize(x, info["mean"], info["std"]), mode, crop, stride
            )
            pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
            write_label_png(id_path(out_dir, row.id), pred, m.palette)
            bar.update(task, advance=1, rate=rate_text(i + 1, time.perf_counter() - t0, "img"))
    console.print(f"wrote {len(rows)} predictions to {out_dir}", highlight=False)


@app.command("export-splits")
@handle_errors
def export_splits_cmd(
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    pseudo_dir: Annotated[
        str | None,
        typer.Option(
            help="Pseudo-label PNG folder (default: [train] pseudo_dir, else {run_dir}/pseudo/cp)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for the split files (default: {run_dir}/splits)."),
    ] = None,
    run_dir_opt: RunDirOpt = None,
) -> None:
    """UniMatch/AllSpark split files listing the pseudo-labeled images with their PNGs."""
    from train.splits import export_splits

    cfg = load_config(config)
    tcfg = parse_section(cfg, "train", TrainConfig, overrides={"pseudo_dir": pseudo_dir})
    rd = run_dir(cfg, run_dir_opt)
    out_dir = out or rd / "splits"
    where = "--out" if out else "--run-dir"
    check_output_dir(out_dir, where)
    check_claim(out_dir, "train export-splits", where)
    m = _manifest(cfg, manifest)
    pdir = Path(tcfg.pseudo_dir) if tcfg.pseudo_dir else rd / "pseudo" / "cp"
    if not pdir.is_dir():
        raise UserError(
            f"{pdir}: pseudo-label folder not found; expected the output of "
            "python -m calibrate (or --pseudo-dir)"
        )
    check_pseudo_folder(pdir, m)
    with writer_lock(out_dir):
        claim(out_dir, "train export-splits", where)
        counts = export_splits(m, pdir, out_dir)
    from data_manifest.cli_support import table

    console.print(
        table(f"split files in {out_dir}", ["file", "lines"], [[k, v] for k, v in counts.items()])
    )
