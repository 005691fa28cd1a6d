"""Builders on tiny fixtures in each real layout, UniMatch split files, split maker, fingerprint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from _data_manifest_fixtures import (
    label_array,
    make_ade,
    make_cityscapes,
    make_folder,
    make_voc,
)
from PIL import Image

import data_manifest
from data_manifest import UserError, compute_fingerprint
from data_manifest.layouts import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    build_ade20k,
    build_cityscapes,
    build_folder,
    build_voc,
    read_classes_file,
    save_manifest,
    voc_colormap,
)
from data_manifest.splits import make_splits, parse_amount, read_unimatch, write_unimatch


def _by_id(m):
    return {r.id: r for r in m.rows}


def test_voc_builder_lists_and_rest(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    out = save_manifest(build_voc(root), tmp_path / "m" / "voc.jsonl", root)
    m = data_manifest.load(out)
    assert m.classes == VOC_CLASSES and m.meta.background_index == 0
    assert [r.id for r in m.split("labeled")] == ["a1", "a2"]
    assert [r.id for r in m.split("val")] == ["v1"]
    # every other JPEG is unlabeled, without a label (no SegmentationClass file)
    assert {r.id: r.label for r in m.split("unlabeled")} == {"s1": None, "s2": None, "u1": None}
    rows = _by_id(m)
    assert rows["a2"].image == "JPEGImages/a2.jpg"
    assert rows["a2"].label == "SegmentationClass/a2.png"
    assert (rows["a2"].height, rows["a2"].width) == (6, 9)
    assert m.meta.root == "../VOC2012" and m.root == root.resolve()
    np.testing.assert_array_equal(m.read_label(rows["a2"]), label_array(6, 9, 21, seed=1))
    assert m.read_image(rows["v1"]).shape == (6, 10, 3)
    assert m.palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert m.palette[15] == [192, 128, 128]  # VOC "person"


def test_voc_builder_sbd(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    m = build_voc(root, sbd="SegmentationClassAug")
    assert [r.id for r in m.split("unlabeled")] == ["s1", "s2"]  # u1 has no SBD label
    assert all(r.label.startswith("SegmentationClassAug/") for r in m.rows)
    assert "rest of SegmentationClassAug/" in m.meta.splits_made_by
    with pytest.raises(UserError, match="SBD label folder not found"):
        build_voc(root, sbd="NoSuchFolder")


def test_voc_builder_missing_label_and_list(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    (root / "SegmentationClass" / "a1.png").unlink()
    with pytest.raises(UserError, match=r"a1\.png: label file not found for labeled image 'a1'"):
        build_voc(root)
    with pytest.raises(UserError, match=r"trainaug\.txt: image list not found"):
        build_voc(root, train_list="trainaug")
    with pytest.raises(UserError, match="no JPEGImages/ folder; expected the root of a PASCAL"):
        build_voc(tmp_path)


def test_voc_builder_custom_classes(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    (tmp_path / "c.txt").write_text("background\nthing\n")
    m = build_voc(root, classes_file=tmp_path / "c.txt", unlabeled_rest=False)
    assert m.classes == ["background", "thing"] and m.palette == voc_colormap(2)
    assert m.split("unlabeled") == []


def test_ade20k_builder(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ADEChallengeData2016")
    out = save_manifest(build_ade20k(root), root / "manifest.jsonl", root)
    m = data_manifest.load(out)
    assert m.num_classes == 150 and m.classes == ADE20K_CLASSES and len(set(m.classes)) == 150
    assert m.meta.reduce_zero_label and m.meta.background_index is None
    assert [r.id for r in m.split("labeled")] == ["ADE_train_00000001", "ADE_train_00000002"]
    row = m.split("val")[0]
    assert row.image == "images/validation/ADE_val_00000001.jpg"
    assert row.label == "annotations/validation/ADE_val_00000001.png"
    raw = np.asarray(Image.open(root / row.label))
    lab = m.read_label(row)
    expect = np.where(raw == 0, 255, raw.astype(np.int16) - 1).astype(np.uint8)
    np.testing.assert_array_equal(lab, expect)
    assert lab[0, 0] == 255 and lab[0, 1] == 149


def test_cityscapes_builder(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cityscapes")
    m = build_cityscapes(root)
    assert m.num_classes == 19 and m.classes[0] == "road" and m.classes[-1] == "bicycle"
    assert m.palette[0] == [128, 64, 128]
    assert [r.id for r in m.split("labeled")] == ["aachen_000000_000019", "bremen_000001_000019"]
    row = m.split("val")[0]
    assert row.id == "frankfurt_000000_000294"
    assert row.label == ("gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png")
    assert (row.height, row.width) == (5, 10)
    np.testing.assert_array_equal(m.read_label(row), label_array(5, 10, 19, seed=2))


def test_folder_builder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mydata")
    m = build_folder(root)
    assert m.classes == ["background", "road", "car"]
    assert m.palette == [[0, 0, 0], [10, 20, 30], [1, 2, 3]]
    assert m.meta.background_index == 0 and m.meta.dataset == "mydata"
    assert {r.id: r.split for r in m.rows} == {
        "x1": "labeled",
        "x2": "labeled",
        "sub__x3": "labeled",
        "x4": "unlabeled",
    }
    # a sub-folder's parts join with "__" in the id; the paths keep the folders
    assert _by_id(m)["sub__x3"].image == "images/sub/x3.png"
    assert _by_id(m)["sub__x3"].label == "labels/sub/x3.png"
    assert _by_id(m)["x4"].label is None
    with pytest.raises(UserError, match="background_index = 5; expected a class index"):
        build_folder(root, background_index=5)


def test_classes_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("a 1 2 3\nb\n")
    with pytest.raises(UserError, match="some classes have a colour and some do not"):
        read_classes_file(p)
    p.write_text("a 1 2 300\n")
    with pytest.raises(UserError, match=r"c\.txt:1: colour \[1, 2, 300\]; expected r g b"):
        read_classes_file(p)
    p.write_text("# nothing\n")
    with pytest.raises(UserError, match="no class names"):
        read_classes_file(p)
    with pytest.raises(UserError, match="classes file not found"):
        read_classes_file(tmp_path / "none.txt")


def test_unimatch_round_trip(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    m = build_voc(root, sbd="SegmentationClassAug")
    split_dir = tmp_path / "splits" / "pascal" / "2"
    written = write_unimatch(m, split_dir)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "splits/pascal/2/labeled.txt",
        "splits/pascal/2/unlabeled.txt",
        "splits/pascal/val.txt",
    ]
    assert (split_dir / "labeled.txt").read_text() == (
        "JPEGImages/a1.jpg SegmentationClassAug/a1.png\n"
        "JPEGImages/a2.jpg SegmentationClassAug/a2.png\n"
    )
    back = build_voc(root, splits=split_dir)
    assert back.rows == m.rows
    assert back.meta.splits_made_by == "UniMatch splits pascal/2"
    # and once more: exporting the re-imported manifest gives the same bytes
    again = write_unimatch(back, tmp_path / "again" / "x" / "2")
    for a, b in zip(written, again, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_unimatch_import_published_style(tmp_path: Path) -> None:
    """UniMatch's own files: leading '/' dropped, one-column unlabeled lines accepted."""
    root = make_voc(tmp_path / "VOC2012")
    d = tmp_path / "splits" / "pascal" / "1"
    d.mkdir(parents=True)
    (d / "labeled.txt").write_text("JPEGImages/a1.jpg SegmentationClass/a1.png\n")
    (d / "unlabeled.txt").write_text(
        "JPEGImages/u1.jpg\n/JPEGImages/s1.jpg SegmentationClassAug/s1.png\n"
    )
    (d.parent / "val.txt").write_text("JPEGImages/v1.jpg SegmentationClass/v1.png\n")
    m = build_voc(root, splits=d)
    assert {r.id: (r.split, r.label) for r in m.rows} == {
        "a1": ("labeled", "SegmentationClass/a1.png"),
        "u1": ("unlabeled", None),
        "s1": ("unlabeled", "SegmentationClassAug/s1.png"),
        "v1": ("val", "SegmentationClass/v1.png"),
    }


