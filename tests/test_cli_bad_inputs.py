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
from data_manifest.io import write_label_png
from data_manifest.manifest import Meta, Row, compute_fingerprint
from data_manifest.ownership import OWNER_FILE
from train.checkpoint import checkpoint_info, save_checkpoint
from train.cli import app as train_app
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


def bom_config(text: str) -> Callable[[Ctx], None]:
    """``c.toml`` written by an editor that puts a UTF-8 byte-order mark first."""
    return lambda c: (c.t / "c.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())


def top_seed(value: str) -> Callable[[Ctx], None]:
    """``c.toml``: the shared run config with another top-level seed."""

    def setup(c: Ctx) -> None:
        text = (c.w.root / "run.toml").read_text()
        (c.t / "c.toml").write_text(text.replace("seed = 0", f"seed = {value}"))

    return setup


def pickle_file(name: str) -> Callable[[Ctx], None]:
    """A plain pickle (``pickle.dump``) where a checkpoint is expected."""
    import pickle

    return lambda c: (c.t / name).write_bytes(pickle.dumps({"model": {"w": [1.0]}}))


UNLABELED_CHUNK = "images/im-unl001/topk_prob/c/0/0/0"


def damaged_cache(how: str) -> Callable[[Ctx], None]:
    """``c.zarr``: a copy of the shared cache with one chunk of an unlabeled image removed,
    emptied, cut in half or with one bit changed."""

    def setup(c: Ctx) -> None:
        shutil.copytree(c.w.cache, c.t / "c.zarr")
        chunk = c.t / "c.zarr" / UNLABELED_CHUNK
        data = bytearray(chunk.read_bytes())
        if how == "missing":
            chunk.unlink()
        elif how == "empty":
            chunk.write_bytes(b"")
        elif how == "truncated":
            chunk.write_bytes(data[: len(data) // 2])
        else:
            data[len(data) // 2] ^= 0x10
            chunk.write_bytes(bytes(data))

    return setup


def pseudo_copy(edit: str = "") -> Callable[[Ctx], None]:
    """``p``: a copy of the shared calibrate output, then ``edit``: "png" (one PNG changed),
    "gone" (one PNG deleted), "marker" (a run was stopped in it), "no_report" (PNGs only,
    one of them a column short)."""

    def setup(c: Ctx) -> None:
        p = c.t / "p"
        shutil.copytree(c.w.root / "pseudo", p)
        if edit == "png":
            write_label_png(p / "unl001.png", np.zeros((24, 32), np.uint8), PALETTE)
        elif edit == "gone":
            (p / "unl001.png").unlink()
        elif edit == "marker":
            (p / "calibration.incomplete").write_text("{}")
        elif edit == "no_report":
            (p / "calibration.json").unlink()
            write_label_png(p / "unl001.png", np.zeros((24, 31), np.uint8), PALETTE)

    return setup


def link_loop(c: Ctx) -> None:
    """``ds/m.jsonl``: a copy of the shared dataset whose first image is a link to itself."""
    ds = c.t / "ds"
    for sub in ("images", "labels"):
        shutil.copytree(c.w.root / "ds" / sub, ds / sub)
    first = json.loads(c.w.manifest.read_text().splitlines()[1])["image"]
    (ds / first).unlink()
    (ds / first).symlink_to(Path(first).name)
    shutil.copy(c.w.manifest, ds / "m.jsonl")


def other_dataset(c: Ctx) -> None:
    """``op``: the pseudo-labels of another dataset (other classes and images)."""
    mpath, cpath = make_dataset(c.t / "ods", 2, 4, 1, classes=["bg", "x", "y"], topk=2)
    r = runner.invoke(
        calibrate_app,
        ["run", "--manifest", str(mpath), "--cache", str(cpath), "--out-dir", str(c.t / "op")]
        + ["-q", "--no-plots"],
    )
    assert r.exit_code == 0, r.output


def owned_by(owner: str, *files: str) -> Callable[[Ctx], None]:
    """``o``: a folder marked by ``owner`` holding ``files``."""

    def setup(c: Ctx) -> None:
        (c.t / "o").mkdir()
        (c.t / "o" / OWNER_FILE).write_text(owner + "\n")
        for f in files:
            (c.t / "o" / f).write_bytes(b"x")

    return setup


def user_folder(name: str, *files: str) -> Callable[[Ctx], None]:
    """A folder of the user's, with ``files``."""

    def setup(c: Ctx) -> None:
        for f in files:
            (c.t / name / f).parent.mkdir(parents=True, exist_ok=True)
            (c.t / name / f).write_text("the user's")

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
    # nothing lost, nothing silently wrong
    case(
        "demo_root_holds_a_dataset",
        "dm",
        "demo --root {t}/R --source-labeled 1 --source-val 0 --target-labeled 1",
        "--out = ",
        "R: holds files that python -m data_manifest demo did not write (first: 'target')",
        setup=user_folder("R", "target/classes.txt", "target/manifest.jsonl"),
    ),
    case(
        "prepare_demo_too_large",
        "dm",
        "prepare --config {t}/c.toml",
        "c.toml: [data] demo_target_unlabeled = 1000000000: expected an integer in [0, 100000]",
        setup=write("c.toml", "[data]\ndemo = true\ndemo_target_unlabeled = 1000000000\n"),
    ),
    case(
        "split_seed_negative",
        "dm",
        f"split {M} --labeled 2 --seed -5 -o {{t}}/o.jsonl",
        "--seed = -5: expected an integer in [0, 4294967295]",
    ),
    case("demo_seed_negative", "dm", "demo --out {t}/d --seed -5", "--seed = -5: expected"),
    case(
        "validate_link_loop",
        "dm",
        "validate {t}/ds/m.jsonl",
        "file is a symbolic link to nothing (a loop, or its target is gone); expected an "
        "existing image",
        setup=link_loop,
        style="problems",
    ),
    case(
        "config_is_a_folder",
        "dm",
        "prepare --config {t}",
        "is a folder; expected a config file",
    ),
    case(
        "config_with_bom",
        "dm",
        "prepare --config {t}/c.toml",
        "c.toml: [data] demo_gap = 3",
        absent=("invalid TOML",),
        setup=bom_config("[data]\ndemo = true\ndemo_gap = 3\n"),
    ),
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
        "--batch-size = 0: expected an integer in [1, 1024]",
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
        "c.toml: [annotate] batch_size = 0: expected an integer in [1, 1024]",
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
    # nothing lost, nothing silently wrong
    case(
        "device_mps_missing",
        "an",
        f"run {CFG} --device mps",
        "--device = 'mps': MPS (Apple GPUs) is not available on this machine",
        absent=("a bug",),
    ),
    case(
        "input_size_huge",
        "an",
        f"run {CFG} --input-size 100000x100000",
        "--input-size = [100000, 100000]: expected [] (each image at its own size) or "
        "[height, width], both in [8, 8192]",
    ),
    case("workers_too_many", "an", f"run {CFG} --workers 100000", "expected an integer in [0, 64]"),
    case(
        "model_is_a_folder",
        "an",
        f"run {CFG} --model {{t}}",
        "--model = ",
        "is a folder; expected a TorchScript file or a trainer checkpoint",
    ),
    case(
        "model_pickle",
        "an",
        f"run {CFG} --model {{t}}/p.pt",
        "p.pt: cannot read checkpoint: it is a plain pickle (pickle.dump), not torch.save's "
        "format; expected a file written by torch.save",
        absent=("Warning", "Weights only load failed", "weights_only"),
        setup=pickle_file("p.pt"),
    ),
    case("config_is_a_folder", "an", "run --config {t}", "is a folder; expected a config file"),
    case(
        "inspect_missing_chunk",
        "an",
        "inspect {t}/c.zarr",
        "c.zarr: 1 damaged images (first 'unl001': ",
        f"{UNLABELED_CHUNK}: chunk file missing)",
        setup=damaged_cache("missing"),
    ),
    case(
        "inspect_bit_flip",
        "an",
        "inspect {t}/c.zarr",
        "c.zarr: 1 damaged images (first 'unl001': ",
        UNLABELED_CHUNK,
        absent=("a bug",),
        setup=damaged_cache("flip"),
    ),
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
        "calibration.json: the pseudo-labels were made from another manifest",
        "expected pseudo-labels made from ",
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
    # nothing lost, nothing silently wrong
    case(
        "seed_negative",
        "ca",
        f"run {CFG} --seed -5 --cache {C} --out-dir {{t}}/o",
        "--seed = -5: expected an integer in [0, 4294967295]",
    ),
    case(
        "config_seed_negative",
        "ca",
        f"run --config {{t}}/c.toml --cache {C} --out-dir {{t}}/o",
        "c.toml: seed = -5: expected an integer in [0, 4294967295]",
        setup=top_seed("-5"),
    ),
    *[
        case(
            f"cache_chunk_{how}",
            "ca",
            f"run {CFG} --cache {{t}}/c.zarr --out-dir {{t}}/o",
            f"{UNLABELED_CHUNK}: ",
            "image 'unl001' of the cache",
            "is damaged",
            "expected complete image data",
            absent=("a bug", "Zstd decompression error"),
            setup=damaged_cache(how),
        )
        for how in ("missing", "empty", "truncated", "flip")
    ],
    case(
        "out_dir_not_utf8",
        "ca",
        f"run {CFG} --cache {C} --out-dir {{t}}/o\udcff",
        "--out-dir = ",
        "o\\xff: the name is not valid UTF-8; expected a path in UTF-8",
    ),
    case(
        "out_dir_of_the_trainer",
        "ca",
        f"run {CFG} --cache {C} --out-dir {{t}}/o",
        "--out-dir = ",
        "o: written by python -m train fit (see .conformalsam-owner); expected an empty or new "
        "folder, or one written by python -m calibrate run",
        setup=owned_by("train fit", "loss.png", "miou.png", "config.toml", "latest.pt"),
    ),
    case(
        "evaluate_edited_png",
        "ca",
        "evaluate {t}/p",
        "unl001.png: differs from the sha256 recorded in calibration.json",
        setup=pseudo_copy("png"),
    ),
    case(
        "evaluate_png_missing",
        "ca",
        "evaluate {t}/p",
        "unl001.png: listed in calibration.json but missing",
        setup=pseudo_copy("gone"),
    ),
    case(
        "evaluate_incomplete",
        "ca",
        "evaluate {t}/p",
        "calibration.incomplete: the pseudo-labels are incomplete",
        setup=pseudo_copy("marker"),
    ),
    case(
        "config_with_bom",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] alpha = 2: expected a number in (0, 1)",
        setup=bom_config("[calibrate]\nalpha = 2\n"),
    ),
    case(
        "config_alpha_nan",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] alpha = nan: expected finite numbers (no nan or inf)",
        setup=config("calibrate", "alpha = nan"),
    ),
    case(
        "alphas_inf",
        "ca",
        "run --config {t}/c.toml",
        "c.toml: [calibrate] alphas = [0.1, inf]: expected finite numbers",
        setup=config("calibrate", "alphas = [0.1, inf]"),
    ),
    case("alpha_nan", "ca", f"run {CFG} --alpha nan", "--alpha = nan: expected finite numbers"),
    case("workers_too_many", "ca", f"run {CFG} --workers 100000", "and at most 256"),
    case("config_is_a_folder", "ca", "run --config {t}", "is a folder; expected a config file"),
    case(
        "config_link_loop",
        "ca",
        "run --config {t}/l.toml",
        "l.toml: config file is a symbolic link to nothing (a loop, or its target is gone)",
        setup=lambda c: (c.t / "l.toml").symlink_to("l.toml"),
    ),
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
    # nothing lost, nothing silently wrong
    case(
        "fit_out_is_the_pseudo_dir",
        "tr",
        f"fit {CFG} --pseudo-dir {{w}}/pseudo --out {{w}}/pseudo",
        "--out = ",
        "pseudo: is the pseudo-label folder; expected another folder for the training run",
    ),
    case(
        "fit_out_of_calibrate",
        "tr",
        f"fit {CFG} --pseudo-dir {{w}}/pseudo --out {{t}}/p",
        "--out = ",
        "p: written by python -m calibrate run (see .conformalsam-owner)",
        setup=pseudo_copy(),
    ),
    case(
        "fit_out_holds_user_files",
        "tr",
        f"fit {CFG} --out {{t}}/o --labeled-only",
        "--out = ",
        "o: holds files that python -m train fit did not write (first: 'notes.txt')",
        setup=user_folder("o", "notes.txt"),
    ),
    case(
        "seed_negative",
        "tr",
        f"fit {CFG} --seed -5 --out {{t}}/o",
        "--seed = -5: expected an integer in [0, 4294967295]",
    ),
    case(
        "config_seed_negative",
        "tr",
        "fit --config {t}/c.toml --out {t}/o",
        "c.toml: seed = -5: expected an integer",
        setup=top_seed("-5"),
    ),
    case(
        "config_lr_nan",
        "tr",
        "fit --config {t}/c.toml --out {t}/o",
        "c.toml: [train] lr = nan: expected finite numbers (no nan or inf)",
        setup=config("train", "lr = nan"),
    ),
    case(
        "config_scale_max_inf",
        "tr",
        "fit --config {t}/c.toml --out {t}/o",
        "c.toml: [train] scale_max = inf: expected finite numbers",
        absent=("a bug",),
        setup=config("train", "scale_max = inf"),
    ),
    case(
        "config_scale_max_huge",
        "tr",
        "fit --config {t}/c.toml --out {t}/o",
        "c.toml: [train] scale_max = 100.0: expected at most 8",
        setup=config("train", "scale_max = 100.0"),
    ),
    case(
        "config_crop_huge",
        "tr",
        "fit --config {t}/c.toml --out {t}/o",
        "c.toml: [train] crop = 100000: expected at most 4096",
        setup=config("train", "crop = 100000"),
    ),
    case(
        "pseudo_of_another_manifest",
        "tr",
        f"fit {CFG} --manifest {{t}}/m.jsonl --pseudo-dir {{w}}/pseudo --out {{t}}/o",
        "calibration.json: the pseudo-labels were made from another manifest",
        setup=variant(edit=move_to_labeled),
    ),
    case(
        "pseudo_of_another_dataset",
        "tr",
        f"fit {CFG} --pseudo-dir {{t}}/op --out {{t}}/o",
        "op/calibration.json: the pseudo-labels were made from another manifest (",
        "ods/manifest.jsonl",
        absent=("no pseudo-label for",),
        setup=other_dataset,
    ),
    case(
        "pseudo_png_size",
        "tr",
        f"fit {CFG} --pseudo-dir {{t}}/p --out {{t}}/o",
        "unl001.png: pseudo-label is 24x31 (HxW); expected 24x32",
        setup=pseudo_copy("no_report"),
    ),
    case(
        "export_splits_incomplete_pseudo",
        "tr",
        f"export-splits {CFG} --pseudo-dir {{t}}/p --out {{t}}/s",
        "the pseudo-labels are incomplete",
        setup=pseudo_copy("marker"),
    ),
    case(
        "predict_out_holds_user_files",
        "tr",
        f"predict {CFG} --checkpoint {{w}}/ckpt.pt --out {{t}}/labels",
        "--out = ",
        "labels: holds files that python -m train predict did not write (first: 'val000.png')",
        setup=user_folder("labels", "val000.png"),
    ),
    case(
        "checkpoint_pickle",
        "tr",
        f"evaluate {CFG} --checkpoint {{t}}/p.pt",
        "p.pt: cannot read checkpoint: it is a plain pickle (pickle.dump), not torch.save's "
        "format; expected a file written by torch.save (e.g. python -m train fit)",
        absent=("Warning", "Weights only load failed", "weights_only"),
        setup=pickle_file("p.pt"),
    ),
    case("config_is_a_folder", "tr", "fit --config {t}", "is a folder; expected a config file"),
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


# -- nothing lost: ownership, one writer at a time, integrity ----------------------------------
HOLD = """
import sys, time
from data_manifest.ownership import writer_lock
lock = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
part = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
with writer_lock(sys.argv[1], lock=lock, part=part):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold(folder: Path, lock: Path | None = None, part: str | None = None) -> subprocess.Popen:
    """Another process holding a writer lock, as a running stage would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(lock or ""), part or ""],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no clean-up of any kind
    proc.wait(timeout=30)
    proc.stdout.close()


def _calibrate(world: World, out: Path, *extra: str) -> object:
    return runner.invoke(
        calibrate_app,
        ["run", "--config", str(world.root / "run.toml"), "--cache", str(world.cache)]
        + ["--out-dir", str(out), "-q", *extra],
    )


def test_a_second_calibrate_run_is_refused_and_a_killed_one_leaves_no_lock(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "p"
    shutil.copytree(world.root / "pseudo", out)
    before = _stat_digest(out)
    holder = _hold(out)
    try:
        r = _calibrate(world, out)
        assert r.exit_code == 1, r.output
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {out}: another run is writing it (pid {holder.pid} on ")
        assert "expected one writer at a time: wait for it to finish" in line
    finally:
        _kill(holder)
    assert {k: v for k, v in _stat_digest(out).items() if "lock" not in k} == before
    r = _calibrate(world, out)  # the killed holder's lock does not stay
    assert r.exit_code == 0, r.output
    assert not (out / ".conformalsam.lock").exists()


def test_annotate_runs_on_one_cache_one_at_a_time(world: World, tmp_path: Path) -> None:
    """A whole run excludes every other writer; shards of one count run side by side."""
    from annotate.cache import writer_lock

    cache = world.root / "run" / "cache.zarr"
    lock = cache.parent / f".{cache.name}.lock"
    base = ["run", "--config", str(world.root / "run.toml"), "-q"]
    holder = _hold(cache, lock)
    try:
        for extra in ([], ["--shard", "1/2"]):
            r = runner.invoke(annotate_app, base + extra)
            assert r.exit_code == 1, r.output
            assert "another run is writing it" in r.stderr, r.stderr
    finally:
        _kill(holder)
    holder = _hold(cache, lock, "0-of-2")
    try:
        r = runner.invoke(annotate_app, base + ["--shard", "1/2"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(annotate_app, base)
        assert r.exit_code == 1 and f"pid {holder.pid} " in r.stderr, r.stderr
    finally:
        _kill(holder)
    with writer_lock(cache, (0, 2)), writer_lock(cache, (1, 2)):  # in one process too
        with pytest.raises(UserError, match="another run is writing it"):
            with writer_lock(cache):
                pass
    assert not list(cache.parent.glob(".*.lock*"))


def test_a_missing_chunk_is_named_reported_and_annotated_again(
    world: World, tmp_path: Path
) -> None:
    """It used to give an all-255 pseudo-label PNG, exit 0, and stay missing for good."""
    from _annotate_fixtures import tree_bytes

    shutil.copytree(world.root / "run", tmp_path / "run")
    cache = tmp_path / "run" / "cache.zarr"
    good = tree_bytes(cache)
    chunk_key = next(k for k in good if k.startswith("images/im-unl001/") and "/c/" in k)
    (cache / chunk_key).unlink()
    r = runner.invoke(annotate_app, ["inspect", str(cache)])
    assert r.exit_code == 1 and "damaged images" in r.stdout, r.output
    assert f"{chunk_key}: chunk file missing" in r.stderr
    r = _calibrate(world, tmp_path / "p", "--cache", str(cache))
    assert r.exit_code == 1 and "image 'unl001' of the cache" in r.stderr, r.output
    assert not (tmp_path / "p").exists()
    args = ["run", "--config", str(world.root / "run.toml"), "--run-dir", str(tmp_path / "run")]
    r = runner.invoke(annotate_app, args)
    assert r.exit_code == 0, r.output
    assert "damaged images, annotated again" in r.stdout
    report = json.loads((tmp_path / "run" / "annotate.json").read_text())
    assert [d["id"] for d in report["repaired"]] == ["unl001"]
    assert tree_bytes(cache) == good
    # a changed bit keeps every size: found when the data is decoded (--verify)
    chunk = cache / chunk_key
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    r = runner.invoke(annotate_app, [*args, "-q"])
    assert r.exit_code == 0 and tree_bytes(cache) != good
    r = runner.invoke(annotate_app, [*args, "-q", "--verify"])
    assert r.exit_code == 0, r.output
    assert tree_bytes(cache) == good


def test_calibrate_removes_only_the_pngs_it_wrote(world: World, tmp_path: Path) -> None:
    """A trainer's loss.png and miou.png left in a calibrate folder (by a version that let
    train fit write there) are not calibrate's orphans."""
    out = tmp_path / "p"
    shutil.copytree(world.root / "pseudo", out)
    for name in ("loss.png", "miou.png"):
        (out / name).write_bytes(b"the trainer's plot")
    r = _calibrate(world, out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run.json").read_text())["removed_orphans"] == 0
    for name in ("loss.png", "miou.png"):
        assert (out / name).read_bytes() == b"the trainer's plot"


def test_train_fit_leaves_a_calibrate_folder_alone(world: World, tmp_path: Path) -> None:
    out = tmp_path / "p"
    shutil.copytree(world.root / "pseudo", out)
    before = _stat_digest(out)
    r = runner.invoke(
        train_app,
        ["fit", "--config", str(world.root / "run.toml"), "--pseudo-dir", str(out)]
        + ["--out", str(out), "-q"],
    )
    assert r.exit_code == 1 and "is the pseudo-label folder" in r.stderr, r.output
    assert _stat_digest(out) == before


def test_two_caches_in_one_folder_keep_their_own_reports(world: World, tmp_path: Path) -> None:
    base = ["run", "--config", str(world.root / "run.toml"), "-q"]
    for name, splits in (("a.zarr", "labeled"), ("b.zarr", "val")):
        r = runner.invoke(
            annotate_app, [*base, "--cache", str(tmp_path / name), "--splits", splits]
        )
        assert r.exit_code == 0, r.output
    for name, split in (("a.zarr", "labeled"), ("b.zarr", "val")):
        report = json.loads((tmp_path / f"{name}.annotate.json").read_text())
        assert report["cache"] == str(tmp_path / name)
        assert list(report["planned"]) == [split]
        resolved = (tmp_path / f"{name}.annotate.toml").read_text()
        assert f'splits = ["{split}"]' in resolved
    assert not (tmp_path / "annotate.json").exists()
    r = runner.invoke(annotate_app, ["show", str(tmp_path / "b.zarr"), "val000"])
    assert r.exit_code == 0, r.output  # finds its manifest in b.zarr.annotate.toml


def test_a_cache_without_images_takes_the_corrected_settings(world: World, tmp_path: Path) -> None:
    """A run stopped before its first image (here: an unreadable image) does not keep the
    corrected run from using the same cache."""
    m = manifest_variant(Ctx(world, tmp_path, None), edit=set_row(image="images/none.png"))
    cache = tmp_path / "c.zarr"
    base = ["run", "--config", str(world.root / "run.toml"), "--cache", str(cache), "-q"]
    r = runner.invoke(annotate_app, [*base, "--manifest", str(m), "--input-size", "16x16"])
    assert r.exit_code == 1 and "none.png" in r.stderr, r.output
    assert (cache / "zarr.json").is_file()
    r = runner.invoke(annotate_app, base)
    assert r.exit_code == 0, r.output
    from annotate.cache import open_cache

    assert open_cache(cache).meta.extra["settings"]["input_size"] == []


def test_train_fit_says_when_the_pseudo_labels_keep_nothing(world: World, tmp_path: Path) -> None:
    import hashlib

    from data_manifest.manifest import load

    p = tmp_path / "p"
    shutil.copytree(world.root / "pseudo", p)
    report = json.loads((p / "calibration.json").read_text())
    for row in load(world.manifest).split("unlabeled"):
        png = p / f"{row.id}.png"
        write_label_png(png, np.full((row.height, row.width), 255, np.uint8), PALETTE)
        report["pngs"][row.id] = hashlib.sha256(png.read_bytes()).hexdigest()
    report["unlabeled"]["kept_pixels"], report["unlabeled"]["kept_fraction"] = 0, 0.0
    (p / "calibration.json").write_text(json.dumps(report))
    r = runner.invoke(
        train_app,
        ["fit", "--config", str(world.root / "run.toml"), "--pseudo-dir", str(p)]
        + ["--out", str(tmp_path / "t"), "--no-stage2", "-q"],
    )
    assert r.exit_code == 0, r.output
    assert "the pseudo-labels keep 0 % of the unlabeled pixels" in r.stderr, r.stderr


def test_folder_ownership_rules(tmp_path: Path) -> None:
    from data_manifest.ownership import check_claim, claim, holding, owner_of

    claim(tmp_path / "new", "train fit", "--out")
    assert owner_of(tmp_path / "new") == "train fit"
    check_claim(tmp_path / "new", "train fit", "--out")
    with pytest.raises(UserError, match="written by python -m train fit"):
        check_claim(tmp_path / "new", "calibrate run", "--out-dir")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "evaluation.json").write_text("{}")
    with pytest.raises(UserError, match="holds files that python -m calibrate evaluate did not"):
        check_claim(tmp_path / "old", "calibrate evaluate", "--out-dir")
    (tmp_path / "old" / "risk_coverage.png").write_bytes(b"")
    claim(
        tmp_path / "old",
        "calibrate evaluate",
        "--out-dir",
        holding("evaluation.json", "risk_coverage.png"),
    )
    assert owner_of(tmp_path / "old") == "calibrate evaluate"


def test_a_diverging_run_stops_with_one_line(world: World, tmp_path: Path) -> None:
    """A valid-looking learning rate that makes the loss nan must not end in exit 0 with a
    meaningless best.pt."""
    config("train", "lr = 1e10")(Ctx(world, tmp_path, None))
    r = runner.invoke(
        train_app,
        ["fit", "--config", str(tmp_path / "c.toml"), "--pseudo-dir", str(world.root / "pseudo")]
        + ["--out", str(tmp_path / "o"), "-q"],
    )
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: .*metrics\.jsonl: loss = nan at iteration \d+; expected finite losses: the run "
        r"diverged \(try a lower \[train\] lr\); the checkpoints hold the last state saved before",
        line,
    ), line
    assert "NaN" not in (tmp_path / "o" / "metrics.jsonl").read_text()


def test_pseudo_labels_changed_during_training_are_not_exit_0(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers write nothing into calibrate's folder, so they take no lock; a folder that a
    calibrate run rewrote while the trainer read it is reported when the run ends."""
    p = tmp_path / "p"
    shutil.copytree(world.root / "pseudo", p)

    def fit_while_calibrate_rewrites(*args: object, **kwargs: object) -> None:
        r = _calibrate(world, p, "--alpha", "0.3")
        assert r.exit_code == 0, r.output

    monkeypatch.setattr("train.trainer.fit", fit_while_calibrate_rewrites)
    r = runner.invoke(
        train_app,
        ["fit", "--config", str(world.root / "run.toml"), "--pseudo-dir", str(p)]
        + ["--out", str(tmp_path / "t"), "-q"],
    )
    assert r.exit_code == 1, r.output
    run = f"the run in {tmp_path / 't'}"
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {p}: a calibrate run changed the pseudo-labels while {run} read them; "
        f"expected them unchanged ({run} mixed two sets): train again with --restart once "
        "the folder is complete"
    )


FORK_AND_DIE = """
import os, sys, time
from data_manifest.ownership import writer_lock
held = writer_lock(sys.argv[1])
held.__enter__()
child = os.fork()  # as a DataLoader worker is forked
if child == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)  # the test reads the parent's output to its end
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_lock_does_not_outlive_its_holder_in_a_forked_child(tmp_path: Path) -> None:
    """A killed trainer's DataLoader workers may live on for seconds: they must not keep the
    run folder locked (the resumed run would be refused)."""
    from data_manifest.ownership import writer_lock

    proc = subprocess.run(
        [sys.executable, "-c", FORK_AND_DIE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    child = int(proc.stdout.split()[0])
    try:
        os.kill(child, 0)  # still alive
        with writer_lock(tmp_path):
            pass
    finally:
        os.kill(child, 9)
