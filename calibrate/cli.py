"""Command line of the calibrate stage: ``python -m calibrate run --config FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

import data_manifest
from calibrate import evaluate as evaluate_mod
from calibrate import job, report
from calibrate.config import CalibrateConfig
from data_manifest.cli_support import (
    check_output_dir,
    console,
    handle_errors,
    is_quiet,
    make_app,
    table,
)
from data_manifest.config import check_seed, load_config, parse_section, run_dir
from data_manifest.errors import UserError
from data_manifest.ownership import check_claim, writer_lock

app = make_app(
    "calibrate", "Conformal calibration of cached annotator scores, and filtered pseudo-label PNGs."
)


def manifest_path(cfg: dict[str, Any], override: str | None) -> Path:
    """``--manifest``, else the manifest that ``[data]`` of the run config names (the demo
    dataset is generated if it is configured and absent)."""
    if override:
        return Path(override)
    return Path(data_manifest.resolve_manifest(cfg))


@app.command()
@handle_errors
def run(
    config: Annotated[
        str | None, typer.Option(help="Run config (TOML); its calibrate section is read.")
    ] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Manifest; overrides the data section of the config.")
    ] = None,
    run_dir_: Annotated[str | None, typer.Option("--run-dir", help="Overrides run_dir.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the held-out split; overrides seed.")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Miscoverage α in (0, 1).")] = None,
    mode: Annotated[str | None, typer.Option(help="pixel, class or image.")] = None,
    score: Annotated[str | None, typer.Option(help="lac (1 − p_y) or aps.")] = None,
    method: Annotated[str | None, typer.Option(help="cp, raw, threshold, risk or recall.")] = None,
    risk: Annotated[
        float | None,
        typer.Option(help="Method risk: ε in (0, 1), the kept-pixel error to control."),
    ] = None,
    risk_control: Annotated[
        str | None,
        typer.Option(help="Method risk: crc (guarantee in expectation) or ltt (w.p. 1 − δ)."),
    ] = None,
    delta: Annotated[float | None, typer.Option(help="Method risk with ltt: δ in (0, 1).")] = None,
    miss: Annotated[
        float | None,
        typer.Option(help="Method recall: ε in (0, 1), the miss rate of every object class."),
    ] = None,
    background_rule: Annotated[
        str | None, typer.Option(help="auto, prefer_foreground or most_probable.")
    ] = None,
    max_set_size: Annotated[
        int | None,
        typer.Option(help="CP: sets larger than this become 255 too (0 = no limit, the paper's)."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Confidence threshold of method threshold (default: match CP's kept pixels)."
        ),
    ] = None,
    class_min_pixels: Annotated[
        int | None,
        typer.Option(help="Class mode: classes with fewer calibration pixels use the pooled q̂."),
    ] = None,
    topk_undetermined_max: Annotated[
        float | None,
        typer.Option(
            help="Top-k caches: refuse when more than this fraction of unlabeled pixels "
            "cannot be labeled exactly from the stored classes (1 = never)."
        ),
    ] = None,
    held_out_fraction: Annotated[
        float | None,
        typer.Option(help="Fraction of labeled images held out for the report, in [0, 1)."),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="threads, processes, synchronous or tcp://HOST:PORT.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Threads or processes (0 = cores).")] = None,
    batch: Annotated[int | None, typer.Option(help="Images per Dask task.")] = None,
    cache: Annotated[
        str | None, typer.Option(help="Cache path; default {run_dir}/cache.zarr.")
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option(
            "--out-dir", "--out", "-o", help="Output folder; default {run_dir}/pseudo/{method}."
        ),
    ] = None,
    plots: Annotated[
        bool | None, typer.Option("--plots/--no-plots", help="Draw the PNG plots.")
    ] = None,
) -> None:
    """Calibrate on the labeled images, write pseudo-label PNGs for the unlabeled ones, report."""
    cfg = load_config(config)
    rdir = run_dir(cfg, run_dir_)
    overrides = dict(
        alpha=alpha,
        mode=mode,
        score=score,
        method=method,
        risk=risk,
        risk_control=risk_control,
        delta=delta,
        miss=miss,
        background_rule=background_rule,
        max_set_size=max_set_size,
        threshold=threshold,
        class_min_pixels=class_min_pixels,
        topk_undetermined_max=topk_undetermined_max,
        held_out_fraction=held_out_fraction,
        scheduler=scheduler,
        workers=workers,
        batch=batch,
        cache=cache,
        out_dir=out_dir,
        plots=plots,
    )
    conf = parse_section(cfg, "calibrate", CalibrateConfig, overrides=overrides)
    where = "--out-dir" if out_dir else "[calibrate] out_dir" if conf.out_dir else "--run-dir"
    conf = job.with_defaults(conf, cfg, rdir)
    check_output_dir(conf.out_dir, where)
    the_seed = check_seed(seed, "--seed") if seed is not None else int(cfg.get("seed", 0))
    mpath = manifest_path(cfg, manifest)
    m = data_manifest.load(mpath)
    resolved = job.resolved_config(cfg, conf, rdir, the_seed, mpath)
    result = job.run(
        m,
        conf,
        Path(conf.cache),
        Path(conf.out_dir),
        the_seed,
        resolved,
        not is_quiet(),
        option=where,
    )
    if is_quiet():
        return
    for t in report.summary_tables(result["figures"]):
        console.print(t)
    tm = result["timings"]
    console.print(
        table(
            "run",
            ["", "value"],
            [
                ["output", conf.out_dir],
                ["PNGs rewritten", str(result["rewritten"])],
                ["stale temporaries removed", str(result["removed_temporaries"])],
                ["orphan PNGs removed (ids not unlabeled)", str(result["removed_orphans"])],
                ["workers", str(result["workers"])],
                ["total time", f"{tm['total_s']:.1f} s"],
            ],
        )
    )
    print_link(Path(conf.out_dir) / "report.html")


def print_link(path: Path) -> None:
    """The command's last line: a plain link to the report, which terminals make clickable."""
    console.print(f"report: {path.resolve().as_uri()}", highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def evaluate(
    folders: Annotated[
        list[str], typer.Argument(help="Pseudo-label folders (outputs of calibrate run).")
    ],
    config: Annotated[
        str | None, typer.Option(help="Run config (TOML): its data section names the manifest.")
    ] = None,
    manifest: Annotated[
        str | None,
        typer.Option(help="Manifest; default: the config's, else the first folder's report's."),
    ] = None,
    cache: Annotated[
        str | None, typer.Option(help="Cache; default: the one the first folder was made from.")
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option(
            "--out-dir", "--out", "-o", help="Output folder; default: evaluation/ beside the first."
        ),
    ] = None,
    scheduler: Annotated[
        str, typer.Option(help="threads, processes, synchronous or tcp://HOST:PORT.")
    ] = "threads",
    workers: Annotated[int, typer.Option(help="Threads or processes (0 = cores).")] = 0,
    batch: Annotated[int, typer.Option(help="Images per Dask task.")] = 8,
) -> None:
    """Pseudo-label quality against true labels, several folders side by side, and the
    annotator's risk-coverage curve (evaluation.json, risk_coverage.png, report.html)."""
    paths = [Path(p) for p in folders]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p}: folder not found; expected a pseudo-label folder")
    first = evaluate_mod.read_report(paths[0])
    if manifest or config:
        mpath = manifest_path(load_config(config), manifest)
    else:
        mpath = Path(first["manifest"]["path"])
    m = data_manifest.load(mpath)
    cpath = Path(cache) if cache else Path(first["cache"]["path"])
    out = Path(out_dir) if out_dir else paths[0].parent / "evaluation"
    check_output_dir(out, "--out-dir" if out_dir else "evaluation folder")
    check_claim(
        out,
        evaluate_mod.OWNER,
        "--out-dir" if out_dir else "evaluation folder",
        evaluate_mod.written_by_evaluate,
    )
    try:  # the same range checks as calibrate run's
        CalibrateConfig(scheduler=scheduler, workers=workers, batch=batch)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    with writer_lock(out):
        result = evaluate_mod.run(
            m, cpath, paths, out, scheduler, workers, batch, show_progress=not is_quiet()
        )
        html = report.write_evaluation_html(out, result, m, cpath, paths)
    if is_quiet():
        return
    for t in evaluate_mod.summary_tables(result):
        console.print(t)
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print(f"wrote {out / 'evaluation.json'} and {out / 'risk_coverage.png'}")
    print_link(html)
