"""Bad input through every command line: one line, the right exit status, nothing written.

Table-driven. Each case runs one command of one of the four tools (typer.testing.CliRunner, in
this process) from a fresh working folder and checks

- the exit status: 1 for bad input, 2 for command-line syntax;
- the message: one line ``error: ...`` (after at most some plain progress lines) that holds the
  case's fragments (the file, option or field, and what was expected), and none of its
  forbidden texts; no traceback;
- that nothing changed on disk: neither the shared inputs nor the working folder (every file's
  size, modification time and inode, and the list of files and folders).

``validate`` reports every problem of a manifest, one line each, instead of one error; its
cases check the problem line. The inputs (a dataset and its logit cache, a TorchScript
annotator, trainer checkpoints good and bad, finished annotate and calibrate outputs) are built
once for the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _annotate_fixtures import save_torchscript
from _calibrate_fixtures import CLASSES, PALETTE, make_dataset
from PIL import Image
from typer.testing import CliRunner

import data_manifest
from annotate.cli import app as annotate_app
from calibrate.cli import app as calibrate_app
from data_manifest.cli import app as manifest_app
from data_manifest.errors import UserError
from data_manifest.manifest import Meta, Row, compute_fingerprint
from train.cli import app as train_app
from train.inference import checkpoint_info, save_checkpoint
from train.models import build_model

APPS = {"dm": manifest_app, "an": annotate_app, "ca": calibrate_app, "tr": train_app}
TINY = {"aspp_channels": 8, "low_proj": 8, "decoder_channels": 8}
PROGRESS_LINE = re.compile(r"^.+: \d+(/\d+)? in \d+\.\d s( \(.*\))?$")
runner = CliRunner()
torch.set_num_threads(1)


class Unsafe:
    """A Python object inside a .pt file: a safe load must refuse it."""


@dataclass
class World:
    """The shared inputs; ``root`` holds all of them."""

    root: Path
    manifest: Path
    cache: Path


def _config(root: Path, manifest: Path) -> str:
    return f"""run_dir = "{root / "run"}"
seed = 0

[data]
manifest = "{manifest}"

[annotate]
annotator = "torch"
model = "{root / "model.pt"}"
device = "cpu"
batch_size = 4
workers = 1

[calibrate]
plots = false

[train]
arch = "deeplabv3plus_effl0"
pretrained = false
model_kwargs = {{ aspp_channels = 8, low_proj = 8, decoder_channels = 8 }}
length_unit = "iters"
stage1_length = 1
stage2_length = 1
batch_size = 2
crop = 16
workers = 0
device = "cpu"
"""


def _checkpoints(root: Path) -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_effl0", len(CLASSES), pretrained=False, **TINY)
    info = checkpoint_info("deeplabv3plus_effl0", CLASSES, PALETTE, TINY)
    save_checkpoint(root / "ckpt.pt", model, info)
    other = {**info, "classes": ["a", "b", "c", "d"]}
    save_checkpoint(root / "other_classes.pt", model, other)
    wider = build_model(
        "deeplabv3plus_effl0", len(CLASSES), pretrained=False, **{**TINY, "aspp_channels": 16}
    )
    save_checkpoint(root / "wrong_arch.pt", wider, info)  # info says 8 ASPP channels
    good = (root / "ckpt.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.pt").write_bytes(b"")
    torch.save({"model": {}, "info": Unsafe()}, root / "unsafe.pt")
    torch.save({"weights": torch.zeros(2)}, root / "not_ours.pt")
    torch.save({"model": {}, "info": {**info, "schema": 99}}, root / "schema.pt")
    (root / "a_folder.pt").mkdir()
    torch.save({"model": {}, "info": {**info, "model_kwargs": {"depth": 3}}}, root / "kwargs.pt")
    no_classes = {k: v for k, v in info.items() if k != "classes"}
    torch.save({"model": {}, "info": no_classes}, root / "no_classes.pt")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    mpath, cpath = make_dataset(root / "ds", topk=2)
    save_torchscript(root / "model.pt", num_classes=len(CLASSES), meta={"classes": CLASSES})
    (root / "run.toml").write_text(_config(root, mpath))
    _checkpoints(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:  # finished outputs, for re-running over them
        r = runner.invoke(annotate_app, ["run", "--config", "run.toml", "-q"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(
            calibrate_app,
            ["run", "--config", "run.toml", "--cache", str(cpath), "--out-dir", "pseudo", "-q"],
        )
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(cwd)
    return World(root, mpath, cpath)


# -- helpers for the cases' set-up ------------------------------------------------------------
@dataclass
class Ctx:
    """What a case's set-up gets: the shared inputs, its own folder, a way to lock folders."""

    w: World
    t: Path
    request: pytest.FixtureRequest

    def read_only(self, path: Path) -> None:
        """Make folder ``path`` unwritable for this process, or skip the case.

        chmod does not stop root; then the immutable attribute does, where the system lets
        us set it (chattr +i needs CAP_LINUX_IMMUTABLE and a file system that has it).
        """
        path.chmod(0o555)
        self.request.addfinalizer(lambda: path.chmod(0o755))
        if _writable(path) and shutil.which("chattr"):
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
            if done.returncode == 0:
                self.request.addfinalizer(
                    lambda: subprocess.run(["chattr", "-i", str(path)], check=False)
                )
        if _writable(path):
            pytest.skip("cannot make a folder read-only here (root, no immutable attribute)")


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def manifest_variant(
    c: Ctx,
    edit: Callable[[list[dict]], list[dict]] = lambda rows: rows,
    fingerprint: str = "fresh",
    name: str = "m.jsonl",
) -> Path:
    """A copy of the shared manifest in the case's folder with edited rows.

    ``fingerprint``: "fresh" (recomputed: a consistent manifest), "stale" (the original's: a
    manifest edited by hand), or "none".
    """
    lines = c.w.manifest.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    rows = edit([json.loads(ln) for ln in lines[1:]])
    meta["root"] = str(c.w.manifest.parent)
    if fingerprint == "fresh":
        m = Meta(**{**meta, "fingerprint": ""})
        meta["fingerprint"] = compute_fingerprint(m, [Row(**r) for r in rows])
    elif fingerprint == "none":
        meta["fingerprint"] = ""
    path = c.t / name
    path.write_text("\n".join(json.dumps(x) for x in [{"meta": meta}, *rows]) + "\n")
    return path


def first_unlabeled_id(new_id: str) -> Callable[[list[dict]], list[dict]]:
    """Rename the first unlabeled row's id."""

    def edit(rows: list[dict]) -> list[dict]:
        i = next(j for j, r in enumerate(rows) if r["split"] == "unlabeled")
        rows[i] = {**rows[i], "id": new_id}
        return rows

    return edit


def move_to_labeled(rows: list[dict]) -> list[dict]:
    """Move the first val row (it has a label) into the labeled split."""
    i = next(j for j, r in enumerate(rows) if r["split"] == "val")
    rows[i] = {**rows[i], "split": "labeled"}
    return rows


def set_row(**fields: object) -> Callable[[list[dict]], list[dict]]:
    def edit(rows: list[dict]) -> list[dict]:
        rows[0] = {**rows[0], **fields}
        return rows

    return edit


