"""The manifest: one readable JSONL file that describes a dataset once.

Line 1 is ``{"meta": {...}}``; every following line is one image row::

    {"meta": {"schema": 1, "dataset": "voc", "classes": [...], "palette": [[0,0,0], ...],
              "ignore_index": 255, "reduce_zero_label": false, "background_index": 0,
              "root": "../VOCdevkit/VOC2012", "splits_made_by": "...", "fingerprint": "..."}}
    {"id": "2007_000032", "image": "JPEGImages/2007_000032.jpg",
     "label": "SegmentationClass/2007_000032.png", "split": "labeled", "height": 281, "width": 500}

``root`` is relative to the manifest's own folder (or absolute); row paths are relative to
``root`` and must stay inside it. ``fingerprint`` is the sha256 of the canonical JSON of the
sorted rows and the metadata (without ``root``, so moving a dataset keeps its fingerprint);
:func:`load` recomputes it and refuses a file whose rows no longer match it.

An id names the files written for an image (``<id>.png`` in calibrate's and train's output
folders), so it is a plain file name: no ``/`` or ``\\``, no leading dot, no control
characters, at most :data:`MAX_ID_BYTES` bytes of UTF-8 (:func:`check_id`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest.errors import UserError
from data_manifest.io import atomic_write_text, read_image, read_label_png

SCHEMA = 1
SPLITS = ("labeled", "unlabeled", "val")
IGNORE_INDEX = 255
# 80 bytes keep "<id>.png", its temporary name and the cache's percent-quoted group name
# (3 bytes per byte at worst) below the 255-byte file name limit of common file systems.
MAX_ID_BYTES = 80


@dataclass(frozen=True)
class Row:
    """One image. ``label`` is None for images without ground truth (unlabeled split)."""

    id: str
    image: str
    label: str | None
    split: str
    height: int
    width: int


@dataclass
class Meta:
    """Dataset-level metadata stored on the manifest's first line."""

    dataset: str
    classes: list[str]
    palette: list[list[int]]
    root: str = "."
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False
    background_index: int | None = None
    splits_made_by: str = ""
    schema: int = SCHEMA
    fingerprint: str = ""


@dataclass
class Manifest:
    """A loaded manifest. ``path`` is the file it came from (None before it is saved)."""

    meta: Meta
    rows: list[Row]
    path: Path | None = None
    _by_id: dict[str, Row] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {r.id: r for r in self.rows}

    # -- access ----------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    @property
    def palette(self) -> list[list[int]]:
        return self.meta.palette

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint or compute_fingerprint(self.meta, self.rows)

    @property
    def root(self) -> Path:
        """The dataset root as an absolute path."""
        root = Path(self.meta.root)
        if not root.is_absolute() and self.path is not None:
            root = self.path.parent / root
        return root.resolve()

    def split(self, name: str) -> list[Row]:
        """Rows of one split, in manifest order."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [r for r in self.rows if r.split == name]

    def row(self, image_id: str) -> Row:
        try:
            return self._by_id[image_id]
        except KeyError:
            raise UserError(f"{self.path}: no image with id {image_id!r}") from None

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._by_id

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, row: Row) -> Path:
        return self.root / row.image

    def label_path(self, row: Row) -> Path | None:
        return None if row.label is None else self.root / row.label

    def read_image(self, row: Row) -> np.ndarray:
        """RGB uint8 (H, W, 3)."""
        return read_image(self.image_path(row))

    def read_label(self, row: Row) -> np.ndarray:
        """Class indices uint8 (H, W), 255 = ignore, with ``reduce_zero_label`` applied.

        Raises:
            UserError: the row has no label, or the file cannot be read.
        """
        path = self.label_path(row)
        if path is None:
            raise UserError(f"{self.path}: image {row.id!r} has no label")
        lab = read_label_png(path)
        if self.meta.reduce_zero_label:
            lab = reduce_zero_label(lab)
        return lab

    # -- writing ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest atomically, with a freshly computed fingerprint."""
        path = Path(path)
        self.meta.fingerprint = compute_fingerprint(self.meta, self.rows)
        lines = [json.dumps({"meta": asdict(self.meta)}, sort_keys=True)]
        lines += [json.dumps(asdict(r), sort_keys=True) for r in self.rows]
        atomic_write_text(path, "\n".join(lines) + "\n")
        self.path = path.resolve()
        return path


