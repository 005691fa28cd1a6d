"""``python -m data_manifest``: build, validate, summarise, export and split dataset manifests."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from data_manifest import cli_support as cs
from data_manifest.cli_support import handle_errors
from data_manifest.errors import UserError
from data_manifest.manifest import SPLITS, Manifest, check_manifest_file, load

if TYPE_CHECKING:
    from data_manifest.layouts import BuildReport

app = cs.make_app(
    "data_manifest",
    "Describe a dataset once: images, labels, splits, classes, palette and a fingerprint.\n\n"
    "Build a manifest from a known layout (build voc|ade20k|cityscapes|folder), check it "
    "(validate), look at it (summary), write UniMatch split files (export), draw splits for "
    "your own data (split), or prepare a run config's data, generating the demo (prepare).",
)
build_app = cs.sub_app("Build manifest.jsonl from a dataset in a known layout.")
app.add_typer(build_app, name="build")

RootArg = Annotated[Path, typer.Argument(help="Dataset root folder.", show_default=False)]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Manifest to write [default: <root>/manifest.jsonl]."),
]
SplitsOpt = Annotated[
    Path | None,
    typer.Option(
        help="UniMatch split folder (splits/<dataset>/<name>, with labeled.txt, unlabeled.txt; "
        "val.txt there or in its parent); overrides the layout's own lists."
    ),
]
ManifestArg = Annotated[Path, typer.Argument(help="A manifest.jsonl.", show_default=False)]


def _finish(
    manifest: Manifest, root: Path, out: Path | None, report: BuildReport | None = None
) -> None:
    """Save the manifest, then print what went where: images per split, what was left out and
    why, where labels and classes came from, the background class; warnings on stderr."""
    from data_manifest.layouts import save_manifest

    out = out or root / "manifest.jsonl"
    save_manifest(manifest, out, root)
    counts = ", ".join(f"{len(manifest.split(s))} {s}" for s in SPLITS)
    cs.console.print(
        f"wrote {out}: {len(manifest)} images ({counts}), "
        f"{manifest.num_classes} classes, fingerprint {manifest.fingerprint[:12]}",
        highlight=False,
    )
    if report is None:
        return
    rows = [[what, finding] for what, finding in report.facts]
    rows.append(["splits made by", manifest.meta.splits_made_by])
    for s in SPLITS:
        split_rows = manifest.split(s)
        with_label = sum(r.label is not None for r in split_rows)
        text = f"{len(split_rows)} images ({with_label} with a label)"
        if s == "val" and not split_rows:
            text += ": `python -m data_manifest split --val N` draws some"
        rows.append([s, text])
    for n, why, first in report.left_out:
        rows.append(["left out", f"{n}: {why} (first: {first})"])
    if not report.left_out:
        rows.append(["left out", "nothing"])
    rows = [
        [a, textwrap.fill(str(b), 72, break_long_words=False, break_on_hyphens=False)]
        for a, b in rows
    ]  # narrow in a log too
    cs.console.print(cs.table("build", ["", "found"], rows))
    for line in report.warnings:
        cs.err_console.print(f"warning: {line}", highlight=False, markup=False, soft_wrap=True)


def _background_option(text: str | None) -> int | None:
    """--background-index: None (by name), "none" (no background class) or a class index."""
    from data_manifest.layouts import NO_BACKGROUND

    if text is None:
        return None
    if text.strip().lower() == "none":
        return NO_BACKGROUND
    try:
        return int(text)
    except ValueError:
        raise UserError(
            f"--background-index = {text!r}; expected a class index or 'none'"
        ) from None


BackgroundOpt = Annotated[
    str | None,
    typer.Option(
        help="Index of the background class, or 'none' [default: the class named "
        "'background', if any]. Without one, calibrate's foreground preference is off."
    ),
]


@build_app.command("voc")
@handle_errors
def build_voc_cmd(
    root: RootArg,
    out: OutOpt = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            help="Classes file ('name' or 'name r g b' per line) [default: <root>/classes.txt "
            "if there is one, else VOC's 21]."
        ),
    ] = None,
    sbd: Annotated[
        str | None,
        typer.Option(
            help="Folder under the root with the SBD augmented labels (e.g. SegmentationClassAug);"
            " its other images become the unlabeled split."
        ),
    ] = None,
    splits: SplitsOpt = None,
    train_list: Annotated[str, typer.Option(help="ImageSets/Segmentation list for 'labeled'.")] = (
        "train"
    ),
    val_list: Annotated[str, typer.Option(help="ImageSets/Segmentation list for 'val'.")] = "val",
    unlabeled_rest: Annotated[
        bool,
        typer.Option(help="Without --sbd/--splits: other JPEGImages become 'unlabeled'."),
    ] = True,
    dataset: Annotated[str, typer.Option(help="Dataset name stored in the manifest.")] = "voc",
    background_index: BackgroundOpt = None,
) -> None:
    """PASCAL VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/."""
    from data_manifest.layouts import BuildReport, build_voc

    report = BuildReport()
    m = build_voc(
        root,
        classes_file=classes,
        sbd=sbd,
        splits=splits,
        train_list=train_list,
        val_list=val_list,
        unlabeled_rest=unlabeled_rest,
        dataset=dataset,
        background_index=_background_option(background_index),
        report=report,
    )
    _finish(m, root, out, report)


@build_app.command("ade20k")
@handle_errors
def build_ade_cmd(
    root: RootArg,
    out: OutOpt = None,
    splits: SplitsOpt = None,
    dataset: Annotated[str, typer.Option(help="Dataset name stored in the manifest.")] = "ade20k",
) -> None:
    """ADE20K (ADEChallengeData2016): images/, annotations/; 150 classes, reduce_zero_label."""
    from data_manifest.layouts import BuildReport, build_ade20k

    report = BuildReport()
    _finish(build_ade20k(root, splits=splits, dataset=dataset, report=report), root, out, report)


@build_app.command("cityscapes")
@handle_errors
def build_cityscapes_cmd(
    root: RootArg,
    out: OutOpt = None,
    splits: SplitsOpt = None,
    dataset: Annotated[str, typer.Option(help="Dataset name stored in the manifest.")] = (
        "cityscapes"
    ),
) -> None:
    """Cityscapes: leftImg8bit/ and gtFine/*_labelTrainIds.png (19 classes)."""
    from data_manifest.layouts import BuildReport, build_cityscapes

    report = BuildReport()
    m = build_cityscapes(root, splits=splits, dataset=dataset, report=report)
    _finish(m, root, out, report)


@build_app.command("folder")
@handle_errors
def build_folder_cmd(
    root: RootArg,
    out: OutOpt = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            help="Classes file ('name' or 'name r g b' per line; a name once) "
            "[default: <root>/classes.txt]."
        ),
    ] = None,
    images: Annotated[str, typer.Option(help="Image folder under the root.")] = "images",
    labels: Annotated[
        str, typer.Option(help="Label folder under the root (e.g. masks).")
    ] = "labels",
    label_suffix: Annotated[
        str,
        typer.Option(
            help="Ending of label names before .png: with '_mask', images/a.jpg takes "
            "labels/a_mask.png."
        ),
    ] = "",
    splits: SplitsOpt = None,
    background_index: BackgroundOpt = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name [default: the root folder's name].")
    ] = None,
) -> None:
    """Your own data: images/<name>.<ext> (jpg, jpeg, png, bmp, tif, tiff, webp; any case; in
    sub-folders too), labels/<name>.png (class indices, 255 = ignore), classes.txt.

    Without --splits, images with a label are labeled and the others unlabeled (draw val with
    `split`); with --splits, the split files decide and images in none of them are left out.
    The summary says what went to each split, what was left out and why, and which class is
    the background.
    """
    from data_manifest.layouts import BuildReport, build_folder

    report = BuildReport()
    m = build_folder(
        root,
        classes_file=classes,
        images=images,
        labels=labels,
        label_suffix=label_suffix,
        splits=splits,
        background_index=_background_option(background_index),
        dataset=dataset,
        report=report,
    )
    _finish(m, root, out, report)


@app.command()
@handle_errors
def validate(
    manifest: ManifestArg,
    skip_bad: Annotated[
        bool,
        typer.Option(help="Write a cleaned manifest without the bad rows, and a rejects file."),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Cleaned manifest for --skip-bad [default: <name>.clean.jsonl]."),
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option(help="Rejected rows for --skip-bad [default: <name>.rejects.jsonl]."),
    ] = None,
    files: Annotated[
        bool, typer.Option(help="Open every image and label (--no-files: structure only).")
    ] = True,
    update_fingerprint: Annotated[
        bool,
        typer.Option(
            help="Store the fingerprint the rows give, after a deliberate edit by hand (caches "
            "made from the old version then refuse the manifest)."
        ),
    ] = False,
) -> None:
    """Check a manifest and its files; print every problem, one line each; exit 1 if any."""
    from data_manifest.validate import update_fingerprint as store_fingerprint
    from data_manifest.validate import validate as run_validate
    from data_manifest.validate import write_cleaned

    if skip_bad:  # refuse a clash before the work
        stem = manifest.name.removesuffix(".jsonl")
        out = out or manifest.with_name(f"{stem}.clean.jsonl")
        rejects = rejects or manifest.with_name(f"{stem}.rejects.jsonl")
        for option, path in (("--out", out), ("--rejects", rejects)):
            cs.check_not_same_file(
                path,
                manifest,
                f"{option} = {path}: is the manifest being checked; expected "
                "another file (the manifest itself is never overwritten)",
            )
        cs.check_not_same_file(
            out, rejects, f"--out and --rejects both name {out}; expected two different files"
        )
    n_rows = max(0, _count_lines(manifest) - 1)
    t0 = time.perf_counter()
    with cs.progress(transient=True) as bar:
        task = bar.add_task("validate", total=n_rows, rate="")

        def tick() -> None:
            bar.advance(task)
            done = bar.tasks[task].completed
            bar.update(task, rate=cs.rate_text(done, time.perf_counter() - t0, "img"))

        report = run_validate(manifest, check_files=files, on_row=tick)
    stale_only = report.problems and all(p.kind == "fingerprint" for p in report.problems)
    if update_fingerprint and stale_only:
        new = store_fingerprint(report)
        cs.console.print(f"{manifest}: {len(report.rows)} rows, fingerprint {new[:12]} stored")
        return
    for p in report.problems:
        cs.err_console.print(p.message, highlight=False, soft_wrap=True, markup=False)
    if report.ok:
        cs.console.print(f"{manifest}: {len(report.rows)} rows, no problems")
        return
    n_bad = len(report.bad_lines)
    cs.err_console.print(
        f"{manifest}: {len(report.problems)} problems in {n_bad} rows", highlight=False
    )
    if update_fingerprint:
        raise UserError(
            f"{manifest}: --update-fingerprint stored nothing; expected a manifest whose only "
            "problem is its fingerprint (fix the problems above first)"
        )
    if skip_bad:
        if report.fatal:
            raise UserError(
                f"{manifest}: problems above are not in rows; --skip-bad cannot fix them"
            )
        n = write_cleaned(report, out, rejects)
        cs.console.print(f"wrote {out} ({len(report.rows) - n} rows) and {rejects} ({n} rejected)")
        return
    raise typer.Exit(1)


def _count_lines(path: Path) -> int:
    """Non-empty lines of a manifest (for the progress bar's total)."""
    check_manifest_file(path)
    with open(path, "rb") as f:
        return sum(1 for ln in f if ln.strip())


def print_summary(m: Manifest, pixels: bool = True, json_out: Path | None = None) -> dict:
    """Print the summary tables of a manifest (and write its JSON); returns the figures."""
    from data_manifest.io import atomic_write_json
    from data_manifest.summary import summarize

    n = sum(r.label is not None for r in m.rows) if pixels else 0
    t0 = time.perf_counter()
    with cs.progress(transient=True, disable=not pixels) as bar:
        task = bar.add_task("label pixels", total=n, rate="")

        def tick() -> None:
            bar.advance(task)
            done = bar.tasks[task].completed
            bar.update(task, rate=cs.rate_text(done, time.perf_counter() - t0, "img"))

        s = summarize(m, pixels=pixels, on_row=tick)
    cs.console.print(
        f"{m.path}: dataset {s['dataset']!r}, fingerprint {s['fingerprint'][:16]}, root {m.root}"
    )
    rows = [[k, v["images"], v["with_label"], v["pixels"]] for k, v in s["splits"].items()]
    cs.console.print(
        cs.table("images per split", ["split", "images", "with label", "pixels"], rows)
    )
    lp: dict[str, Any] = s.get("label_pixels", {})
    cols = ["index", "class", "colour"] + [f"{k} px" for k in lp]
    table_rows = []
    for c in s["classes"]:
        i = c["index"]
        mark = " (background)" if i == m.meta.background_index else ""
        row: list[Any] = [i, c["name"] + mark, "#" + "".join(f"{v:02x}" for v in c["palette"])]
        table_rows.append(row + [lp[k]["per_class"][i] for k in lp])
    if lp:
        table_rows.append([255, "ignore", "-"] + [lp[k]["ignore"] for k in lp])
        if any(lp[k]["other"] for k in lp):
            table_rows.append(["-", "outside the classes", "-"] + [lp[k]["other"] for k in lp])
    cs.console.print(cs.table("classes and label pixels", cols, table_rows))
    if json_out is not None:
        atomic_write_json(json_out, s)
        cs.console.print(f"wrote {json_out}")
    return s


@app.command()
@handle_errors
def summary(
    manifest: ManifestArg,
    pixels: Annotated[
        bool, typer.Option(help="Count label pixels per class (reads every label).")
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
) -> None:
    """Tables: images per split, classes, label pixel counts per class and split."""
    print_summary(load(manifest), pixels=pixels, json_out=json_out)


@app.command()
@handle_errors
def export(
    manifest: ManifestArg,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="UniMatch split folder, e.g. splits/pascal/92: labeled.txt and unlabeled.txt go "
            "there, val.txt into its parent.",
        ),
    ],
) -> None:
    """Write the manifest's splits as UniMatch split files (lines 'image_rel label_rel')."""
    from data_manifest.splits import write_unimatch

    cs.check_output_dir(out, "--out")
    cs.check_output_dir(out.parent, "--out")  # val.txt goes there
    for p in write_unimatch(load(manifest), out):
        cs.console.print(f"wrote {p}")


@app.command()
@handle_errors
def split(
    manifest: ManifestArg,
    labeled: Annotated[
        str, typer.Option(help="Labeled images: a count (92) or a fraction (0.0625).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write.")],
    val: Annotated[
        str | None,
        typer.Option(help="Val images: a count or a fraction [default: keep the current val]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same split.")] = 0,
) -> None:
    """Draw labeled/unlabeled/val splits deterministically (images without labels: unlabeled)."""
    from data_manifest.config import check_seed
    from data_manifest.layouts import save_manifest
    from data_manifest.splits import make_splits, parse_amount

    check_seed(seed, "--seed")

    cs.check_not_same_file(
        out,
        manifest,
        f"--out = {out}: is the input manifest; expected a new file (caches made from "
        f"{manifest} refer to it by fingerprint, so it is never overwritten)",
    )
    m = load(manifest)
    new = make_splits(
        m,
        parse_amount(labeled, "--labeled"),
        None if val is None else parse_amount(val, "--val"),
        seed,
    )
    _finish_split(new, m, out, save_manifest)


def _finish_split(new: Manifest, old: Manifest, out: Path, save: Any) -> None:
    save(new, out, old.root)
    counts = ", ".join(f"{len(new.split(s))} {s}" for s in SPLITS)
    cs.console.print(f"wrote {out}: {counts}; fingerprint {new.fingerprint[:12]}")


@app.command()
@handle_errors
def prepare(
    config: Annotated[Path, typer.Option(help="Run config (TOML); its [data] section is used.")],
    manifest: Annotated[
        str | None, typer.Option(help="Manifest to use instead of [data] manifest.")
    ] = None,
    pixels: Annotated[bool, typer.Option(help="Count label pixels per class.")] = True,
    run_dir_opt: Annotated[
        str | None, typer.Option("--run-dir", help="Run folder (overrides run_dir).")
    ] = None,
) -> None:
    """Resolve the run config's manifest (generating the demo if configured), then summarise it.

    Writes the resolved [data] section and summary.json to <run_dir>/data/.
    """
    from data_manifest.config import load_config, run_dir, section_dict, write_resolved
    from data_manifest.resolve import data_config, resolve_manifest

    cfg = load_config(config)
    dc = data_config(cfg, manifest)
    rdir = run_dir(cfg, run_dir_opt)
    from data_manifest.ownership import check_claim, claim, holding

    out_dir = cs.check_output_dir(rdir / "data", "--run-dir")
    ours = holding("config.toml", "summary.json")
    check_claim(out_dir, "data_manifest prepare", "--run-dir", ours)
    t0 = time.perf_counter()
    path = resolve_manifest(cfg, manifest, quiet=False)
    cs.console.print(f"manifest {path} ready in {time.perf_counter() - t0:.1f} s")
    resolved = {
        "run_dir": str(rdir),
        "seed": cfg.get("seed", 0),
        "data": {**section_dict(dc), "manifest": str(path)},
    }
    claim(out_dir, "data_manifest prepare", "--run-dir", ours)
    write_resolved(out_dir / "config.toml", resolved)
    print_summary(load(path), pixels=pixels, json_out=out_dir / "summary.json")


@app.command()
@handle_errors
def demo(
    root: Annotated[
        Path, typer.Option("--out", "-o", "--root", help="Folder for source/ and target/.")
    ] = Path("data/demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    gap: Annotated[float, typer.Option(help="Domain gap strength in [0, 1].")] = 0.5,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    source_labeled: Annotated[int, typer.Option(help="Source labeled images.")] = 300,
    source_val: Annotated[int, typer.Option(help="Source val images.")] = 60,
    target_labeled: Annotated[int, typer.Option(help="Target labeled images.")] = 24,
    target_unlabeled: Annotated[int, typer.Option(help="Target unlabeled images.")] = 300,
    target_val: Annotated[int, typer.Option(help="Target val images.")] = 100,
    force: Annotated[bool, typer.Option(help="Regenerate even if present.")] = False,
) -> None:
    """Generate the embedded demo dataset (two domains of real-photo collages, VOC layout)."""
    from data_manifest import demo as demo_mod

    try:
        params = demo_mod.DemoParams(
            seed=seed,
            gap=gap,
            size=size,
            source_labeled=source_labeled,
            source_val=source_val,
            target_labeled=target_labeled,
            target_unlabeled=target_unlabeled,
            target_val=target_val,
        )
    except ValueError as exc:  # "demo_gap = 3: expected ...": name the option, --gap
        key, _, rest = str(exc).partition(" = ")
        raise UserError(f"--{key.removeprefix('demo_').replace('_', '-')} = {rest}") from None
    cs.check_output_dir(root, "--out")
    demo_mod.check_root(root, "--out")
    t0 = time.perf_counter()
    with cs.progress() as bar:
        task = bar.add_task("demo images", total=demo_mod.total_images(params), rate="")

        def tick() -> None:
            bar.advance(task)
            done = bar.tasks[task].completed
            bar.update(task, rate=cs.rate_text(done, time.perf_counter() - t0, "img"))

        path = demo_mod.generate(root, params, force=force, tick=tick, option="--out")
    cs.console.print(
        f"demo ready in {time.perf_counter() - t0:.1f} s: {root / 'source'} "
        f"(annotator training), {path} (target)"
    )
