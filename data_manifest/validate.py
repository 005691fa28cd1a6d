"""Check a manifest and the files it points to; report every problem, one line each.

Unlike :func:`data_manifest.load`, which stops at the first structural error, this reads every
line, opens every image and label, and collects all problems: missing, unreadable or truncated
files, labels not the image's size, label values outside the classes and 255, duplicate ids,
overlapping splits, paths leaving the dataset root, an empty labeled split, ids that cannot
be file names, and a stored fingerprint that the rows no longer give (a file edited by hand).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_manifest.errors import UserError
from data_manifest.io import atomic_write_text, not_found, read_label_png
from data_manifest.manifest import (
    Manifest,
    Meta,
    Row,
    _parse_meta,
    _parse_row,
    fingerprint_problem,
    read_manifest_text,
    reduce_zero_label,
)
from data_manifest.splits import sort_rows


@dataclass
class Problem:
    """One problem. ``line`` is the manifest line (None for dataset-level problems)."""

    message: str
    line: int | None = None
    id: str | None = None
    kind: str = ""  # "fingerprint": the stored fingerprint is stale

    def __str__(self) -> str:
        return self.message


@dataclass
class Report:
    """The outcome of :func:`validate`. ``rows`` maps manifest line -> parsed row."""

    path: Path
    meta: Meta | None
    rows: dict[int, Row]
    raw: dict[int, Any]
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_lines(self) -> set[int]:
        return {p.line for p in self.problems if p.line is not None}

    @property
    def fatal(self) -> list[Problem]:
        """Problems that skipping rows cannot fix (metadata, empty labeled split); a stale
        fingerprint is not one (a cleaned manifest gets a new fingerprint anyway)."""
        return [p for p in self.problems if p.line is None and p.kind != "fingerprint"]


def _tail_ok(buf: np.ndarray, suffix: str) -> bool:
    tail = buf[-64:].tobytes().rstrip(b"\x00")
    if suffix in (".jpg", ".jpeg"):
        return tail.endswith(b"\xff\xd9")
    if suffix == ".png":
        return b"IEND" in tail
    return True


def _check_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(height, width) of a decodable image, or a problem description."""
    if not path.is_file():
        return None, f"{not_found(path)}; expected an existing image file"
    buf = np.fromfile(path, dtype=np.uint8)
    if buf.size == 0:
        return None, "file is empty; expected a JPEG or PNG image"
    if not _tail_ok(buf, path.suffix.lower()):
        return None, "truncated file (no end-of-image marker); expected a complete image file"
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        return None, "cannot decode the image; expected a readable JPEG or PNG file"
    return (int(img.shape[0]), int(img.shape[1])), None


def _check_label(path: Path, meta: Meta) -> tuple[tuple[int, int] | None, str | None]:
    if not path.is_file():
        return None, f"{not_found(path)}; expected a label PNG"
    buf = np.fromfile(path, dtype=np.uint8)
    if buf.size and not _tail_ok(buf, path.suffix.lower()):
        return None, "truncated file (no end-of-image marker); expected a complete label PNG"
    try:
        lab = read_label_png(path)
    except UserError as exc:
        text = str(exc)
        return None, text[len(str(path)) + 2 :] if text.startswith(str(path)) else text
    if meta.reduce_zero_label:
        lab = reduce_zero_label(lab)
    k = len(meta.classes)
    values = np.flatnonzero(np.bincount(lab.ravel(), minlength=256)[k:255]) + k
    if values.size:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        return None, (
            f"values {shown} outside the {k} classes (0-{k - 1}) and 255"
            f"{' after reduce_zero_label' if meta.reduce_zero_label else ''}; "
            "expected class indices or 255"
        )
    return (int(lab.shape[0]), int(lab.shape[1])), None


def _inside(root: Path, rel: str) -> bool:
    """True when ``root/rel`` resolves (following links) to a path inside ``root`` (a link
    loop resolves nowhere: False)."""
    try:
        Path(os.path.realpath(root / rel)).relative_to(root)
    except ValueError:
        return False
    return True