def write(name: str, text: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        (c.t / name).write_text(text)

    return setup


def config(section: str, line: str) -> Callable[[Ctx], None]:
    """``c.toml``: the shared run config with ``line`` ("key = value") set in ``section``."""

    def setup(c: Ctx) -> None:
        key = line.split("=")[0].strip()
        blocks = re.split(r"(?m)^(?=\[)", (c.w.root / "run.toml").read_text())
        for i, block in enumerate(blocks):
            if block.startswith(f"[{section}]"):
                kept = [ln for ln in block.splitlines() if ln.split("=")[0].strip() != key]
                blocks[i] = "\n".join([*kept, line]) + "\n\n"
        (c.t / "c.toml").write_text("".join(blocks))

    return setup


def variant(**kw: object) -> Callable[[Ctx], None]:
    return lambda c: manifest_variant(c, **kw)  # type: ignore[arg-type]


def copy_of(src: str, dst: str, lock: str | None = None) -> Callable[[Ctx], None]:
    """Copy a shared input into the case's folder (and lock a folder of the copy)."""

    def setup(c: Ctx) -> None:
        s = c.w.root / src
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, c.t / dst)
        if lock is not None:
            c.read_only(c.t / lock)

    return setup


def locked(folder: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        (c.t / folder).mkdir(parents=True, exist_ok=True)
        c.read_only(c.t / folder)

    return setup


# -- the cases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input. ``args`` may use ``{w}`` (the shared inputs) and ``{t}`` (the case's own
    folder, also the working folder)."""

    name: str
    tool: str
    args: tuple[str, ...]
    fragments: tuple[str, ...]
    code: int = 1
    setup: Callable[[Ctx], None] | None = None
    absent: tuple[str, ...] = ()
    style: str = "error"  # "error": one error line; "problems": validate's report

    @property
    def needs_no_cuda(self) -> bool:
        """The case is about CUDA being absent."""
        return "cuda" in self.name


def case(name, tool, args, *fragments, code=1, setup=None, absent=(), style="error") -> Case:
    return Case(name, tool, tuple(args.split()), fragments, code, setup, absent, style)


M = "{w}/ds/manifest.jsonl"
C = "{w}/ds/cache.zarr"
CFG = "--config {w}/run.toml"
SEP = "contains a path separator; expected a file name without '/'"
NO_WEIGHTS_ONLY_ADVICE = ("weights_only set to False", "weights_only=False", "Traceback")

DATA_MANIFEST = [
    case("validate_missing", "dm", "validate {t}/nope.jsonl", "nope.jsonl: manifest not found"),
    case("validate_folder", "dm", "validate {t}", "is a folder; expected a manifest file"),
    case(
        "validate_binary",
        "dm",
        "validate {t}/bin.jsonl",
        "bin.jsonl: byte 0 is not UTF-8 text; expected a manifest in JSON lines",
        setup=lambda c: (c.t / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\x80"),
    ),
    case(
        "validate_empty",
        "dm",
        "validate {t}/e.jsonl",
        "e.jsonl: manifest is empty; expected a meta line",
        setup=write("e.jsonl", ""),
        style="problems",
    ),
    case(
        "validate_id_dotdot",
        "dm",
        "validate {t}/m.jsonl",
        "m.jsonl:",
        "id '../../x'",
        SEP,
        setup=variant(edit=first_unlabeled_id("../../x")),
        style="problems",
    ),
    case(
        "validate_id_absolute",
        "dm",
        "validate {t}/m.jsonl",
        "id '/abs/path'",
        SEP,
        setup=variant(edit=first_unlabeled_id("/abs/path")),
        style="problems",
    ),
    case(
        "validate_id_backslash",
        "dm",
        "validate {t}/m.jsonl",
        "id '..\\\\x'",
        SEP,
        setup=variant(edit=first_unlabeled_id("..\\x")),
        style="problems",
    ),
    case(
        "validate_id_hidden",
        "dm",
        "validate {t}/m.jsonl",
        "id '.x' starts with a dot",
        setup=variant(edit=first_unlabeled_id(".x")),
        style="problems",
    ),
    case(
        "validate_id_too_long",
        "dm",
        "validate {t}/m.jsonl",
        "is 81 bytes long",
        "at most 80 bytes",
        setup=variant(edit=first_unlabeled_id("x" * 81)),
        style="problems",
    ),
    case(
        "validate_id_newline",
        "dm",
        "validate {t}/m.jsonl",
        "contains a control character",
        setup=variant(edit=first_unlabeled_id("a\nb")),
        style="problems",
    ),
    case(
        "validate_id_empty",
        "dm",
        "validate {t}/m.jsonl",
        "id '' is empty",
        setup=variant(edit=first_unlabeled_id("")),
        style="problems",
    ),
    case(
        "validate_stale_fingerprint",
        "dm",
        "validate {t}/m.jsonl",
        "m.jsonl: meta.fingerprint = ",
        "the file was changed after it was written: expected an unchanged manifest",
        "--update-fingerprint",
        setup=variant(edit=move_to_labeled, fingerprint="stale"),
        style="problems",
    ),
    case(
        "validate_unknown_split",
        "dm",
        "validate {t}/m.jsonl",
        "split = 'train'; expected one of labeled, unlabeled, val",
        setup=variant(edit=set_row(split="train")),
        style="problems",
    ),
    case(
        "validate_height_is_text",
        "dm",
        "validate {t}/m.jsonl",
        "row field 'height' = '24'; expected int",
        setup=variant(edit=set_row(height="24")),
        style="problems",
    ),
    case(
        "validate_path_leaves_root",
        "dm",
        "validate {t}/m.jsonl",
        "path '../x.png' leaves the dataset root",
        setup=variant(edit=set_row(image="../x.png")),
        style="problems",
    ),
    case(
        "validate_size_differs",
        "dm",
        "validate {t}/m.jsonl",
        "height, width = 25, 32 but image",
        "expected the image's size",
        setup=variant(edit=set_row(height=25)),
        style="problems",
    ),
    case(
        "validate_bad_json",
        "dm",
        "validate {t}/j.jsonl",
        "j.jsonl:2: not valid JSON",
        setup=lambda c: (c.t / "j.jsonl").write_text(
            c.w.manifest.read_text().splitlines()[0] + "\n{not json\n"
        ),
        style="problems",
    ),
    case(
        "validate_meta_without_classes",
        "dm",
        "validate {t}/k.jsonl",
        "meta field 'classes' is missing",
        setup=write("k.jsonl", '{"meta": {"dataset": "x", "palette": []}}\n'),
        style="problems",
    ),
    case(
        "skip_bad_out_is_input",
        "dm",
        "validate {t}/m.jsonl --skip-bad --out {t}/m.jsonl",
        "--out = ",
        "is the manifest being checked; expected another file",
        setup=variant(edit=set_row(height=25)),
    ),
    case(
        "skip_bad_rejects_is_out",
        "dm",
        "validate {t}/m.jsonl --skip-bad --out {t}/a.jsonl --rejects {t}/a.jsonl",
        "--out and --rejects both name",
        setup=variant(edit=set_row(height=25)),
    ),
    case("summary_missing", "dm", "summary {t}/nope.jsonl", "nope.jsonl: manifest not found"),
    case(
        "summary_bad_id",
        "dm",
        "summary {t}/m.jsonl",
        "m.jsonl:",
        "id '../../x'",
        SEP,
        setup=variant(edit=first_unlabeled_id("../../x")),
    ),
    case(
        "summary_stale_fingerprint",
        "dm",
        "summary {t}/m.jsonl",
        "meta.fingerprint = ",
        "expected an unchanged manifest",
        setup=variant(edit=move_to_labeled, fingerprint="stale"),
    ),
    case(
        "summary_json_is_folder",
        "dm",
        f"summary {M} --no-pixels --json {{t}}/sub",
        "sub: is a directory; expected a file, not a folder",
        setup=lambda c: (c.t / "sub").mkdir(),
    ),
    case(
        "export_out_is_file",
        "dm",
        f"export {M} -o {{t}}/f/92",
        "--out = ",
        "f/92: is under the file",
        "expected a folder",
        setup=write("f", "x"),
    ),
    case(
        "split_onto_its_input",
        "dm",
        "split {t}/m.jsonl --labeled 2 -o {t}/m.jsonl",
        "--out = ",
        "is the input manifest; expected a new file",
        setup=variant(),
    ),
    case(
        "split_onto_its_input_by_link",
        "dm",
        "split {t}/m.jsonl --labeled 2 -o {t}/link.jsonl",
        "is the input manifest",
        setup=lambda c: (c.t / "link.jsonl").symlink_to(manifest_variant(c)),
    ),
    case("split_labeled_text", "dm", f"split {M} --labeled many -o {{t}}/o.jsonl", "--labeled"),
    case(
        "split_labeled_too_many",
        "dm",
        f"split {M} --labeled 1000 -o {{t}}/o.jsonl",
        "asked for 1000 labeled + 0 val images but only 6 images have labels",
    ),
    case("split_val_negative", "dm", f"split {M} --labeled 2 --val -1 -o {{t}}/o.jsonl", "--val"),
    case(
        "build_voc_missing_root",
        "dm",
        "build voc {t}/VOC",
        "no JPEGImages/ folder; expected the root of a PASCAL VOC dataset",
    ),
    case(
        "build_folder_no_classes",
        "dm",
        "build folder {t}/own",
        "classes.txt",
        setup=lambda c: (c.t / "own" / "images").mkdir(parents=True),
    ),
    case(
        "build_folder_long_name",
        "dm",
        "build folder {t}/own",
        "id '" + "y" * 81 + "' is 81 bytes long",
        setup=lambda c: (
            (c.t / "own" / "images").mkdir(parents=True),
            (c.t / "own" / "classes.txt").write_text("background\nthing\n"),
            shutil.copy(
                c.w.root / "ds" / "images" / "lab000.png",
                c.t / "own" / "images" / ("y" * 81 + ".png"),
            ),
        ),
    ),
    case(
        "build_into_read_only_folder",
        "dm",
        "build folder {t}/own -o {t}/ro/m.jsonl",
        "ro: ",
        "expected a file or folder this user may",
        setup=lambda c: (
            (c.t / "own" / "images").mkdir(parents=True),
            (c.t / "own" / "classes.txt").write_text("background\nthing\n"),
            shutil.copy(
                c.w.root / "ds" / "images" / "lab000.png", c.t / "own" / "images" / "a.png"
            ),
            (c.t / "own" / "labels").mkdir(),
            shutil.copy(
                c.w.root / "ds" / "labels" / "lab000.png", c.t / "own" / "labels" / "a.png"
            ),
            locked("ro")(c),
        ),
    ),
    case(
        "summary_json_read_only",
        "dm",
        f"summary {M} --no-pixels --json {{t}}/ro/s.json",
        "ro: ",
        "expected a file or folder this user may",
        setup=locked("ro"),
    ),
    case("prepare_config_missing", "dm", "prepare --config {t}/no.toml", "no.toml: config file"),
    case(
        "prepare_config_bad_toml",
        "dm",
        "prepare --config {t}/c.toml",
        "c.toml: invalid TOML",
        setup=write("c.toml", "run_dir = [\n"),
    ),
    case(
        "prepare_config_unknown_key",
        "dm",
        "prepare --config {t}/c.toml",
        "c.toml: unknown key 'rundir'; expected run_dir, seed",
        setup=write("c.toml", 'rundir = "x"\n'),
    ),
    case(
        "prepare_config_demo_gap",
        "dm",
        "prepare --config {t}/c.toml",
        "c.toml: [data] demo_gap = 3",
        "expected a number in [0, 1]",
        setup=write("c.toml", "[data]\ndemo = true\ndemo_gap = 3\n"),
    ),
    case(
        "prepare_manifest_missing",
        "dm",
        "prepare --config {t}/c.toml",
        "c.toml: [data] manifest = 'gone.jsonl' does not exist",
        setup=write("c.toml", '[data]\nmanifest = "gone.jsonl"\n'),
    ),
    case("demo_gap", "dm", "demo --out {t}/d --gap 3", "--gap = 3.0: expected a number in [0, 1]"),
    case("demo_size", "dm", "demo --out {t}/d --size 5", "--size = 5: expected an integer in"),
    case(
        "demo_out_is_file",
        "dm",
        "demo --out {t}/f",
        "--out = ",
        "f: is a file; expected a folder",
        setup=write("f", "x"),
    ),
    case("unknown_option", "dm", f"validate {M} --fast", "No such option: --fast", code=2),
    case("unknown_command", "dm", "valdate x", "No such command 'valdate'", code=2),
    case("missing_argument", "dm", "validate", "Missing argument 'manifest'", code=2),
    # data in: what the builders take from a folder, and what they refuse
    case(
        "build_folder_duplicate_class_name",
        "dm",
        "build folder {t}/own",
        "own/classes.txt:3: class name 'wall' is also on an earlier line; expected each class once",
        setup=lambda c: own_folder(c, classes="backdrop\nwall\nwall\n"),
    ),
    case(
        "build_folder_jpeg_label",
        "dm",
        "build folder {t}/own",
        "own/labels/a.jpg: label is a JPEG file, a lossy format",
        "expected a lossless PNG of class indices",
        setup=lambda c: own_folder(c, label="a.jpg"),
    ),
    case(
        "build_folder_labels_named_mask",
        "dm",
        "build folder {t}/own",
        "own/labels: no label file matches an image: 1 files (first: labels/a_mask.png)",
        "expected labels/<name>.png for images/<name>.<ext>",
        "--label-suffix _mask matches 1 of them",
        setup=lambda c: own_folder(c, label="a_mask.png"),
    ),
    case(
        "build_folder_no_label_folder",
        "dm",
        "build folder {t}/own",
        "own/labels: label folder not found",
        "masks/ holds 1 PNG files: --labels masks?",
        setup=lambda c: own_folder(c, label="a.png", labels="masks"),
    ),
    case(
        "validate_greyscale_jpeg_label",
        "dm",
        "validate {t}/own/manifest.jsonl",
        "label = 'labels/a.jpg': label is a JPEG file, a lossy format",
        setup=lambda c: manifest_with_label(c, "a.jpg"),
        style="problems",
    ),
]


def own_folder(
    c: Ctx, classes: str = "background\nthing\n", label: str = "a.png", labels: str = "labels"
) -> Path:
    """``{t}/own``: a folder-layout dataset with one image ``images/a.png`` and its label
    saved as ``<labels>/<label>`` (a greyscale JPEG when the name ends in .jpg)."""
    root = c.t / "own"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text(classes)
    shutil.copy(c.w.root / "ds" / "images" / "lab000.png", root / "images" / "a.png")
    lab = np.asarray(Image.open(c.w.root / "ds" / "labels" / "lab000.png"))
    (root / labels).mkdir()
    Image.fromarray(lab.astype(np.uint8), mode="L").save(root / labels / label)
    return root


def manifest_with_label(c: Ctx, label: str) -> None:
    """``{t}/own/manifest.jsonl`` whose labeled row names ``labels/<label>`` (written by hand,
    as a builder would refuse a JPEG label)."""
    root = own_folder(c, label=label)
    h, w = np.asarray(Image.open(root / "images" / "a.png")).shape[:2]
    meta = Meta(dataset="own", classes=["background", "thing"], palette=[[0, 0, 0], [9, 9, 9]])
    row = Row(
        id="a", image="images/a.png", label=f"labels/{label}", split="labeled", height=h, width=w
    )
    from data_manifest import Manifest

    Manifest(meta=meta, rows=[row]).save(root / "manifest.jsonl")


def _dm(*args: object) -> object:
    r = runner.invoke(manifest_app, [str(a) for a in args])
    assert "Traceback" not in r.output
    return r


def _flat(text: str) -> str:
    """A table's text without its borders and line breaks (cells wrap long findings)."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘━─┳┻╇╈┼┬┴]", " ", text).split())