def reduce_zero_label(lab: np.ndarray) -> np.ndarray:
    """ADE20K convention: 0 (other) becomes 255; every other value v becomes v - 1."""
    out = lab.astype(np.int16) - 1
    out[(lab == 0) | (lab == 255)] = 255
    return out.astype(np.uint8)


def _canonical(meta: Meta, rows: list[Row]) -> bytes:
    m = asdict(meta)
    m.pop("root")
    m.pop("fingerprint")
    # Row's fields by hand: dataclasses.asdict deep-copies and costs most of the time; the
    # keys are sorted on output, so the bytes are the same.
    plain = [
        {
            "id": r.id,
            "image": r.image,
            "label": r.label,
            "split": r.split,
            "height": r.height,
            "width": r.width,
        }
        for r in sorted(rows, key=lambda r: r.id)
    ]
    return json.dumps({"meta": m, "rows": plain}, sort_keys=True, separators=(",", ":")).encode()


def compute_fingerprint(meta: Meta, rows: list[Row]) -> str:
    """sha256 (hex) over the sorted rows and the metadata, independent of ``root``."""
    return hashlib.sha256(_canonical(meta, rows)).hexdigest()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The usual ids (letters, digits, "_-. ", no leading dot) pass in one step
_PLAIN_ID = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9_.\- ]{{0,{MAX_ID_BYTES - 1}}}")


def check_id(image_id: str, where: str) -> None:
    """Raise UserError unless ``image_id`` can name a file inside a folder.

    Ids become file names (``<id>.png``): no path separators, no leading dot (so no ``..``
    and no hidden files), no control characters, 1 to :data:`MAX_ID_BYTES` bytes of UTF-8.
    """
    if _PLAIN_ID.fullmatch(image_id):  # the common case, in one step
        return
    problem = ""
    try:
        size = len(image_id.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    if not image_id:
        problem = "is empty"
    elif size < 0:
        problem = "is not valid Unicode text"
    elif "/" in image_id or "\\" in image_id:
        problem = "contains a path separator"
    elif image_id.startswith("."):
        problem = "starts with a dot"
    elif _CONTROL.search(image_id):
        problem = "contains a control character"
    elif size > MAX_ID_BYTES:
        problem = f"is {size} bytes long"
    if problem:
        raise UserError(
            f"{where}: id {image_id!r} {problem}; expected a file name without '/' or '\\', "
            f"not starting with '.', at most {MAX_ID_BYTES} bytes"
        )


def id_path(folder: str | os.PathLike, image_id: str, suffix: str = ".png") -> Path:
    """``folder/<id><suffix>``, the file a stage writes for an image, checked to stay in ``folder``.

    Raises:
        UserError: the id is not a plain file name (see :func:`check_id`).
    """
    folder = Path(folder)
    check_id(image_id, str(folder))
    path = folder / f"{image_id}{suffix}"
    if path.parent != folder or path.name in (".", ".."):  # belt and braces: check_id covers it
        raise UserError(f"{folder}: id {image_id!r} leaves the folder; expected a file name")
    return path


def check_relative(path: str, where: str) -> None:
    """Raise UserError unless ``path`` is a relative POSIX path that stays inside the root."""
    if path == "" or path.startswith("/") or "\\" in path or ".." in path.split("/"):
        raise UserError(
            f"{where}: path {path!r} leaves the dataset root; expected a path "
            "relative to the root without '..'"
        )


_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "image": (str,),
    "label": (str, type(None)),
    "split": (str,),
    "height": (int,),
    "width": (int,),
}