def _check_files(root: Path, meta: Meta, where: str, row: Row) -> list[str]:
    out = []
    if not _inside(root, row.image):
        return [
            f"{where}: image = {row.image!r} resolves outside the dataset root (a link?); "
            "expected a path inside the root"
        ]
    size, err = _check_image(root / row.image)
    if err:
        out.append(f"{where}: image = {row.image!r}: {err}")
    elif size != (row.height, row.width):
        out.append(
            f"{where}: height, width = {row.height}, {row.width} but image {row.image!r} is "
            f"{size[0]}x{size[1]}; expected the image's size (rebuild the manifest)"
        )
    if row.label is None:
        if row.split != "unlabeled":
            out.append(f"{where}: label = null in split {row.split!r}; expected a label file")
        return out
    if not _inside(root, row.label):
        out.append(
            f"{where}: label = {row.label!r} resolves outside the dataset root (a link?); "
            "expected a path inside the root"
        )
        return out
    lsize, err = _check_label(root / row.label, meta)
    if err:
        out.append(f"{where}: label = {row.label!r}: {err}")
    elif size is not None and lsize != size:
        out.append(
            f"{where}: label = {row.label!r} is {lsize[0]}x{lsize[1]} but the image is "
            f"{size[0]}x{size[1]}; expected a label of the image's size"
        )
    return out


def validate(
    path: str | os.PathLike,
    check_files: bool = True,
    workers: int | None = None,
    on_row: Callable[[], None] | None = None,
) -> Report:
    """Check a manifest and (``check_files``) every image and label it names.

    ``on_row`` is called once per row whose files were checked (for a progress bar).

    Raises:
        UserError: only when the manifest file itself cannot be read; every other problem
            is collected in the report.
    """
    path = Path(path)
    text = read_manifest_text(path)
    report = Report(path=path, meta=None, rows={}, raw={})
    problems = report.problems
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        problems.append(Problem(f"{path}: manifest is empty; expected a meta line and rows"))
        return report
    parsed = []
    for lineno, ln in lines:
        try:
            parsed.append((lineno, json.loads(ln)))
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"{path}:{lineno}: not valid JSON ({exc.msg})", lineno))
    if not parsed or parsed[0][0] != lines[0][0]:
        problems.append(
            Problem(f'{path}: first line is not the meta line; expected {{"meta": {{...}}}}')
        )
        return report
    try:
        report.meta = _parse_meta(parsed[0][1], f"{path}:{parsed[0][0]}")
    except UserError as exc:
        problems.append(Problem(str(exc)))
        return report
    meta = report.meta
    first_id: dict[str, int] = {}
    first_image: dict[str, tuple[int, str]] = {}
    for lineno, obj in parsed[1:]:
        where = f"{path}:{lineno}"
        report.raw[lineno] = obj
        try:
            row = _parse_row(obj, where)
        except UserError as exc:
            problems.append(
                Problem(str(exc), lineno, obj.get("id") if isinstance(obj, dict) else None)
            )
            continue
        if row.id in first_id:
            problems.append(
                Problem(
                    f"{where}: id = {row.id!r} duplicates line {first_id[row.id]}; "
                    "expected unique ids",
                    lineno,
                    row.id,
                )
            )
            continue
        first_id[row.id] = lineno
        if row.image in first_image:
            other_line, other_split = first_image[row.image]
            if other_split != row.split:
                msg = (
                    f"{where}: image = {row.image!r} is in split {row.split!r} and also in "
                    f"split {other_split!r} (line {other_line}); overlapping splits, "
                    "expected each image in one split"
                )
            else:
                msg = (
                    f"{where}: image = {row.image!r} is listed again (line {other_line}); "
                    "expected each image once"
                )
            problems.append(Problem(msg, lineno, row.id))
            continue
        first_image[row.image] = (lineno, row.split)
        report.rows[lineno] = row
    if len(report.rows) == len(parsed) - 1:  # every row parsed: the fingerprint is comparable
        stale = fingerprint_problem(meta, list(report.rows.values()), str(path))
        if stale:
            problems.append(Problem(stale, kind="fingerprint"))
    if check_files:
        manifest = Manifest(meta=meta, rows=[], path=path.resolve())
        root = manifest.root
        if not root.is_dir():
            problems.append(
                Problem(
                    f"{path}: meta.root = {meta.root!r} is not a folder "
                    f"({root}); expected the dataset root"
                )
            )
            return report

        def check(item: tuple[int, Row]) -> list[str]:
            lineno, row = item
            try:
                return _check_files(root, meta, f"{path}:{lineno}", row)
            finally:
                if on_row is not None:
                    on_row()

        items = list(report.rows.items())
        n = workers or min(8, (os.cpu_count() or 1) * 2)
        with ThreadPoolExecutor(max_workers=n) as pool:
            for (lineno, row), msgs in zip(items, pool.map(check, items), strict=True):
                problems.extend(Problem(m, lineno, row.id) for m in msgs)
    bad = report.bad_lines
    if not any(r.split == "labeled" for ln, r in report.rows.items() if ln not in bad):
        problems.append(
            Problem(
                f"{path}: split 'labeled' is empty; expected at least one "
                "labeled image with a valid label (build folder takes labels from labels/: "
                "--labels names another folder; `data_manifest split` draws a labeled split)"
            )
        )
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    return report