def test_build_voc_honours_the_folders_classes_txt(tmp_path: Path) -> None:
    """A VOC-layout folder with its own 7-class classes.txt: the manifest has those 7 names."""
    from _data_manifest_fixtures import make_voc

    root = make_voc(tmp_path / "VOC", sbd=())
    names = ["backdrop", "wall", "lawn", "stones", "animal", "drink", "money"]
    (root / "classes.txt").write_text("".join(n + "\n" for n in names))
    r = _dm("build", "voc", root, "--background-index", "0")
    assert r.exit_code == 0, r.output
    m = data_manifest.load(root / "manifest.jsonl")
    assert m.classes == names and len(m.palette) == 7 and m.meta.background_index == 0
    assert f"7 from {root / 'classes.txt'}" in _flat(r.stdout)


def test_build_folder_reports_label_files_it_skips(tmp_path: Path) -> None:
    """Labels named *_mask.png beside plain ones: the ones that match no image are reported
    with the reason and the option that would take them; --label-suffix takes them."""
    from _data_manifest_fixtures import write_grey_label, write_png_image

    root = tmp_path / "own"
    root.mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    for n in ("a", "b", "c"):
        write_png_image(root / "images" / f"{n}.png", 4, 5)
    lab = np.zeros((4, 5), np.uint8)
    write_grey_label(root / "labels" / "a.png", lab)
    write_grey_label(root / "labels" / "b_mask.png", lab)
    write_grey_label(root / "labels" / "c_mask.png", lab)
    (root / "images" / "notes.txt").write_text("x")
    r = _dm("build", "folder", root)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert any(
        "2 files left out: a label file that matches no image" in w
        and "--label-suffix _mask matches 2 of them" in w
        and "(first: labels/b_mask.png)" in w
        for w in warnings
    ), warnings
    assert any("1 file left out: not an image (.txt;" in w for w in warnings), warnings
    m = data_manifest.load(root / "manifest.jsonl")
    assert [r.id for r in m.split("labeled")] == ["a"]
    r = _dm("build", "folder", root, "--label-suffix", "_mask", "-o", tmp_path / "m2.jsonl")
    assert r.exit_code == 0, r.output
    m2 = data_manifest.load(tmp_path / "m2.jsonl")
    assert {r.id: r.label for r in m2.split("labeled")} == {
        "b": "labels/b_mask.png",
        "c": "labels/c_mask.png",
    }


