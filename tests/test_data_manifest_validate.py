"""Validation: every problem class, reported one line each, by message content; --skip-bad."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _data_manifest_fixtures import make_voc, write_palette_label

import data_manifest
from data_manifest.layouts import build_voc, save_manifest
from data_manifest.validate import validate, write_cleaned


@pytest.fixture()
def voc(tmp_path: Path) -> tuple[Path, Path]:
    """(dataset root, manifest path) of a clean tiny VOC dataset."""
    root = make_voc(tmp_path / "VOC2012")
    out = save_manifest(build_voc(root), tmp_path / "manifest.jsonl", root)
    return root, out


def _edit_rows(path: Path, fn, keep_fingerprint: bool = False) -> None:
    """Edit the rows by hand; the stale fingerprint is dropped unless ``keep_fingerprint``
    (a manifest without one is accepted as written by hand)."""
    lines = path.read_text().splitlines()
    meta = json.loads(lines[0])
    if not keep_fingerprint:
        meta["meta"]["fingerprint"] = ""
    rows = [json.loads(ln) for ln in lines[1:]]
    rows = fn(rows)
    path.write_text("\n".join([json.dumps(meta), *(json.dumps(r) for r in rows)]) + "\n")


def test_stale_fingerprint_is_a_problem_and_can_be_updated(voc) -> None:
    _, path = voc
    before = data_manifest.load(path).fingerprint
    _edit_rows(
        path,
        lambda rows: [{**r, "split": "labeled"} if r["id"] == "v1" else r for r in rows],
        keep_fingerprint=True,
    )
    msgs = _messages(path)
    assert len(msgs) == 1
    assert msgs[0].startswith(f"{path}: meta.fingerprint = '{before[:12]}' but the rows")
    assert "expected an unchanged manifest" in msgs[0] and "--update-fingerprint" in msgs[0]
    with pytest.raises(data_manifest.UserError, match="meta.fingerprint = "):
        data_manifest.load(path)
    report = validate(path)
    assert not report.fatal  # --skip-bad may still clean such a manifest
    from data_manifest.validate import update_fingerprint

    new = update_fingerprint(report)
    m = data_manifest.load(path)
    assert m.fingerprint == new != before and m.row("v1").split == "labeled"
    assert validate(path).ok


def _messages(path: Path) -> list[str]:
    return [p.message for p in validate(path).problems]


def test_clean_manifest_has_no_problems(voc) -> None:
    _, path = voc
    report = validate(path)
    assert report.ok and len(report.rows) == 6


def test_missing_image(voc) -> None:
    root, path = voc
    (root / "JPEGImages" / "a2.jpg").unlink()
    msgs = _messages(path)
    assert len(msgs) == 1
    assert msgs[0].startswith(f"{path}:3: image = 'JPEGImages/a2.jpg': file not found")
    assert "expected an existing image file" in msgs[0]


def test_unreadable_image(voc) -> None:
    root, path = voc
    (root / "JPEGImages" / "u1.jpg").write_bytes(b"this is not a jpeg at all\xff\xd9")
    (root / "JPEGImages" / "s1.jpg").write_bytes(b"")
    msgs = _messages(path)
    assert any(
        "'JPEGImages/u1.jpg': cannot decode the image; expected a readable" in m for m in msgs
    )
    assert any("'JPEGImages/s1.jpg': file is empty" in m for m in msgs)
    assert len(msgs) == 2


def test_truncated_image_and_label(voc) -> None:
    root, path = voc
    jpg = root / "JPEGImages" / "a1.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-40])
    png = root / "SegmentationClass" / "v1.png"
    png.write_bytes(png.read_bytes()[:-30])
    msgs = _messages(path)
    assert len(msgs) == 2
    assert "image = 'JPEGImages/a1.jpg': truncated file" in msgs[0]
    assert "label = 'SegmentationClass/v1.png': truncated file" in msgs[1]
    assert "expected a complete" in msgs[1]


def test_label_size_mismatch(voc) -> None:
    root, path = voc
    write_palette_label(root / "SegmentationClass" / "a1.png", np.zeros((6, 3), np.uint8), 21)
    (msg,) = _messages(path)
    assert msg == (
        f"{path}:2: label = 'SegmentationClass/a1.png' is 6x3 but the image is 6x8; "
        "expected a label of the image's size"
    )


def test_row_size_differs_from_image(voc) -> None:
    _, path = voc
    _edit_rows(path, lambda rows: [{**r, "width": 99} if r["id"] == "v1" else r for r in rows])
    (msg,) = _messages(path)
    assert "height, width = 6, 99 but image 'JPEGImages/v1.jpg' is 6x10" in msg


def test_label_values_outside_classes(voc) -> None:
    root, path = voc
    lab = np.zeros((6, 9), np.uint8)
    lab[1, 1], lab[2, 2], lab[3, 3] = 21, 200, 255
    write_palette_label(root / "SegmentationClass" / "a2.png", lab, 21)
    (msg,) = _messages(path)
    assert msg == (
        f"{path}:3: label = 'SegmentationClass/a2.png': values 21, 200 outside the 21 classes "
        "(0-20) and 255; expected class indices or 255"
    )


def test_duplicate_ids_and_overlapping_splits(voc) -> None:
    _, path = voc

    def dup(rows):
        a1 = next(r for r in rows if r["id"] == "a1")
        return [*rows, dict(a1), {**a1, "id": "a1-again", "split": "unlabeled"}]

    _edit_rows(path, dup)
    msgs = _messages(path)
    assert msgs == [
        f"{path}:8: id = 'a1' duplicates line 2; expected unique ids",
        f"{path}:9: image = 'JPEGImages/a1.jpg' is in split 'unlabeled' and also in split "
        "'labeled' (line 2); overlapping splits, expected each image in one split",
    ]


def test_paths_leaving_root(voc, tmp_path: Path) -> None:
    root, path = voc
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((root / "JPEGImages" / "a1.jpg").read_bytes())
    os.symlink(outside, root / "JPEGImages" / "link.jpg")

    def bad(rows):
        r = next(r for r in rows if r["id"] == "u1")
        return [
            *rows,
            {**r, "id": "up", "image": "../outside.jpg"},
            {**r, "id": "abs", "image": str(outside)},
            {**r, "id": "lnk", "image": "JPEGImages/link.jpg"},
        ]

    _edit_rows(path, bad)
    msgs = _messages(path)
    assert len(msgs) == 3
    assert "path '../outside.jpg' leaves the dataset root" in msgs[0]
    assert f"path '{outside}' leaves the dataset root" in msgs[1]
    assert "image = 'JPEGImages/link.jpg' resolves outside the dataset root" in msgs[2]


def test_empty_labeled_split(voc) -> None:
    _, path = voc
    _edit_rows(path, lambda rows: [r for r in rows if r["split"] != "labeled"])
    assert _messages(path) == [
        f"{path}: split 'labeled' is empty; expected at least one labeled image with a valid "
        "label (build folder takes labels from labels/: --labels names another folder; "
        "`data_manifest split` draws a labeled split)"
    ]


def test_labeled_row_without_label_and_bad_row_field(voc) -> None:
    _, path = voc

    def bad(rows):
        rows[0]["label"] = None
        rows[1]["split"] = "training"
        return rows

    _edit_rows(path, bad)
    msgs = _messages(path)
    assert msgs[0] == f"{path}:2: label = null in split 'labeled'; expected a label file"
    assert msgs[1] == f"{path}:3: split = 'training'; expected one of labeled, unlabeled, val"
    assert (
        "split 'labeled' is empty; expected at least one labeled image with a valid label"
        in (msgs[2])
    )


def test_all_problems_reported_at_once(voc) -> None:
    root, path = voc
    (root / "JPEGImages" / "a2.jpg").unlink()
    (root / "JPEGImages" / "u1.jpg").write_bytes(b"garbage")
    write_palette_label(root / "SegmentationClass" / "v1.png", np.full((6, 10), 30, np.uint8), 21)
    report = validate(path)
    assert sorted(p.line for p in report.problems) == [3, 6, 7]
    assert report.bad_lines == {3, 6, 7} and not report.fatal


def test_skip_bad_writes_clean_manifest_and_rejects(voc, tmp_path: Path) -> None:
    root, path = voc
    (root / "JPEGImages" / "a2.jpg").unlink()
    report = validate(path)
    out, rejects = tmp_path / "sub" / "clean.jsonl", tmp_path / "rejects.jsonl"
    assert write_cleaned(report, out, rejects) == 1
    clean = data_manifest.load(out)
    assert [r.id for r in clean.rows] == ["a1", "s1", "s2", "u1", "v1"]
    assert clean.root == root.resolve()
    assert validate(out).ok
    (rej,) = [json.loads(ln) for ln in rejects.read_text().splitlines()]
    assert rej["line"] == 3 and rej["id"] == "a2" and rej["row"]["image"] == "JPEGImages/a2.jpg"
    assert "file not found" in rej["problems"][0]


def test_broken_meta_is_one_problem(voc) -> None:
    _, path = voc
    lines = path.read_text().splitlines()
    meta = json.loads(lines[0])
    meta["meta"]["palette"] = [[0, 0, 0]]
    path.write_text("\n".join([json.dumps(meta), *lines[1:]]) + "\n")
    (msg,) = _messages(path)
    assert msg == f"{path}:1: meta.palette must hold one [r, g, b] (0-255) per class (21 classes)"


def test_invalid_json_line(voc) -> None:
    _, path = voc
    path.write_text(path.read_text() + "{not json\n")
    (msg,) = _messages(path)
    assert msg.startswith(f"{path}:8: not valid JSON")


def test_fingerprint_is_the_one_manifests_already_store(voc) -> None:
    """Independent computation (the definition in the format's docs): sha256 of the canonical
    JSON of the metadata without root and fingerprint, and of the rows sorted by id."""
    import hashlib

    _, path = voc
    lines = path.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    stored = meta.pop("fingerprint")
    meta.pop("root")
    rows = sorted((json.loads(ln) for ln in lines[1:]), key=lambda r: r["id"])
    body = json.dumps({"meta": meta, "rows": rows}, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(body.encode()).hexdigest() == stored
    assert data_manifest.load(path).fingerprint == stored


def test_update_fingerprint_through_the_command_line(voc) -> None:
    from typer.testing import CliRunner

    from data_manifest.cli import app

    root, path = voc
    _edit_rows(
        path,
        lambda rows: [{**r, "split": "labeled"} if r["id"] == "v1" else r for r in rows],
        keep_fingerprint=True,
    )
    (root / "JPEGImages" / "u1.jpg").unlink()  # another problem: nothing is stored
    before = path.read_bytes()
    r = CliRunner().invoke(app, ["validate", str(path), "--update-fingerprint"])
    assert r.exit_code == 1 and "--update-fingerprint stored nothing" in r.stderr
    assert path.read_bytes() == before
    _edit_rows(path, lambda rows: [r for r in rows if r["id"] != "u1"], keep_fingerprint=True)
    r = CliRunner().invoke(app, ["validate", str(path), "--update-fingerprint"])
    assert r.exit_code == 0 and "fingerprint" in r.stdout and "stored" in r.stdout
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0
    assert data_manifest.load(path).row("v1").split == "labeled"