def test_unimatch_import_with_sbd_folder(tmp_path: Path) -> None:
    """UniMatch lists SegmentationClass/ paths; with --sbd they are read from the SBD folder."""
    root = make_voc(tmp_path / "VOC2012")
    d = tmp_path / "splits" / "pascal" / "1_2"
    d.mkdir(parents=True)
    (d / "labeled.txt").write_text("JPEGImages/s1.jpg SegmentationClass/s1.png\n")
    (d / "unlabeled.txt").write_text("JPEGImages/s2.jpg SegmentationClass/s2.png\n")
    with pytest.raises(UserError, match=r"s1\.png: label file not found for labeled image 's1'"):
        build_voc(root, splits=d)
    m = build_voc(root, splits=d, sbd="SegmentationClassAug")
    assert [(r.id, r.label) for r in m.rows] == [
        ("s1", "SegmentationClassAug/s1.png"),
        ("s2", "SegmentationClassAug/s2.png"),
    ]


def test_unimatch_import_errors(tmp_path: Path) -> None:
    d = tmp_path / "s" / "1"
    with pytest.raises(UserError, match="split folder not found"):
        read_unimatch(d)
    d.mkdir(parents=True)
    with pytest.raises(UserError, match=r"labeled\.txt: split file not found"):
        read_unimatch(d)
    (d / "labeled.txt").write_text("a.jpg a.png\nb.jpg b.png\n")
    (d / "unlabeled.txt").write_text("c.jpg\nb.jpg\n")
    with pytest.raises(
        UserError,
        match=r"unlabeled\.txt:2: image 'b\.jpg' is also listed in "
        r"split 'labeled' .*labeled\.txt:2\); expected each image in one split",
    ):
        read_unimatch(d)
    (d / "unlabeled.txt").write_text("../x.jpg\n")
    with pytest.raises(UserError, match=r"unlabeled\.txt:1: path '\.\./x\.jpg' leaves the dataset"):
        read_unimatch(d)
    (d / "unlabeled.txt").write_text("a b c\n")
    with pytest.raises(UserError, match="line has 3 fields"):
        read_unimatch(d)
    (d / "unlabeled.txt").unlink()
    (d / "labeled.txt").write_text("a.jpg\n")
    root = make_voc(tmp_path / "VOC2012")
    with pytest.raises(UserError, match=r"labeled line has no label path"):
        build_voc(root, splits=d)


