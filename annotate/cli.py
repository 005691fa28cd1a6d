"""``python -m annotate``: run an annotator over a manifest, inspect the cache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from annotate.config import AnnotateConfig
from data_manifest.cli_support import (
    check_output_dir,
    console,
    handle_errors,
    is_quiet,
    make_app,
    progress,
    rate_text,
    table,
)
from data_manifest.config import (
    load_config,
    locate,
    parse_section,
    run_dir,
    section_dict,
    write_resolved,
)
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_json
from data_manifest.manifest import id_path

if TYPE_CHECKING:
    from annotate.run import RunResult
    from data_manifest.manifest import Manifest

app = make_app(
    "annotate",
    "Run a segmentation model over a manifest and cache its class "
    "scores (Zarr); inspect the cache.",
)


def manifest_path(cfg: dict, override: str | None, quiet: bool = True) -> Path:
    """``--manifest`` if given, else the run config's ``[data]`` (generating the demo data
    set first when the config asks for it)."""
    if override:
        return Path(override)
    from data_manifest import resolve_manifest

    return Path(resolve_manifest(cfg, None, quiet=quiet))


def _split_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


def _input_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip() in ("", "0", "none"):
        return ()
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(
            f"--input-size = {text!r}: expected HEIGHTxWIDTH (e.g. 512x512), one "
            "number for a square, or 0 for each image's own size"
        )
    return tuple(int(p) for p in parts)


@app.command()
@handle_errors
def run(
    config: Annotated[
        Path | None,
        typer.Option(help="Run config (TOML); its [annotate] section gives the defaults."),
    ] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Manifest file (default: from [data]).")
    ] = None,
    cache: Annotated[
        str | None, typer.Option(help="Cache folder (default: {run_dir}/cache.zarr).")
    ] = None,
    run_dir_opt: Annotated[
        str | None, typer.Option("--run-dir", help="Run folder (overrides run_dir).")
    ] = None,
    annotator: Annotated[str | None, typer.Option(help="Backend: demo, torch, hf or seem.")] = None,
    model: Annotated[str | None, typer.Option(help="Model file or folder for the backend.")] = None,
    splits: Annotated[
        str | None, typer.Option(help="Comma-separated splits (default labeled,unlabeled,val).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option(help="Image decoding threads.")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (cuda if available), cpu, cuda[:N].")
    ] = None,
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="float16 autocast on CUDA.")
    ] = None,
    topk: Annotated[
        int | None, typer.Option(help="Top-k storage for unlabeled images: -1 auto, 0 off.")
    ] = None,
    resolution: Annotated[
        str | None,
        typer.Option(help="Store scores at the model's 'native' output size or at 'image' size."),
    ] = None,
    input_size: Annotated[
        str | None, typer.Option(help="Resize images to HxW before the model; 0 = own size.")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n: annotate only batches with index = i mod n (run n processes)."),
    ] = None,
    skip_bad: Annotated[
        bool | None,
        typer.Option(
            "--skip-bad/--no-skip-bad",
            help="Skip unreadable images and report them instead of stopping.",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Run shards as Dask tasks: local:N (N worker processes) or tcp://HOST:PORT."
        ),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(help="Shards for --scheduler (default: one per worker).")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Decode every cached image to find damaged ones (default: check file sizes "
            "only); damaged images are annotated again.",
        ),
    ] = False,
    no_progress: Annotated[
        bool,
        typer.Option("--no-progress", hidden=True, help="No progress bar (older name; see -q)."),
    ] = False,
) -> None:
    """Annotate the manifest's images into the cache (resumable; re-run to continue)."""
    from annotate.inspection import report_prefix
    from annotate.run import parse_shard

    cfg = load_config(config)
    overrides = {
        "annotator": annotator,
        "model": model,
        "splits": _split_list(splits),
        "batch_size": batch_size,
        "workers": workers,
        "device": device,
        "amp": amp,
        "topk": topk,
        "resolution": resolution,
        "input_size": _input_size(input_size),
        "skip_bad": skip_bad,
        "scheduler": scheduler,
        "shards": shards,
        "cache": cache,
    }
    given = [k for k, v in overrides.items() if v is not None]
    settings = parse_section(cfg, "annotate", AnnotateConfig, overrides=overrides)
    shard_i, shard_n = parse_shard(shard)
    if settings.scheduler and shard_n > 1:
        raise UserError(
            "--shard and a Dask scheduler exclude each other; expected one of them "
            "(the scheduler makes its own shards)"
        )
    rdir = run_dir(cfg, run_dir_opt)
    cache_path = Path(settings.cache) if settings.cache else rdir / "cache.zarr"
    where = "--cache" if cache else "[annotate] cache" if settings.cache else "--run-dir"
    check_output_dir(cache_path, where)
    if (cache_path / "images").is_dir():
        check_output_dir(cache_path / "images", where)
    check_output_dir(cache_path.parent, where)
    mpath = manifest_path(cfg, manifest, quiet=is_quiet() or no_progress)
    import data_manifest

    m = data_manifest.load(mpath)
    out_dir = cache_path.parent
    resolved = {
        "run_dir": str(rdir),
        "seed": cfg.get("seed", 0),
        "data": {"manifest": str(mpath)},
        "annotate": {k: v for k, v in section_dict(settings).items() if v not in ("", [], {})},
    }
    try:
        result = _annotate(settings, m, cache_path, (shard_i, shard_n), no_progress, verify)
    except UserError as exc:  # "[annotate] key = ...": name the option or the config file
        if str(exc).startswith("[annotate] "):
            raise UserError(locate(str(exc), cfg, "annotate", given)) from None
        raise
    if result.meta is not None:
        resolved["annotate"]["topk"] = result.meta.topk  # -1 (auto) resolved to k
    prefix = report_prefix(cache_path)
    write_resolved(out_dir / f"{prefix}.toml", resolved)
    report = result.report()
    report["config"] = resolved
    name = f"{prefix}.json" if shard_n == 1 else f"{prefix}.shard-{shard_i}-of-{shard_n}.json"
    atomic_write_json(out_dir / name, report)
    _print_summary(result, report, settings.splits, cache_path, out_dir / name)


