"""Command line of the calibrate stage: ``python -m calibrate run --config FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

import data_manifest
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
from data_manifest.config import load_config, parse_section, run_dir

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
    method: Annotated[str | None, typer.Option(help="cp, raw or threshold.")] = None,
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
    the_seed = seed if seed is not None else int(cfg.get("seed", 0))
    mpath = manifest_path(cfg, manifest)
    m = data_manifest.load(mpath)
    resolved = job.resolved_config(cfg, conf, rdir, the_seed, mpath)
    result = job.run(
        m, conf, Path(conf.cache), Path(conf.out_dir), the_seed, resolved, not is_quiet()
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