def write_cleaned(report: Report, out: str | os.PathLike, rejects: str | os.PathLike) -> int:
    """Write the manifest without its bad rows, and the bad rows with their problems.

    The cleaned manifest keeps the original ``root`` (re-expressed relative to ``out``'s
    folder). ``rejects`` is JSONL: ``{"line": n, "id": ..., "problems": [...], "row": {...}}``.

    Returns:
        The number of rejected rows.
    Raises:
        UserError: the metadata itself is broken (nothing to clean).
    """
    from data_manifest.layouts import save_manifest

    if report.meta is None:
        raise UserError(f"{report.path}: the meta line is broken; cannot write a cleaned manifest")
    bad = report.bad_lines
    by_line: dict[int, list[str]] = {}
    for p in report.problems:
        if p.line is not None:
            by_line.setdefault(p.line, []).append(p.message)
    good = [r for ln, r in sorted(report.rows.items()) if ln not in bad]
    root = Manifest(meta=report.meta, rows=[], path=report.path.resolve()).root
    meta = Meta(**{**asdict(report.meta), "fingerprint": ""})
    save_manifest(Manifest(meta=meta, rows=sort_rows(good)), out, root)
    lines = [
        json.dumps(
            {
                "line": ln,
                "id": report.raw.get(ln, {}).get("id")
                if isinstance(report.raw.get(ln), dict)
                else None,
                "problems": msgs,
                "row": report.raw.get(ln),
            },
            sort_keys=True,
        )
        for ln, msgs in sorted(by_line.items())
    ]
    atomic_write_text(rejects, "".join(line + "\n" for line in lines))
    return len(by_line)


def update_fingerprint(report: Report) -> str:
    """Store in the manifest the fingerprint its rows and metadata give, keeping its rows.

    For a manifest changed by hand on purpose; every cache made from the old version then
    refuses it. Returns the new fingerprint.

    Raises:
        UserError: the report has other problems than the stale fingerprint.
    """
    others = [p for p in report.problems if p.kind != "fingerprint"]
    if report.meta is None or others:
        raise UserError(
            f"{report.path}: --update-fingerprint needs a manifest without other problems; "
            f"expected none, found {len(others) or 1} (listed above)"
        )
    meta = Meta(**{**asdict(report.meta), "fingerprint": ""})
    rows = [row for _, row in sorted(report.rows.items())]
    m = Manifest(meta=meta, rows=rows)
    m.save(report.path)
    return m.meta.fingerprint