def _annotate(
    settings: AnnotateConfig,
    m: Manifest,
    cache_path: Path,
    shard: tuple[int, int],
    no_progress: bool,
    verify: bool = False,
) -> RunResult:
    """Run the annotation (here, or on the Dask scheduler the settings name) under a progress
    bar whose rate counts from the moment the model is built."""
    from annotate.run import run_annotation

    shard_i, shard_n = shard
    with progress(disable=no_progress) as bar:
        task = bar.add_task(
            f"annotate {shard_i}/{shard_n}" if shard_n > 1 else "annotate", total=None, rate=""
        )
        t0 = [time.perf_counter()]

        def on_progress(done: int, total: int, _queued: int) -> None:
            if done == 0:  # the model is built: measure the rate from here
                t0[0] = time.perf_counter()
                bar.reset(task, total=total, rate="")
                return
            bar.update(
                task,
                completed=done,
                total=total,
                rate=rate_text(done, time.perf_counter() - t0[0], "img"),
            )

        if settings.scheduler:
            from annotate.run import run_on_dask

            bar.update(task, description=f"annotate on Dask ({settings.scheduler})")
            return run_on_dask(settings, m, cache_path, verify=verify)
        return run_annotation(
            settings, m, cache_path, shard, on_progress=on_progress, verify=verify
        )


def _print_summary(
    result: RunResult, report: dict, splits: tuple[str, ...], cache_path: Path, report_path: Path
) -> None:
    """The per-split table, the rate line and the skipped images, on the console."""
    rows = [
        [
            s,
            result.planned[s],
            result.present_before[s],
            result.annotated[s],
            sum(b["split"] == s for b in result.skipped),
        ]
        for s in splits
    ]
    console.print(
        table(
            f"annotate → {cache_path}",
            ["split", "images", "already cached", "annotated", "skipped"],
            rows,
        )
    )
    n = sum(result.annotated.values())
    console.print(
        f"{n} images in {result.wall_s:.1f} s ({report['images_per_s'] or 0:.1f} "
        f"img/s, forward {result.forward_s:.1f} s) on {result.device}; report "
        f"{report_path}",
        highlight=False,
    )
    if result.repaired:
        console.print(
            table(
                "damaged images, annotated again",
                ["id", "file", "problem"],
                [[r["id"], r["file"], r["reason"]] for r in result.repaired],
            )
        )
    if result.skipped:
        console.print(
            table(
                "skipped images",
                ["id", "split", "error"],
                [[b["id"], b["split"], b["error"]] for b in result.skipped],
            )
        )