def test_split_maker_deterministic(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", train=tuple(f"t{i:02d}" for i in range(20)), rest=())
    m = build_voc(root, sbd="SegmentationClassAug")
    a = make_splits(m, labeled=5, val=0.25, seed=3)
    counts = {s: len(a.split(s)) for s in ("labeled", "unlabeled", "val")}
    assert counts == {"labeled": 5, "unlabeled": len(m) - 5 - 6, "val": 6}  # 0.25 * 23 -> 6
    # same seed, rows in another order -> same split; another seed -> another split
    shuffled = dataclasses.replace(m, rows=list(reversed(m.rows)))
    b = make_splits(shuffled, labeled=5, val=0.25, seed=3)
    assert {r.id: r.split for r in a.rows} == {r.id: r.split for r in b.rows}
    c = make_splits(m, labeled=5, val=0.25, seed=4)
    assert {r.id: r.split for r in a.rows} != {r.id: r.split for r in c.rows}
    # independent check: the permutation numpy gives for this seed decides the val images
    pool = sorted(r.id for r in m.rows if r.label is not None)
    perm = np.random.default_rng(3).permutation(len(pool))
    assert sorted(r.id for r in a.split("val")) == sorted(pool[i] for i in perm[:6])
    kept = make_splits(m, labeled=0.5, seed=0)
    assert [r.id for r in kept.split("val")] == ["v1"]
    with pytest.raises(UserError, match="asked for 40 labeled"):
        make_splits(m, labeled=40)


def test_parse_amount() -> None:
    assert parse_amount("92", "--labeled") == 92
    assert parse_amount("0.125", "--labeled") == 0.125
    with pytest.raises(UserError, match=r"--labeled = '1\.5'; expected an image count"):
        parse_amount("1.5", "--labeled")
    with pytest.raises(UserError, match=r"--val = 'x'; expected"):
        parse_amount("x", "--val")


def test_fingerprint_stability(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012")
    m = build_voc(root)
    fp = compute_fingerprint(m.meta, m.rows)
    assert fp == compute_fingerprint(m.meta, list(reversed(m.rows)))
    moved = dataclasses.replace(m.meta, root="/elsewhere/VOC2012")
    assert compute_fingerprint(moved, m.rows) == fp
    changed = [dataclasses.replace(m.rows[0], height=m.rows[0].height + 1), *m.rows[1:]]
    assert compute_fingerprint(m.meta, changed) != fp
    resplit = [dataclasses.replace(m.rows[0], split="val"), *m.rows[1:]]
    assert compute_fingerprint(m.meta, resplit) != fp
    assert compute_fingerprint(dataclasses.replace(m.meta, classes=["x"] * 21), m.rows) != fp
    # saved in two places with rows in another order: same fingerprint on disk
    a = save_manifest(m, tmp_path / "a.jsonl", root)
    m2 = dataclasses.replace(m, rows=list(reversed(m.rows)))
    b = save_manifest(m2, tmp_path / "deeper" / "b.jsonl", root)
    fa = json.loads(a.read_text().splitlines()[0])["meta"]["fingerprint"]
    fb = json.loads(b.read_text().splitlines()[0])["meta"]["fingerprint"]
    assert fa == fb == fp == data_manifest.load(b).fingerprint