def _parse_meta(obj: Any, where: str) -> Meta:
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict):
        raise UserError(f'{where}: first line must be {{"meta": {{...}}}} (manifest metadata)')
    m = dict(obj["meta"])
    known = set(Meta.__dataclass_fields__)
    unknown = sorted(set(m) - known)
    if unknown:
        raise UserError(
            f"{where}: meta has unknown field {unknown[0]!r}; expected only "
            f"{', '.join(sorted(known))}"
        )
    for key in ("dataset", "classes", "palette"):
        if key not in m:
            raise UserError(f"{where}: meta field {key!r} is missing")
    if m.get("schema", SCHEMA) != SCHEMA:
        raise UserError(
            f"{where}: meta.schema is {m.get('schema')!r}; this version reads schema {SCHEMA}"
        )
    classes, palette = m["classes"], m["palette"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{where}: meta.classes must be a non-empty list of names")
    if len(classes) > 255:
        raise UserError(
            f"{where}: meta.classes has {len(classes)} names; at most 255 fit "
            "uint8 labels with 255 = ignore"
        )
    if len(set(classes)) != len(classes):
        raise UserError(f"{where}: meta.classes has duplicate names")
    ok_pal = (
        isinstance(palette, list)
        and len(palette) == len(classes)
        and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
    )
    if not ok_pal:
        raise UserError(
            f"{where}: meta.palette must hold one [r, g, b] (0-255) per class "
            f"({len(classes)} classes)"
        )
    bg = m.get("background_index")
    if bg is not None and not (isinstance(bg, int) and 0 <= bg < len(classes)):
        raise UserError(
            f"{where}: meta.background_index = {bg!r}; expected null or a class "
            f"index in [0, {len(classes) - 1}]"
        )
    if m.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise UserError(f"{where}: meta.ignore_index must be {IGNORE_INDEX}")
    return Meta(**m)


def _parse_row(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object (one image row)")
    missing = [k for k in _ROW_TYPES if k not in obj]
    if missing:
        raise UserError(f"{where}: row field {missing[0]!r} is missing")
    extra = sorted(set(obj) - set(_ROW_TYPES))
    if extra:
        raise UserError(
            f"{where}: unknown row field {extra[0]!r}; expected only {', '.join(_ROW_TYPES)}"
        )
    for key, types in _ROW_TYPES.items():
        if not isinstance(obj[key], types) or isinstance(obj[key], bool):
            raise UserError(
                f"{where}: row field {key!r} = {obj[key]!r}; expected "
                f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
            )
    if obj["split"] not in SPLITS:
        raise UserError(f"{where}: split = {obj['split']!r}; expected one of {', '.join(SPLITS)}")
    if obj["height"] <= 0 or obj["width"] <= 0:
        raise UserError(f"{where}: height and width must be positive")
    check_id(obj["id"], where)
    check_relative(obj["image"], where)
    if obj["label"] is not None:
        check_relative(obj["label"], where)
    return Row(**obj)


def check_manifest_file(path: Path) -> None:
    """Raise UserError unless ``path`` is an existing file."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a manifest file (manifest.jsonl)")
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")


def read_manifest_text(path: Path) -> str:
    """The text of a manifest file.

    Raises:
        UserError: missing, a folder, unreadable, or not UTF-8.
    """
    check_manifest_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: byte {exc.start} is not UTF-8 text; expected a manifest in JSON lines"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None


def load(path: str | os.PathLike) -> Manifest:
    """Read and structurally check a manifest file.

    Checks the format, field types, ids, splits, duplicate ids, that paths stay inside the root
    and that the stored fingerprint is the one the rows and metadata give (a manifest edited by
    hand would otherwise pass for the one a cache was made from); it does not open the images
    (``python -m data_manifest validate`` does).

    Raises:
        UserError: naming the file, the line and the problem.
    """
    path = Path(path)
    text = read_manifest_text(path)
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise UserError(f"{path}: manifest is empty; expected a meta line and image rows")
    objs = []
    for lineno, ln in lines:
        try:
            objs.append((lineno, json.loads(ln)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    meta = _parse_meta(objs[0][1], f"{path}:{objs[0][0]}")
    rows, seen = [], {}
    for lineno, obj in objs[1:]:
        row = _parse_row(obj, f"{path}:{lineno}")
        if row.id in seen:
            raise UserError(
                f"{path}:{lineno}: duplicate id {row.id!r} (first on line "
                f"{seen[row.id]}); expected unique ids"
            )
        seen[row.id] = lineno
        rows.append(row)
    problem = fingerprint_problem(meta, rows, str(path))
    if problem:
        raise UserError(problem)
    return Manifest(meta=meta, rows=rows, path=path.resolve())


def fingerprint_problem(meta: Meta, rows: list[Row], where: str) -> str:
    """A one-line message when ``meta.fingerprint`` is set and differs from the recomputed one
    ("" when it matches or is not set)."""
    if not meta.fingerprint:
        return ""
    actual = compute_fingerprint(meta, rows)
    if actual == meta.fingerprint:
        return ""
    return (
        f"{where}: meta.fingerprint = {meta.fingerprint[:12]!r} but the rows and metadata give "
        f"{actual[:12]!r}; the file was changed after it was written: expected an unchanged "
        "manifest (if the change is intended: python -m data_manifest validate "
        f"{where} --update-fingerprint, then annotate again)"
    )