def test_build_folder_exif_rotated_jpeg_gets_the_readers_size(tmp_path: Path) -> None:
    """A JPEG whose EXIF orientation turns it by 90°: the manifest row has the size the readers
    decode (rotated), so validate passes instead of asking to rebuild the manifest."""
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    im = Image.fromarray(np.full((20, 40, 3), 128, np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(root / "images" / "a.jpg", exif=exif.tobytes())
    (root / "labels").mkdir()
    Image.fromarray(np.zeros((40, 20), np.uint8), mode="L").save(root / "labels" / "a.png")
    r = _dm("build", "folder", root)
    assert r.exit_code == 0, r.output
    m = data_manifest.load(root / "manifest.jsonl")
    row = m.row("a")
    assert (row.height, row.width) == m.read_image(row).shape[:2] == (40, 20)
    r = _dm("validate", root / "manifest.jsonl")
    assert r.exit_code == 0 and "no problems" in r.stdout, r.output


def test_build_folder_summary_says_what_went_where(tmp_path: Path) -> None:
    """The summary: images per split, labels found, what was left out, and which class is the
    background, or that none is and what that switches off."""
    from _data_manifest_fixtures import write_grey_label, write_png_image

    root = tmp_path / "own"
    root.mkdir()
    (root / "classes.txt").write_text("backdrop\nthing\n")
    for n in ("a", "b", "c"):
        write_png_image(root / "images" / f"{n}.png", 4, 5)
    write_grey_label(root / "masks" / "a.png", np.zeros((4, 5), np.uint8))
    r = _dm("build", "folder", root, "--labels", "masks")
    assert r.exit_code == 0, r.output
    out = _flat(r.stdout)
    for text in (
        "1 labeled, 2 unlabeled, 0 val",
        "1 in masks/ (2 images without one: unlabeled)",
        "none (no class is named 'background'): calibrate's foreground preference is off",
    ):
        assert text in out, (text, out)
    assert "if 'backdrop' is the background, rebuild with --background-index 0" in r.stderr
    r = _dm("build", "folder", root, "--labels", "masks", "--background-index", "0")
    assert r.exit_code == 0 and "class 0 'backdrop'" in r.stdout and not r.stderr.strip()
    assert data_manifest.load(root / "manifest.jsonl").meta.background_index == 0


ANNOTATE = [
    case("config_missing", "an", "run --config {t}/no.toml", "no.toml: config file not found"),
    case("manifest_missing", "an", f"run {CFG} --manifest {{t}}/no.jsonl", "manifest not found"),
    case(
        "batch_size_zero",
        "an",
        f"run {CFG} --batch-size 0",
        "--batch-size = 0: expected an integer >= 1",
        absent=("run.toml",),
    ),
    case("topk_range", "an", f"run {CFG} --topk 300", "--topk = 300: expected -1 (auto)"),
    case(
        "splits_unknown",
        "an",
        f"run {CFG} --splits labeled,train",
        "--splits = ['labeled', 'train']: expected distinct names from labeled, unlabeled, val",
    ),
    case("input_size", "an", f"run {CFG} --input-size 10x", "--input-size = '10x': expected"),
    case("input_size_small", "an", f"run {CFG} --input-size 4", "--input-size = [4, 4]: expected"),
    case("shard_range", "an", f"run {CFG} --shard 2/2", "--shard = '2/2': expected i/n"),
    case("device_unknown", "an", f"run {CFG} --device tpu", "--device = 'tpu': expected"),
    case(
        "annotator_unknown",
        "an",
        f"run {CFG} --annotator sam",
        "--annotator = 'sam'; expected one of 'demo', 'torch', 'hf', 'seem'",
    ),
    case(
        "device_cuda_missing",
        "an",
        f"run {CFG} --device cuda",
        "--device = 'cuda': CUDA is not available on this machine",
        absent=("run.toml",),
    ),
    case(
        "hf_model_missing",
        "an",
        f"run {CFG} --annotator hf --model {{t}}/no_model",
        "--model = ",
        "expected a folder with a transformers config.json",
    ),
    case(
        "seem_root_missing",
        "an",
        "run --config {t}/c.toml --annotator seem --model {t}/seem.pt",
        "c.toml: [annotate] seem_root = 'nowhere': folder not found; expected a checkout of SEEM",
        setup=config("annotate", 'seem_root = "nowhere"'),
    ),
    case("scheduler_bad", "an", f"run {CFG} --scheduler local:x", "--scheduler = 'local:x'"),
    case("shards_negative", "an", f"run {CFG} --shards -1", "--shards = -1: expected 0"),
    case(
        "config_batch_size",
        "an",
        "run --config {t}/c.toml",
        "c.toml: [annotate] batch_size = 0: expected an integer >= 1",
        setup=config("annotate", "batch_size = 0"),
    ),
    case(
        "config_unknown_key",
        "an",
        "run --config {t}/c.toml",
        "c.toml: [annotate] unknown key 'batchsize'; expected one of",
        setup=config("annotate", "batchsize = 2"),
    ),
    case(
        "model_missing",
        "an",
        f"run {CFG} --model {{t}}/none.pt",
        "--model = ",
        "none.pt': file not found; expected a TorchScript file or a trainer checkpoint",
    ),
    case(
        "model_random_bytes",
        "an",
        f"run {CFG} --model {{w}}/random.pt",
        "random.pt: cannot read checkpoint: not a PyTorch file",
        absent=NO_WEIGHTS_ONLY_ADVICE,
    ),
    case(
        "model_unsafe_pickle",
        "an",
        f"run {CFG} --model {{w}}/unsafe.pt",
        "unsafe.pt: cannot read checkpoint: it holds Python objects",
        "a safe load (weights_only=True) refuses",
        absent=("weights_only set to False", "Traceback"),
    ),
    case(
        "demo_model_misspelled",
        "an",
        f"run {CFG} --annotator demo --model {{t}}/best.ptt",
        "--model = ",
        "best.ptt': file not found; expected a demo annotator checkpoint",
        absent=("training it now",),
    ),
    case(
        "cache_is_file",
        "an",
        f"run {CFG} --cache {{t}}/f",
        "--cache = ",
        "f: is a file; expected a folder",
        setup=write("f", "x"),
    ),
    case(
        "cache_not_a_cache",
        "an",
        f"run {CFG} --cache {{t}}/d",
        "d: exists and is not a cache; choose another cache path",
        setup=lambda c: ((c.t / "d").mkdir(), (c.t / "d" / "x").write_text("x")),
    ),
    case(
        "cache_of_another_model",
        "an",
        f"run {CFG} --cache {{t}}/c.zarr",
        "c.zarr: cache was made with annotator = 'synthetic', this run has 'torch'",
        setup=copy_of("ds/cache.zarr", "c.zarr"),
    ),
    case(
        "cache_of_another_manifest",
        "an",
        "run {CFG} --manifest {t}/m.jsonl --cache {w}/run/cache.zarr".replace("{CFG}", CFG),
        "cache.zarr: cache was made with manifest_fingerprint",
        setup=variant(edit=move_to_labeled),
    ),
    case(
        "manifest_stale_fingerprint",
        "an",
        f"run {CFG} --manifest {{t}}/m.jsonl",
        "m.jsonl: meta.fingerprint = ",
        setup=variant(edit=move_to_labeled, fingerprint="stale"),
    ),
    case(
        "rerun_read_only_cache_folder",
        "an",
        f"run {CFG} --cache {{t}}/annot/cache.zarr",
        "--cache = ",
        "not writable",
        "expected a folder this user may write to",
        setup=lambda c: (
            (c.t / "annot").mkdir(),
            shutil.copytree(c.w.root / "run" / "cache.zarr", c.t / "annot" / "cache.zarr"),
            c.read_only(c.t / "annot"),
        ),
    ),
    case(
        "read_only_run_dir",
        "an",
        f"run {CFG} --run-dir {{t}}/r",
        "--run-dir = ",
        "not writable",
        setup=locked("r"),
    ),
    case("inspect_missing", "an", "inspect {t}/nowhere", "nowhere: not a cache, a run folder"),
    case("inspect_limit", "an", f"inspect {C} --limit 0", "--limit = 0: expected 1 or more"),
    case(
        "show_id_escapes",
        "an",
        f"show {C} ../../x --manifest {M}",
        "id '../../x' contains a path separator",
    ),
    case(
        "show_id_unknown", "an", f"show {C} nope --manifest {M}", "image 'nope' is not in the cache"
    ),
    case(
        "show_out_is_folder",
        "an",
        f"show {C} lab000 --manifest {M} --out {{t}}",
        "--out = ",
        "is a folder; expected the path of a PNG file",
    ),
    case(
        "show_no_manifest",
        "an",
        f"show {C} lab000",
        "cache.zarr: the manifest it was made from is not available; expected --manifest PATH",
    ),
    case(
        "show_other_manifest",
        "an",
        f"show {C} lab000 --manifest {{t}}/m.jsonl",
        "m.jsonl: manifest fingerprint",
        "expected the manifest the cache was made from",
        setup=variant(edit=move_to_labeled),
    ),
    case("unknown_option", "an", f"run {CFG} --no-progres", "No such option", code=2),
    case("bad_int", "an", f"run {CFG} --batch-size two", "'--batch-size'", code=2),
]

CALIBRATE = [
    case(
        "alpha_zero",
        "ca",
        f"run {CFG} --alpha 0",
        "--alpha = 0.0: expected a number in (0, 1)",
        absent=("run.toml", "[calibrate] alpha"),
    ),
    case("alpha_above_one", "ca", f"run {CFG} --alpha 1.5", "--alpha = 1.5: expected"),
    case("alpha_text", "ca", f"run {CFG} --alpha abc", "'--alpha'", code=2),
    case(
        "config_alpha",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] alpha = 2: expected a number in (0, 1)",
        setup=config("calibrate", "alpha = 2"),
    ),
    case(
        "config_alpha_text",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] alpha = '0.1'; expected a number",
        setup=config("calibrate", 'alpha = "0.1"'),
    ),
    case(
        "config_unknown_key",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] unknown key 'alfa'; expected one of alpha",
        setup=config("calibrate", "alfa = 0.1"),
    ),
    case(
        "config_section_not_table",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] must be a table",
        setup=write("c.toml", "calibrate = 3\n"),
    ),
    case("mode", "ca", f"run {CFG} --mode region", "--mode = 'region'; expected one of 'pixel'"),
    case("method", "ca", f"run {CFG} --method aps", "--method = 'aps'; expected one of 'cp'"),
    case("score", "ca", f"run {CFG} --score thr", "--score = 'thr'; expected one of 'lac'"),
    case("background_rule", "ca", f"run {CFG} --background-rule fg", "--background-rule = 'fg'"),
    case(
        "held_out_one",
        "ca",
        f"run {CFG} --held-out-fraction 1",
        "--held-out-fraction = 1.0: expected a number in [0, 1)",
    ),
    case("batch_zero", "ca", f"run {CFG} --batch 0", "--batch = 0: expected >= 1"),
    case("workers_negative", "ca", f"run {CFG} --workers -1", "--workers = -1: expected >= 0"),
    case("max_set_size", "ca", f"run {CFG} --max-set-size -1", "--max-set-size = -1: expected"),
    case("threshold_zero", "ca", f"run {CFG} --threshold 0", "--threshold = 0.0: expected"),
    case("scheduler", "ca", f"run {CFG} --scheduler gpu", "--scheduler = 'gpu': expected"),
    case("risk_zero", "ca", f"run {CFG} --method risk --risk 0", "--risk = 0.0: expected a"),
    case("risk_one", "ca", f"run {CFG} --method risk --risk 1", "--risk = 1.0: expected a"),
    case("delta_zero", "ca", f"run {CFG} --risk-control ltt --delta 0", "--delta = 0.0: expected"),
    case("risk_control", "ca", f"run {CFG} --risk-control fdr", "--risk-control = 'fdr'"),
    case("evaluate_no_folder", "ca", "evaluate {t}/none", "none: folder not found"),
    case(
        "evaluate_not_pseudo",
        "ca",
        "evaluate {w}/ds",
        "ds: not a pseudo-label folder (no calibration.json)",
    ),
    case(
        "evaluate_other_manifest",
        "ca",
        "evaluate {w}/pseudo --manifest {t}/m.jsonl",
        "calibration.json: manifest fingerprint ",
        "expected pseudo-labels made from this manifest",
        setup=variant(edit=move_to_labeled),
    ),
    case(
        "evaluate_out_is_file",
        "ca",
        "evaluate {w}/pseudo --out-dir {t}/f",
        "--out-dir = ",
        "f: is a file; expected a folder (created if absent)",
        setup=write("f", "x"),
    ),
    case("evaluate_batch", "ca", "evaluate {w}/pseudo --batch 0", "--batch = 0: expected >= 1"),
    case(
        "out_dir_is_file",
        "ca",
        f"run {CFG} --cache {C} --out-dir {{t}}/f",
        "--out-dir = ",
        "f: is a file; expected a folder (created if absent)",
        setup=write("f", "x"),
    ),
    case(
        "out_dir_under_file",
        "ca",
        f"run {CFG} --cache {C} --out-dir {{t}}/f/sub",
        "is under the file",
        setup=write("f", "x"),
    ),
    case(
        "rerun_read_only_out_dir",
        "ca",
        f"run {CFG} --cache {C} --out-dir {{t}}/pseudo",
        "--out-dir = ",
        "not writable; expected a folder this user may write to",
        setup=copy_of("pseudo", "pseudo", lock="pseudo"),
    ),
    case(
        "read_only_run_dir",
        "ca",
        f"run {CFG} --cache {C} --run-dir {{t}}/r",
        "--run-dir = ",
        "not writable",
        setup=locked("r"),
    ),
    case("cache_missing", "ca", f"run {CFG} --cache {{t}}/none.zarr", "none.zarr"),
    case(
        "cache_other_classes",
        "ca",
        f"run {CFG} --cache {{t}}/ds/cache.zarr",
        "cache.zarr: classes = ",
        "expected a cache annotated with this manifest's class list",
        setup=lambda c: make_dataset(c.t / "ds", 1, 1, 0, classes=["bg", "x", "y", "z"]),
    ),
    case(
        "manifest_stale_fingerprint",
        "ca",
        f"run {CFG} --cache {C} --manifest {{t}}/m.jsonl",
        "m.jsonl: meta.fingerprint = ",
        "expected an unchanged manifest",
        setup=variant(edit=move_to_labeled, fingerprint="stale"),
    ),
    case(
        "cache_of_old_manifest",
        "ca",
        f"run {CFG} --cache {C} --manifest {{t}}/m.jsonl",
        "cache.zarr: manifest_fingerprint = ",
        "expected a cache made from this manifest",
        setup=variant(edit=move_to_labeled),
    ),
    case(
        "manifest_id_escapes",
        "ca",
        f"run {CFG} --cache {C} --manifest {{t}}/m.jsonl",
        "id '../../x'",
        SEP,
        setup=variant(edit=first_unlabeled_id("../../x")),
    ),
    case(
        "manifest_absolute_id",
        "ca",
        f"run {CFG} --cache {C} --manifest {{t}}/m.jsonl",
        "id '/tmp/x'",
        SEP,
        setup=variant(edit=first_unlabeled_id("/tmp/x")),
    ),
    case(
        "cache_without_unlabeled",
        "ca",
        f"run {CFG} --cache {{t}}/ds/cache.zarr --manifest {{t}}/ds/manifest.jsonl",
        "unlabeled images are missing from the cache",
        setup=lambda c: make_dataset(c.t / "ds", 2, 2, 0, cache_splits=("labeled",)),
    ),
    case("manifest_missing", "ca", f"run {CFG} --manifest {{t}}/no.jsonl", "no.jsonl: manifest"),
    case("config_missing", "ca", "run --config {t}/no.toml", "no.toml: config file not found"),
    case(
        "no_manifest_configured",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [data] manifest is not set",
        setup=write("c.toml", "seed = 1\n"),
    ),
    case("unknown_command", "ca", "evaluat", "No such command", code=2),
]