@app.command()
@handle_errors
def inspect(
    path: Annotated[str, typer.Argument(help="Cache folder, run folder or run config.")],
    limit: Annotated[
        int | None, typer.Option(help="Read only the first N images for the per-class figures.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Summarise a cache: images, classes, bytes on disk, mean top probability per class."""
    from annotate.inspection import find_cache, summarize

    if limit is not None and limit < 1:
        raise UserError(f"--limit = {limit}: expected 1 or more images")
    c = find_cache(path)
    s = summarize(c, limit)
    console.print(
        table(
            f"cache {c.path}",
            ["field", "value"],
            [
                ["images", s["images"]],
                ["annotator", s["annotator"]],
                ["model sha256", s["model_sha256"][:16]],
                ["normalization", s["normalization"]],
                ["resolution", s["resolution"]],
                ["top-k (unlabeled)", s["topk"]],
                ["storage modes", ", ".join(f"{k}: {v}" for k, v in sorted(s["modes"].items()))],
                ["bytes on disk", s["bytes_on_disk"]],
                ["bytes per image", round(s["bytes_per_image"])],
            ],
        )
    )
    console.print(
        table(
            f"per class (over {s['images_read']} images)",
            ["class", "argmax pixel share", "mean top probability"],
            [
                [
                    p["class"],
                    p["pixel_share"],
                    "-" if p["mean_top_prob"] is None else f"{p['mean_top_prob']:.4f}",
                ]
                for p in s["per_class"]
            ],
        )
    )
    if json_out:
        atomic_write_json(json_out, s)
    if s["damaged"]:
        console.print(
            table(
                "damaged images",
                ["id", "file", "problem"],
                [[d["id"], d["file"], d["reason"]] for d in s["damaged"]],
            )
        )
        first = s["damaged"][0]
        raise UserError(
            f"{c.path}: {len(s['damaged'])} damaged images (first {first['id']!r}: "
            f"{first['file']}: {first['reason']}); expected complete image data: python -m "
            "annotate run annotates them again"
        )


@app.command()
@handle_errors
def show(
    path: Annotated[str, typer.Argument(help="Cache folder, run folder or run config.")],
    image_id: Annotated[str, typer.Argument(help="Image id.")],
    out: Annotated[
        Path | None, typer.Option(help="PNG to write (default: <cache folder>/../show/<id>.png).")
    ] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Manifest (default: the one recorded in the cache).")
    ] = None,
) -> None:
    """Write a PNG: image | annotator argmax in the dataset palette | top probability."""
    from annotate.inspection import find_cache, render_show

    c = find_cache(path)
    out = out or id_path(c.path.parent / "show", image_id)
    if out.is_dir():
        raise UserError(f"--out = {out}: is a folder; expected the path of a PNG file")
    check_output_dir(out.parent, "--out")
    written = render_show(c, image_id, out, manifest)
    console.print(f"wrote {written}", highlight=False)


@app.command("seem-requirements")
@handle_errors
def seem_requirements(
    seem_root: Annotated[Path, typer.Argument(help="A checkout of SEEM's repository (v1.0).")],
    detectron2: Annotated[
        Path | None,
        typer.Option(
            help="A checkout of SEEM's detectron2 fork (MaureenZOU/detectron2-xyz): also write "
            "detectron2-xyz.pth, which puts it on an environment's path."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for seem-requirements.txt and seem-constraints.txt.")
    ] = Path("."),
) -> None:
    """Write SEEM's requirements without its pins (and a constraints file that keeps this
    project's installed versions, torchvision included); print the commands that install SEEM
    next to it (docs/annotate.md, "SEEM")."""
    import sysconfig

    from annotate.seem_install import (
        check_torchvision,
        constraints,
        filter_requirements,
        read_seem_requirements,
        render,
        write_path_file,
    )
    from data_manifest.io import atomic_write_text

    filtered = filter_requirements(read_seem_requirements(seem_root), str(seem_root))
    check_torchvision()
    out.mkdir(parents=True, exist_ok=True)
    pth = write_path_file(detectron2, out) if detectron2 is not None else None
    req, con = out / "seem-requirements.txt", out / "seem-constraints.txt"
    atomic_write_text(req, render(filtered, seem_root))
    atomic_write_text(con, "\n".join(constraints()) + "\n")
    from rich.markup import escape

    rows = [[escape(line), "left out", escape(why)] for line, why in filtered.dropped]
    rows += [[line, "on the path", "--detectron2: nothing to build"] for line in filtered.build]
    rows += [[name, "added", escape(why)] for name, why in filtered.extra]
    console.print(table("SEEM's requirements", ["requirement", "", "why"], rows))
    site = sysconfig.get_path("purelib")
    console.print(
        f"wrote {req} ({len(filtered.keep)} packages, unpinned) and {con}"
        + (f" and {pth}" if pth else "")
        + "\ninstall SEEM's requirements next to this project with:\n"
        f"  pip install -r {req} -c {con}\n"
        + (f"  cp {pth} {site}\n" if pth else "  (and SEEM's detectron2 fork: --detectron2)\n"),
        highlight=False,
        soft_wrap=True,
    )


@app.command("seem-check")
@handle_errors
def seem_check(
    seem_root: Annotated[Path, typer.Argument(help="A checkout of SEEM's repository (v1.0).")],
) -> None:
    """Import SEEM's code as `annotate run` does and print the versions it runs with; a failure
    is one line naming the step of the recipe (docs/annotate.md) to redo."""
    from annotate.seem import check_install

    rows = [[name, version] for name, version in check_install(str(seem_root)).items()]
    console.print(table("SEEM imports", ["package", "version"], rows))