TRAIN = [
    case("config_missing", "tr", "fit --config {t}/no.toml", "no.toml: config file not found"),
    case(
        "config_lr",
        "tr",
        "fit --config {t}/c.toml",
        "c.toml: [train] lr = -1.0: expected a positive number",
        setup=config("train", "lr = -1.0"),
    ),
    case(
        "config_arch",
        "tr",
        "fit --config {t}/c.toml",
        "c.toml: [train] arch = 'unet': expected one of",
        setup=config("train", 'arch = "unet"'),
    ),
    case(
        "config_batch_text",
        "tr",
        "fit --config {t}/c.toml",
        "c.toml: [train] batch_size = '8'; expected an integer",
        setup=config("train", 'batch_size = "8"'),
    ),
    case(
        "config_unknown_key",
        "tr",
        "fit --config {t}/c.toml",
        "c.toml: [train] unknown key 'epochs'; expected one of",
        setup=config("train", "epochs = 3"),
    ),
    case(
        "config_model_kwargs",
        "tr",
        "fit --config {t}/c.toml --out {t}/o --labeled-only",
        "c.toml: [train] model_kwargs = ",
        "unexpected keyword argument 'depth'",
        setup=config("train", "model_kwargs = { depth = 3 }"),
    ),
    case("workers", "tr", f"fit {CFG} --workers -1", "--workers = -1: expected an integer >= 0"),
    case("device", "tr", f"fit {CFG} --device tpu", "--device = 'tpu'; expected one of"),
    case(
        "out_is_file",
        "tr",
        f"fit {CFG} --out {{t}}/f",
        "--out = ",
        "f: is a file; expected a folder",
        setup=write("f", "x"),
    ),
    case(
        "rerun_read_only_out",
        "tr",
        f"fit {CFG} --out {{t}}/o",
        "--out = ",
        "not writable; expected a folder this user may write to",
        setup=lambda c: (
            (c.t / "o").mkdir(),
            (c.t / "o" / "final.json").write_text("{}"),
            c.read_only(c.t / "o"),
        ),
    ),
    case(
        "read_only_run_dir",
        "tr",
        f"fit {CFG} --run-dir {{t}}/r",
        "--run-dir = ",
        "not writable",
        setup=locked("r"),
    ),
    case(
        "pseudo_dir_missing",
        "tr",
        f"fit {CFG} --out {{t}}/o --pseudo-dir {{t}}/none",
        "pseudo-label for unlabeled image",
        "not found",
    ),
    case(
        "manifest_stale_fingerprint",
        "tr",
        f"fit {CFG} --manifest {{t}}/m.jsonl",
        "m.jsonl: meta.fingerprint = ",
        setup=variant(edit=move_to_labeled, fingerprint="stale"),
    ),
    case("checkpoint_missing", "tr", f"evaluate {CFG} --checkpoint {{t}}/x.pt", "x.pt: checkpoint"),
    case(
        "checkpoint_folder",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/a_folder.pt",
        "a_folder.pt: is a folder; expected a checkpoint file",
    ),
    case(
        "checkpoint_empty",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/empty.pt",
        "empty.pt: checkpoint file is empty",
    ),
    case(
        "checkpoint_random",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/random.pt",
        "random.pt: cannot read checkpoint: not a PyTorch file",
        absent=NO_WEIGHTS_ONLY_ADVICE,
    ),
    case(
        "checkpoint_truncated",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/truncated.pt",
        "truncated.pt: cannot read checkpoint: not a PyTorch archive, or a truncated one",
        absent=NO_WEIGHTS_ONLY_ADVICE,
    ),
    case(
        "checkpoint_unsafe",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/unsafe.pt",
        "unsafe.pt: cannot read checkpoint: it holds Python objects",
        absent=("weights_only set to False", "Traceback"),
    ),
    case(
        "checkpoint_not_ours",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/not_ours.pt",
        "not_ours.pt: not a checkpoint of this trainer; expected a dict with 'model' and 'info'",
    ),
    case(
        "checkpoint_schema",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/schema.pt",
        "schema.pt: info.schema = 99; this version reads schema 1",
    ),
    case(
        "checkpoint_wrong_arch",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/wrong_arch.pt",
        "wrong_arch.pt: weights do not fit arch 'deeplabv3plus_effl0' with 4 classes:",
        "of another shape (first ",
        "expected a checkpoint written for this architecture",
    ),
    case(
        "checkpoint_bad_model_kwargs",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/kwargs.pt",
        "kwargs.pt: info describes no model this trainer can build",
        "expected a checkpoint written by python -m train fit",
    ),
    case(
        "checkpoint_without_classes",
        "tr",
        f"predict {CFG} --checkpoint {{w}}/no_classes.pt --out {{t}}/p",
        "no_classes.pt: info.classes is missing",
    ),
    case(
        "fit_device_cuda_missing",
        "tr",
        f"fit {CFG} --device cuda --out {{t}}/o",
        "--device = 'cuda': no CUDA device is available",
    ),
    case(
        "export_splits_read_only",
        "tr",
        f"export-splits {CFG} --pseudo-dir {{w}}/pseudo --out {{t}}/ro",
        "--out = ",
        "not writable",
        setup=locked("ro"),
    ),
    case(
        "checkpoint_other_classes",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/other_classes.pt",
        "other_classes.pt: classes = ['a', 'b', 'c', 'd'] (4); expected the manifest's",
    ),
    case(
        "evaluate_unlabeled_split",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/ckpt.pt --split unlabeled",
        "split 'unlabeled' has images without labels; expected a labeled split",
    ),
    case(
        "evaluate_unknown_split",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/ckpt.pt --split train",
        "--split = 'train': expected one of labeled, unlabeled, val",
    ),
    case(
        "evaluate_mode",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/ckpt.pt --mode tiled",
        "--mode = 'tiled': expected 'whole' or 'sliding'",
    ),
    case(
        "evaluate_stride",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/ckpt.pt --mode sliding --stride 0",
        "--stride = 0: expected a positive number of pixels",
    ),
    case(
        "evaluate_device",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/ckpt.pt --device tpu",
        "--device = 'tpu': expected 'auto', 'cpu' or 'cuda'",
    ),
    case(
        "evaluate_out_is_folder",
        "tr",
        f"evaluate {CFG} --checkpoint {{w}}/ckpt.pt --out {{t}}",
        "--out = ",
        "is a folder; expected the path of a JSON file",
    ),
    case(
        "predict_id_escapes",
        "tr",
        f"predict {CFG} --checkpoint {{w}}/ckpt.pt --manifest {{t}}/m.jsonl --out {{t}}/p",
        "id '../../x'",
        SEP,
        setup=variant(
            edit=lambda rows: [{**r, "id": "../../x"} if r["id"] == "val000" else r for r in rows]
        ),
    ),
    case(
        "predict_out_is_file",
        "tr",
        f"predict {CFG} --checkpoint {{w}}/ckpt.pt --out {{t}}/f",
        "--out = ",
        "f: is a file; expected a folder",
        setup=write("f", "x"),
    ),
    case(
        "predict_out_read_only",
        "tr",
        f"predict {CFG} --checkpoint {{w}}/ckpt.pt --out {{t}}/p",
        "--out = ",
        "not writable",
        setup=locked("p"),
    ),
    case(
        "predict_limit",
        "tr",
        f"predict {CFG} --checkpoint {{w}}/ckpt.pt --limit -1",
        "--limit = -1: expected 0 (all images) or more",
    ),
    case(
        "export_splits_no_pseudo",
        "tr",
        f"export-splits {CFG} --pseudo-dir {{t}}/none --out {{t}}/s",
        "none: pseudo-label folder not found",
    ),
    case("missing_option", "tr", f"evaluate {CFG}", "Missing option '--checkpoint'", code=2),
]

CASES = [
    replace(c, name=f"{prefix}-{c.name}")
    for prefix, group in (
        ("data_manifest", DATA_MANIFEST),
        ("annotate", ANNOTATE),
        ("calibrate", CALIBRATE),
        ("train", TRAIN),
    )
    for c in group
]


def _stat_digest(root: Path) -> dict[str, tuple]:
    """Every file and folder below ``root``: (kind, size, mtime_ns, inode); any write shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "dir" if p.is_dir() else "file"
        out[p.relative_to(root).as_posix()] = (kind, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _check_message(c: Case, stderr: str, stdout: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no message on stderr"
    if c.style == "problems":
        hits = [ln for ln in lines if all(f in ln for f in c.fragments)]
        assert len(hits) == 1, lines
        assert re.fullmatch(r".+: \d+ problems in \d+ rows", lines[-1]), lines[-1]
        return
    *before, last = lines
    assert last.startswith("error: "), lines
    for ln in before:  # only plain progress lines may come before the error
        assert PROGRESS_LINE.match(ln), lines
    for f in c.fragments:
        assert f in last, (f, last)
    assert "error" not in stdout.lower(), stdout


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(
    c: Case,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if c.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("about a machine without CUDA")
    monkeypatch.chdir(tmp_path)
    if c.setup is not None:
        c.setup(Ctx(world, tmp_path, request))
    before = _stat_digest(world.root), _stat_digest(tmp_path)
    args = [a.format(w=world.root, t=tmp_path) for a in c.args]
    r = runner.invoke(APPS[c.tool], args)
    assert r.exit_code == c.code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    for text in c.absent:
        assert text not in r.output, (text, r.output)
    _check_message(c, r.stderr, r.stdout)
    assert (_stat_digest(world.root), _stat_digest(tmp_path)) == before, "something was written"


# -- behaviour every command shares --------------------------------------------------------------
def _bad(app_args: list[str]) -> object:
    return runner.invoke(calibrate_app, app_args)


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--manifest", "nope.jsonl", "--debug"],
        ["--debug", "run", "--manifest", "nope.jsonl"],
        ["run", "--debug", "--manifest", "nope.jsonl"],
    ],
    ids=["after", "before", "between"],
)
def test_debug_anywhere_shows_the_exception(tmp_path: Path, monkeypatch, args) -> None:
    monkeypatch.chdir(tmp_path)
    r = _bad(args)
    assert isinstance(r.exception, UserError), r.output  # the traceback escapes
    # and the next invocation in this process is back to one line
    r = _bad(["run", "--manifest", "nope.jsonl"])
    assert r.exit_code == 1 and r.stderr.strip() == "error: nope.jsonl: manifest not found"


def test_debug_in_a_command_group_and_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(manifest_app, ["build", "--debug", "voc", "VOC"])
    assert isinstance(r.exception, UserError)
    monkeypatch.setenv("CONFORMALSAM_DEBUG", "1")
    assert isinstance(_bad(["run", "--manifest", "nope.jsonl"]).exception, UserError)


def test_ctrl_c_is_one_line_and_status_130(world: World, monkeypatch) -> None:
    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("data_manifest.validate.validate", interrupted)
    r = runner.invoke(manifest_app, ["validate", str(world.manifest)])
    assert r.exit_code == 130
    assert r.stderr.strip().splitlines()[-1] == "interrupted; re-run to continue"
    assert "Traceback" not in r.output


def test_a_bug_is_one_line_unless_debug(world: World, monkeypatch) -> None:
    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("data_manifest.summary.summarize", broken)
    r = runner.invoke(manifest_app, ["summary", str(world.manifest)])
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "error: unexpected RuntimeError: boom (a bug: re-run with --debug for the traceback "
        "and report it)"
    )
    r = runner.invoke(manifest_app, ["summary", str(world.manifest), "--debug"])
    assert isinstance(r.exception, RuntimeError)


def test_file_system_error_past_the_checks_is_one_line(
    world: World, tmp_path: Path, monkeypatch, request
) -> None:
    """Re-running calibrate over finished outputs in a folder that turned read-only, with the
    up-front check blinded: the write itself fails, and says which folder and why."""
    shutil.copytree(world.root / "pseudo", tmp_path / "pseudo")
    Ctx(world, tmp_path, request).read_only(tmp_path / "pseudo")
    before = _stat_digest(tmp_path)
    monkeypatch.setattr("data_manifest.cli_support.os.access", lambda *a, **k: True)
    r = runner.invoke(
        calibrate_app,
        ["run", "--config", str(world.root / "run.toml"), "--cache", str(world.cache)]
        + ["--out-dir", str(tmp_path / "pseudo")],
    )
    assert r.exit_code == 1, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: {re.escape(str(tmp_path / 'pseudo'))}: (permission denied|operation not "
        r"permitted); expected a file or folder this user may (write to|change) \(check its "
        r"permissions\)",
        last,
    ), last
    assert _stat_digest(tmp_path) == before


def test_quiet_prints_nothing_on_success(world: World, tmp_path: Path) -> None:
    base = ["run", "--config", str(world.root / "run.toml"), "--cache", str(world.cache)]
    for args in (["-q", *base], [*base, "--quiet"]):
        r = runner.invoke(calibrate_app, [*args, "--out-dir", str(tmp_path / "o")])
        assert r.exit_code == 0 and r.stdout == "" and r.stderr == "", r.output


def test_id_path_keeps_writers_in_their_folder(tmp_path: Path) -> None:
    from data_manifest.manifest import id_path

    assert id_path(tmp_path, "a b.c") == tmp_path / "a b.c.png"
    for bad in ("../x", "/etc/x", "a/b", "..", ".", "a\\b", ""):
        with pytest.raises(UserError, match="expected a file name"):
            id_path(tmp_path, bad)


def _walk(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, (*path, name))


_BOX = re.compile(r"[\u2500-\u257f]")


def _help(tool: str, path: tuple[str, ...]) -> str:
    """``--help`` as shown, on one line (wide, box drawing removed, spaces collapsed)."""
    r = runner.invoke(APPS[tool], [*path, "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    return " ".join(_BOX.sub(" ", r.output).split())


@pytest.mark.parametrize("tool", sorted(APPS))
def test_help_keeps_bracketed_text(tool: str) -> None:
    """Every ``[...]`` in a help text (``[data]``, ``[default: ...]``) reaches the screen."""
    import typer

    for path, cmd in _walk(typer.main.get_command(APPS[tool])):
        texts = [p.help or "" for p in cmd.params] + [(cmd.help or "").split("\n\n")[0]]
        raw = [t.replace("\\[", "[") for t in texts]
        tokens = [tok for text in raw for tok in re.findall(r"\[[^\[\]]+\]", text)]
        if tokens:
            shown = _help(tool, path)
            for token in tokens:
                assert " ".join(token.split()) in shown, (path, token)
            assert "\\[" not in shown


def test_help_examples_from_the_issue() -> None:
    assert "(default: [train] out, else {run_dir}/train)" in _help("tr", ("fit",))
    assert "instead of the one [data] describes" in _help("tr", ("fit",))
    assert "its [annotate] section gives the defaults" in _help("an", ("run",))
    assert "[default: <root>/manifest.jsonl]" in _help("dm", ("build", "voc"))


def test_every_command_takes_the_common_flags() -> None:
    import typer

    for tool, app in APPS.items():
        for path, cmd in _walk(typer.main.get_command(app)):
            names = {o for p in cmd.params for o in getattr(p, "opts", [])}
            assert {"--debug", "--quiet", "-q"} <= names, (tool, path)


def test_two_caches_of_the_same_images_are_identical(world: World, tmp_path: Path) -> None:
    """The cache records no path; ``show`` finds the manifest through annotate.toml."""
    from _annotate_fixtures import tree_bytes

    for name in ("a", "deeper/b"):
        r = runner.invoke(
            annotate_app,
            ["run", "--config", str(world.root / "run.toml"), "--run-dir", str(tmp_path / name)]
            + ["-q"],
        )
        assert r.exit_code == 0, r.output
    a, b = tree_bytes(tmp_path / "a" / "cache.zarr"), tree_bytes(tmp_path / "deeper/b/cache.zarr")
    assert a == b and len(a) > 10
    assert str(tmp_path).encode() not in b"".join(a.values())
    r = runner.invoke(annotate_app, ["show", str(tmp_path / "a" / "cache.zarr"), "lab001"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "show" / "lab001.png").is_file()


def test_show_reads_a_cache_that_recorded_its_manifest(world: World, tmp_path: Path) -> None:
    """Caches written before the path was dropped kept it in their metadata: still read."""
    cache = tmp_path / "old.zarr"
    shutil.copytree(world.cache, cache)
    meta = json.loads((cache / "zarr.json").read_text())
    meta["attributes"]["extra"] = {"manifest": str(world.manifest)}
    (cache / "zarr.json").write_text(json.dumps(meta))
    r = runner.invoke(
        annotate_app, ["show", str(cache), "lab000", "--out", str(tmp_path / "x.png")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.png").is_file()


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_output_to_a_file_has_no_bars_no_wrapping_no_blank_lines(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / ("a_long_folder_name_that_does_not_fit_in_eighty_columns_" * 2) / "pseudo"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    p = subprocess.run(
        [sys.executable, "-m", "calibrate", "run", "--config", str(world.root / "run.toml")]
        + ["--cache", str(world.cache), "--out-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert p.returncode == 0, p.stderr
    for stream in (p.stdout, p.stderr):
        assert stream and not stream.startswith("\n") and "\x1b[" not in stream
    assert "prediction sets at alpha = 0.05 (target coverage 0.95)\n" in p.stdout
    assert any(str(out) in line for line in p.stdout.splitlines())  # the long path: one line
    lines = p.stderr.strip().splitlines()
    assert lines and all(PROGRESS_LINE.match(ln) for ln in lines), lines


@pytest.mark.slow
def test_ctrl_c_in_a_real_process(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "data_manifest", "demo", "--out", str(tmp_path / "d")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a job started in the background by a shell inherits SIGINT ignored; Python keeps
        # it so, and the interrupt would never arrive
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "d" / "source").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; re-run to continue"
    assert "Traceback" not in err


def test_progress_off_a_terminal_prints_plain_lines(monkeypatch, capsys) -> None:
    from data_manifest import cli_support as cs

    monkeypatch.setattr(cs, "LOG_EVERY_S", 0.0)
    cs.reset_state()
    with cs.progress() as bar:
        task = bar.add_task("annotate", total=3, rate="")
        for i in range(3):
            bar.update(task, advance=1, rate=f"{i + 1}.0 img/s")
    err = capsys.readouterr().err.splitlines()
    assert [re.sub(r"in \d+\.\d s", "in T s", ln) for ln in err] == [
        "annotate: 1/3 in T s (1.0 img/s), running",
        "annotate: 2/3 in T s (2.0 img/s), running",
        "annotate: 3/3 in T s (3.0 img/s)",
    ]
    cs.set_quiet(True)
    with cs.progress() as bar:
        bar.add_task("silent", total=1, rate="")
    assert capsys.readouterr().err == ""
    cs.reset_state()
