"""Builders: turn a dataset in a known folder layout into a :class:`~data_manifest.Manifest`.

Each builder scans the layout, reads every image's size from its header, and returns a
manifest whose row paths are relative to the dataset root (not yet saved; see
:func:`save_manifest`). Splits come from the layout's own lists, or from UniMatch split files
when ``splits`` names a split folder (see :mod:`data_manifest.splits`).

==============  ===========================================================================
layout          expected under the root
==============  ===========================================================================
``voc``         ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs),
                ``ImageSets/Segmentation/{train,val}.txt``; SBD: ``SegmentationClassAug/``
``ade20k``      ``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``
``cityscapes``  ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``,
                ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png``
``folder``      ``images/**/<name>.<ext>``, ``labels/**/<name>.png``, ``classes.txt``
==============  ===========================================================================

Image sizes are read from the file headers with the EXIF orientation applied, as the readers
(OpenCV) apply it when they decode. Labels must be in a lossless format (PNG); a builder refuses
a lossy one. What a builder finds besides the rows (where the classes came from, which class is
background, files it left out and why) goes into a :class:`BuildReport` for the command's
summary.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from data_manifest.errors import UserError
from data_manifest.io import label_format_problem
from data_manifest.manifest import SPLITS, Manifest, Meta, Row, check_id
from data_manifest.splits import UNIMATCH_FILES, SplitEntry, read_unimatch, sort_rows

#: image file suffixes the builders pick up (any case); OpenCV decodes each of them
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: class names taken as the background class without being asked (any case)
BACKGROUND_NAMES = ("background", "_background_", "__background__", "bg")
#: what a dataset without a background class goes without (short, then why it matters)
NO_BACKGROUND_EFFECT = "calibrate's foreground preference is off"
NO_BACKGROUND_WHY = (
    "where a prediction set holds the background and a foreground class, CP labels the pixel "
    "with the foreground class; on the demo that rule gives most of CP's gain"
)
_EXIF_ORIENTATION = 0x0112


@dataclass
class BuildReport:
    """What a builder found besides the rows, for the command's summary.

    Attributes:
        facts: (what, finding) lines: where images, labels, classes and splits came from,
            which class is background.
        left_out: (count, why, first example) for every kind of file found but not taken.
        warnings: one line each for what the user most likely wants to change (files left
            out, no background class, a missing val list).
    """

    facts: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[tuple[int, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def fact(self, what: str, finding: str) -> None:
        self.facts.append((what, finding))

    def leave_out(self, paths: list[str], why: str, warn: bool = True) -> None:
        """Record files left out for one reason (nothing when ``paths`` is empty)."""
        if not paths:
            return
        paths = sorted(paths)
        self.left_out.append((len(paths), why, paths[0]))
        if warn:
            n = len(paths)
            self.warnings.append(
                f"{n} file{'s' if n > 1 else ''} left out: {why} (first: {paths[0]})"
            )


VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip

# Cityscapes' 19 evaluation classes (trainIds 0-18) and their official colours.
CITYSCAPES_CLASSES = [
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)), ("fence", (190, 153, 153)), ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)), ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)), ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)),
]  # fmt: skip


def voc_colormap(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), ``n`` colours."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out.append([r, g, b])
    return out


def read_classes_file(path: str | os.PathLike) -> tuple[list[str], list[list[int]] | None]:
    """Read a classes file: one class per line, ``name`` or ``name r g b``; '#' starts a comment.

    Returns:
        (names, palette) with palette None when no line gives a colour.
    Raises:
        UserError: missing file, no classes, a name given twice, a bad colour, or some lines
            with colours and some without.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: classes file not found; expected one class name per line")
    names, colours = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        rgb: list[int] | None = None
        if len(parts) >= 4 and all(p.isdigit() for p in parts[-3:]):
            rgb = [int(p) for p in parts[-3:]]
            if any(v > 255 for v in rgb):
                raise UserError(f"{path}:{lineno}: colour {rgb}; expected r g b in 0-255")
            parts = parts[:-3]
        name = " ".join(parts)
        if name in names:
            raise UserError(
                f"{path}:{lineno}: class name {name!r} is also on an earlier line; expected "
                "each class once (a class's index is its line among the names)"
            )
        names.append(name)
        colours.append(rgb)
    if not names:
        raise UserError(f"{path}: no class names; expected one class name per line")
    if all(c is None for c in colours):
        return names, None
    if any(c is None for c in colours):
        raise UserError(
            f"{path}: some classes have a colour and some do not; expected 'name r g b' on "
            "every line or on none"
        )
    return names, [c for c in colours if c is not None]


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of the image as the readers decode it, from the file header.

    OpenCV's decoder (:func:`data_manifest.io.read_image`) applies the EXIF orientation
    (JPEG, PNG, WebP, TIFF), so an image whose tag says "rotated by 90°" (orientations 5-8)
    has its header's width and height swapped.
    """
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # Pillow raises several unrelated types for broken files
        raise UserError(f"{path}: cannot read image header ({exc})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_label_format(path: Path) -> None:
    """Refuse a label file in a lossy format or a mode other than P/L (header only)."""
    if not path.is_file():
        return  # a missing label is reported where it matters (split, row)
    try:
        with Image.open(path) as im:
            problem = label_format_problem(im)
    except Exception as exc:  # Pillow raises several unrelated types for broken files
        raise UserError(f"{path}: cannot read label header ({exc})") from None
    if problem:
        raise UserError(f"{path}: {problem}")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _make_rows(
    root: Path,
    entries: Iterable[tuple[str, str, str | None, str]],
    require_labels: bool = True,
) -> list[Row]:
    """Rows from (id, image_rel, label_rel or None, split), image sizes read in parallel.

    A label path whose file is missing is an error for labeled/val rows and dropped (None)
    for unlabeled rows; a label in a lossy format is an error.
    """
    entries = list(entries)
    seen: dict[str, str] = {}
    for image_id, image, _, _split in entries:
        check_id(image_id, str(root / image))
        if image_id in seen:
            raise UserError(
                f"{root / image}: id {image_id!r} is already used by {seen[image_id]}; "
                "expected unique ids"
            )
        seen[image_id] = image
    checked = []
    for image_id, image, label, split in entries:
        if label is not None and not (root / label).is_file():
            if split != "unlabeled" and require_labels:
                raise UserError(
                    f"{root / label}: label file not found for {split} image {image_id!r}; "
                    "expected a label PNG"
                )
            label = None
        checked.append((image_id, image, label, split))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        sizes = list(pool.map(lambda e: image_size(root / e[1]), checked))
        labels = [root / e[2] for e in checked if e[2] is not None]
        list(pool.map(check_label_format, labels))
    return [
        Row(id=i, image=im, label=lb, split=s, height=h, width=w)
        for (i, im, lb, s), (h, w) in zip(checked, sizes, strict=True)
    ]


def _from_split_files(
    root: Path,
    split_dir: str | os.PathLike,
    id_of: Callable[[str], str],
    report: BuildReport | None = None,
) -> list[tuple[str, str, str | None, str]]:
    found = read_unimatch(split_dir)
    out = []
    for split, entries in found.items():
        for e in entries:
            _require_label(e, split)
            out.append((id_of(e.image), e.image, e.label, split))
    if report is not None:
        files = ", ".join(f"{UNIMATCH_FILES[s]} {len(found[s])}" for s in SPLITS if s in found)
        report.fact("split files", f"{split_dir}: {files or 'all empty'}")
        if "val" not in found:
            report.warnings.append(
                f"no val.txt in {split_dir} or its parent: 0 val images; expected val.txt "
                "(lines 'image_rel label_rel') there to measure on a val split"
            )
        if "unlabeled" not in found:
            report.fact("unlabeled", f"no unlabeled.txt in {split_dir}: 0 unlabeled images")
    return out


def _swap_top(rel: str, old: str, new: str) -> str:
    """Replace the first folder of ``rel`` when it is ``old``."""
    parts = PurePosixPath(rel).parts
    return PurePosixPath(new, *parts[1:]).as_posix() if parts and parts[0] == old else rel


def _split_label(split_dir: str | os.PathLike) -> str:
    """``"UniMatch splits pascal/1464"``: the last two folder names only, so that the
    fingerprint does not depend on where the split files lie."""
    parts = Path(split_dir).resolve().parts[-2:]
    return f"UniMatch splits {'/'.join(parts)}"


def _require_label(e: SplitEntry, split: str) -> None:
    if split != "unlabeled" and e.label is None:
        raise UserError(
            f"{e.where}: {split} line has no label path; expected 'image_rel label_rel'"
        )


def _check_root(root: str | os.PathLike, what: str, expect: str) -> Path:
    root = Path(root).resolve()
    if not (root / expect).is_dir():
        raise UserError(f"{root}: no {expect}/ folder; expected the root of a {what} dataset")
    return root


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: image list not found; expected one image id per line")
    return [ln.split()[0] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _meta(
    root: Path,
    dataset: str,
    classes: list[str],
    palette: list[list[int]],
    made_by: str,
    **kw: object,
) -> Meta:
    """Metadata with the absolute root, so an unsaved manifest can read its files."""
    return Meta(
        dataset=dataset,
        classes=classes,
        palette=palette,
        splits_made_by=made_by,
        root=root.as_posix(),
        **kw,
    )


NO_BACKGROUND = -1  # background_index: the dataset has no background class (asked for)


def resolve_background(
    classes: list[str], background_index: int | None, report: BuildReport
) -> int | None:
    """The background class: ``background_index`` when given (:data:`NO_BACKGROUND`: none),
    else the one class named like background (:data:`BACKGROUND_NAMES`), else None.

    Records the finding in ``report``; without a background class found by name, also a
    warning naming class 0 and what the missing background switches off.

    Raises:
        UserError: an index outside the classes, or several classes named like background.
    """
    k = len(classes)
    if background_index == NO_BACKGROUND:
        report.fact("background", f"none (as asked): {NO_BACKGROUND_EFFECT}")
        return None
    if background_index is not None:
        if not 0 <= background_index < k:
            raise UserError(
                f"background_index = {background_index}; expected a class index in "
                f"[0, {k - 1}], or none"
            )
        report.fact("background", f"class {background_index} {classes[background_index]!r}")
        return background_index
    hits = [i for i, c in enumerate(classes) if c.lower() in BACKGROUND_NAMES]
    if len(hits) > 1:
        raise UserError(
            f"classes {', '.join(repr(classes[i]) for i in hits)} are all named like the "
            "background; expected one (name it with --background-index)"
        )
    if hits:
        i = hits[0]
        report.fact("background", f"class {i} {classes[i]!r} (by its name)")
        return i
    report.fact("background", f"none (no class is named 'background'): {NO_BACKGROUND_EFFECT}")
    report.warnings.append(
        f"no background class: no class is named 'background' (class 0 is {classes[0]!r}), so "
        f"{NO_BACKGROUND_EFFECT} ({NO_BACKGROUND_WHY}); if {classes[0]!r} is the background, "
        "rebuild with --background-index 0 (--background-index none keeps this choice without "
        "this warning)"
    )
    return None


def _classes(
    root: Path,
    classes_file: str | os.PathLike | None,
    default: list[str] | None,
    report: BuildReport,
) -> tuple[list[str], list[list[int]]]:
    """Class names and palette: ``classes_file``, else ``<root>/classes.txt`` when it exists,
    else ``default`` (VOC's 21); palette from the file or VOC's colour map."""
    path = Path(classes_file) if classes_file is not None else root / "classes.txt"
    if classes_file is None and default is not None and not path.is_file():
        report.fact("classes", f"{len(default)} (VOC's; no classes.txt in the root)")
        return list(default), voc_colormap(len(default))
    classes, palette = read_classes_file(path)
    colours = "its colours" if palette else "VOC's colour map"
    report.fact("classes", f"{len(classes)} from {path} ({colours})")
    return classes, palette or voc_colormap(len(classes))


def build_voc(
    root: str | os.PathLike,
    *,
    classes_file: str | os.PathLike | None = None,
    sbd: str | None = None,
    splits: str | os.PathLike | None = None,
    train_list: str = "train",
    val_list: str = "val",
    unlabeled_rest: bool = True,
    dataset: str = "voc",
    background_index: int | None = None,
    report: BuildReport | None = None,
) -> Manifest:
    """PASCAL VOC 2012 layout (also the layout of the embedded demo).

    Args:
        root: the ``VOC2012`` folder (``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/``).
        classes_file: a classes file (see :func:`read_classes_file`) instead of VOC's 21;
            default ``<root>/classes.txt`` when the folder has one.
        sbd: folder (relative to ``root``) of the SBD augmented labels, e.g.
            ``SegmentationClassAug``: labels are taken from it, and its images outside the
            labeled and val lists become the unlabeled split.
        splits: a UniMatch split folder (``splits/pascal/1464``); overrides the lists. With
            ``sbd`` too, label paths under ``SegmentationClass/`` are read from ``sbd``.
        train_list, val_list: names of the lists in ``ImageSets/Segmentation/`` that give the
            labeled and val splits when ``splits`` is not given.
        unlabeled_rest: without ``sbd`` and ``splits``, every other image in ``JPEGImages/``
            becomes unlabeled.
        background_index: see :func:`resolve_background` (default: by name).
        report: filled with what was found (see :class:`BuildReport`).
    """
    report = report if report is not None else BuildReport()
    root = _check_root(root, "PASCAL VOC", "JPEGImages")
    classes, palette = _classes(root, classes_file, VOC_CLASSES, report)
    background = resolve_background(classes, background_index, report)
    label_dir = "SegmentationClass"
    if sbd is not None:
        label_dir = PurePosixPath(sbd).as_posix().strip("/")
        if not (root / label_dir).is_dir():
            raise UserError(
                f"{root / label_dir}: SBD label folder not found; expected a folder "
                "of augmented label PNGs such as SegmentationClassAug"
            )
    if splits is not None:
        entries = _from_split_files(root, splits, lambda p: PurePosixPath(p).stem, report)
        if sbd is not None:  # UniMatch's files name SegmentationClass/, where it keeps SBD labels
            entries = [
                (i, im, None if lb is None else _swap_top(lb, "SegmentationClass", label_dir), s)
                for i, im, lb, s in entries
            ]
        made_by = _split_label(splits)
    else:
        lists = root / "ImageSets" / "Segmentation"
        labeled_ids = _read_list(lists / f"{train_list}.txt")
        val_ids = _read_list(lists / f"{val_list}.txt")
        taken = set(labeled_ids) | set(val_ids)

        def pair(i: str, split: str) -> tuple[str, str, str, str]:
            return (i, f"JPEGImages/{i}.jpg", f"{label_dir}/{i}.png", split)

        entries = [pair(i, "labeled") for i in labeled_ids] + [pair(i, "val") for i in val_ids]
        made_by = f"ImageSets/Segmentation/{train_list}.txt, {val_list}.txt"
        if sbd is not None:
            extra = sorted(p.stem for p in (root / label_dir).glob("*.png") if p.stem not in taken)
            entries += [pair(i, "unlabeled") for i in extra]
            made_by += f", rest of {label_dir}/ unlabeled"
        elif unlabeled_rest:
            extra = sorted(
                p.stem for p in (root / "JPEGImages").glob("*.jpg") if p.stem not in taken
            )
            entries += [(i, f"JPEGImages/{i}.jpg", None, "unlabeled") for i in extra]
            made_by += ", rest of JPEGImages/ unlabeled"
            report.leave_out(
                [
                    _rel(p, root)
                    for p in (root / "JPEGImages").iterdir()
                    if p.is_file() and p.suffix != ".jpg" and not p.name.startswith(".")
                ],
                "not named <id>.jpg in JPEGImages/ (VOC's layout)",
            )
    rows = _make_rows(root, entries)
    meta = _meta(root, dataset, classes, palette, made_by, background_index=background)
    return Manifest(meta=meta, rows=sort_rows(rows))


def build_ade20k(
    root: str | os.PathLike,
    *,
    splits: str | os.PathLike | None = None,
    dataset: str = "ade20k",
    report: BuildReport | None = None,
) -> Manifest:
    """ADE20K scene parsing (``ADEChallengeData2016``): 150 classes, ``reduce_zero_label``.

    Label value 0 ("other") is ignored and v becomes class v - 1 when labels are read.
    Without ``splits``, ``training`` images are labeled and ``validation`` images are val.
    """
    report = report if report is not None else BuildReport()
    root = _check_root(root, "ADE20K (ADEChallengeData2016)", "images")
    report.fact("classes", "150 (ADE20K's; label 0 'other' is ignored)")
    report.fact("background", f"none (ADE20K has no background class): {NO_BACKGROUND_EFFECT}")
    if splits is not None:
        entries = _from_split_files(root, splits, lambda p: PurePosixPath(p).stem, report)
        made_by = _split_label(splits)
    else:
        entries = []
        for sub, split in (("training", "labeled"), ("validation", "val")):
            for p in sorted((root / "images" / sub).glob("*.jpg")):
                entries.append((p.stem, _rel(p, root), f"annotations/{sub}/{p.stem}.png", split))
        made_by = "images/training labeled, images/validation val"
    rows = _make_rows(root, entries)
    meta = _meta(
        root, dataset, list(ADE20K_CLASSES), voc_colormap(151)[1:], made_by, reduce_zero_label=True
    )
    return Manifest(meta=meta, rows=sort_rows(rows))


def _cityscapes_id(image_rel: str) -> str:
    return PurePosixPath(image_rel).stem.removesuffix("_leftImg8bit")


def build_cityscapes(
    root: str | os.PathLike,
    *,
    splits: str | os.PathLike | None = None,
    dataset: str = "cityscapes",
    report: BuildReport | None = None,
) -> Manifest:
    """Cityscapes fine annotations as ``labelTrainIds`` (19 classes, 255 = ignore).

    The ``*_gtFine_labelTrainIds.png`` files are made by cityscapesScripts'
    ``createTrainIdLabelImgs``. Without ``splits``, ``train`` is labeled and ``val`` is val.
    """
    report = report if report is not None else BuildReport()
    root = _check_root(root, "Cityscapes", "leftImg8bit")
    report.fact("classes", "19 (Cityscapes' trainIds)")
    report.fact("background", f"none (Cityscapes has no background class): {NO_BACKGROUND_EFFECT}")
    if splits is not None:
        entries = _from_split_files(root, splits, _cityscapes_id, report)
        made_by = _split_label(splits)
    else:
        entries = []
        for sub, split in (("train", "labeled"), ("val", "val")):
            for p in sorted((root / "leftImg8bit" / sub).glob("*/*_leftImg8bit.png")):
                rel = _rel(p, root)
                stem = _cityscapes_id(rel)
                label = f"gtFine/{sub}/{p.parent.name}/{stem}_gtFine_labelTrainIds.png"
                entries.append((stem, rel, label, split))
        made_by = "leftImg8bit/train labeled, leftImg8bit/val val"
    rows = _make_rows(root, entries)
    meta = _meta(
        root,
        dataset,
        [c for c, _ in CITYSCAPES_CLASSES],
        [list(rgb) for _, rgb in CITYSCAPES_CLASSES],
        made_by,
    )
    return Manifest(meta=meta, rows=sort_rows(rows))


def _scan_images(img_root: Path, root: Path, report: BuildReport) -> list[Path]:
    """Image files under ``img_root`` (sorted); other files are recorded as left out."""
    images, hidden, other = [], [], []
    for p in sorted(img_root.rglob("*")):
        if not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(img_root).parts):
            hidden.append(_rel(p, root))
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            other.append(_rel(p, root))
    report.leave_out(hidden, "hidden (a name starting with '.')", warn=False)
    suffixes = ", ".join(sorted({PurePosixPath(o).suffix or "no suffix" for o in other}))
    report.leave_out(other, f"not an image ({suffixes}; images end in {', '.join(IMAGE_SUFFIXES)})")
    counts = Counter(p.suffix.lower() for p in images)
    report.fact(
        "images",
        f"{len(images)} under {_rel(img_root, root)}/ ("
        + ", ".join(f"{n} {sfx}" for sfx, n in sorted(counts.items()))
        + ")",
    )
    return images


def _label_suffix_hint(unmatched: list[str], names: set[str], labels: str) -> str:
    """`` (--label-suffix _mask matches N of them)`` when the unmatched label files are the
    images' names plus a common ending; "" otherwise."""
    endings: Counter[str] = Counter()
    for rel in unmatched:
        name = PurePosixPath(rel).relative_to(labels).with_suffix("").as_posix()
        for cut in range(len(name) - 1, 0, -1):
            if name[:cut] in names:
                endings[name[cut:]] += 1
                break
    if not endings:
        return ""
    ending, n = endings.most_common(1)[0]
    return f" (--label-suffix {ending} matches {n} of them to images)"


def _other_label_folders(root: Path, images: str, labels: str) -> str:
    """`` (masks/ holds 124 PNG files)``: folders under the root that look like label folders."""
    hints = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name in (images, labels):
            continue
        n = sum(1 for _ in d.rglob("*.png"))
        if n:
            hints.append(f"{d.name}/ holds {n} PNG files: --labels {d.name}?")
    return f" ({'; '.join(hints[:3])})" if hints else ""


def build_folder(
    root: str | os.PathLike,
    *,
    classes_file: str | os.PathLike | None = None,
    images: str = "images",
    labels: str = "labels",
    label_suffix: str = "",
    splits: str | os.PathLike | None = None,
    background_index: int | None = None,
    dataset: str | None = None,
    report: BuildReport | None = None,
) -> Manifest:
    """The user's own data: ``images/`` and ``labels/`` with matching relative names.

    ``labels/<name><label_suffix>.png`` holds class indices (palette or greyscale PNG, 255 =
    ignore) for ``images/<name>.<ext>`` (``ext`` one of :data:`IMAGE_SUFFIXES`, any case);
    names may contain sub-folders, whose parts the id joins with ``__`` (``images/city/a.jpg``
    has id ``city__a``), since an id is a plain file name. Hidden files and folders (names
    starting with ".") are skipped. Images with a label file are labeled, the others
    unlabeled; use ``python -m data_manifest split`` to draw labeled/val splits, or pass
    UniMatch ``splits`` (then images listed in no split file are left out). The background
    class is ``background_index``, else the class named "background" (see
    :func:`resolve_background`). Everything left out, and why, goes into ``report``.

    Raises:
        UserError: no classes file, a duplicate class name, no images, no label folder or no
            label matching an image (without ``splits``), a label in a lossy format, ...
    """
    report = report if report is not None else BuildReport()
    root = _check_root(root, "folder-layout", images)
    classes, palette = _classes(root, classes_file, None, report)
    background_index = resolve_background(classes, background_index, report)
    img_root = root / images
    image_files = _scan_images(img_root, root, report)
    if not image_files:
        raise UserError(
            f"{img_root}: no images found; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )

    def name_of(image_rel: str) -> str:
        """The image's path under ``images/`` without its suffix ("city/a")."""
        p = PurePosixPath(image_rel)
        parts = p.parts[len(PurePosixPath(images).parts) :]
        return PurePosixPath(*parts).with_suffix("").as_posix() if parts else p.stem

    def id_of(image_rel: str) -> str:
        return name_of(image_rel).replace("/", "__")

    if splits is not None:
        entries = _from_split_files(root, splits, id_of, report)
        made_by = _split_label(splits)
        listed = {im for _, im, _, _ in entries}
        report.leave_out(
            [_rel(p, root) for p in image_files if _rel(p, root) not in listed],
            f"an image listed in no split file of {splits}",
        )
    else:
        entries = _pair_labels(root, image_files, images, labels, label_suffix, name_of, report)
        made_by = "images with a label file labeled, the rest unlabeled"
    rows = _make_rows(root, entries)
    meta = _meta(
        root, dataset or root.name, classes, palette, made_by, background_index=background_index
    )
    return Manifest(meta=meta, rows=sort_rows(rows))


def _pair_labels(
    root: Path,
    image_files: list[Path],
    images: str,
    labels: str,
    label_suffix: str,
    name_of: Callable[[str], str],
    report: BuildReport,
) -> list[tuple[str, str, str | None, str]]:
    """(id, image, label or None, split) for the folder layout without split files: an image
    with ``labels/<name><label_suffix>.png`` is labeled, the others unlabeled.

    Raises:
        UserError: no label folder, no label file matching an image, a label of an image in
            a lossy format (``labels/<name>.jpg``).
    """
    lab_root = root / labels
    expect = f"{labels}/<name>{label_suffix}.png for images/<name>.<ext>"
    for p in image_files:  # an id that cannot name a file: said before anything about labels
        check_id(name_of(_rel(p, root)).replace("/", "__"), str(p))
    if not lab_root.is_dir():
        raise UserError(
            f"{lab_root}: label folder not found; expected label PNGs ({expect}), or the "
            f"label folder's name in --labels{_other_label_folders(root, images, labels)}"
        )
    label_files = {
        _rel(p, root)
        for p in lab_root.rglob("*")
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(lab_root).parts)
    }
    by_stem: dict[str, list[str]] = {}
    for f in sorted(label_files):
        by_stem.setdefault(str(PurePosixPath(f).with_suffix("")), []).append(f)
    entries, used, other_format = [], set(), []
    for p in image_files:
        rel = _rel(p, root)
        stem = f"{labels}/{name_of(rel)}{label_suffix}"
        label = f"{stem}.png"
        if label in label_files:
            used.add(label)
        else:
            found = by_stem.get(stem, [])
            for f in found:
                check_label_format(root / f)  # a JPEG label: refused, with the reason
            other_format += found
            used.update(found)
            label = None
        split = "unlabeled" if label is None else "labeled"
        entries.append((name_of(rel).replace("/", "__"), rel, label, split))
    report.leave_out(other_format, f"a label not named <name>{label_suffix}.png")
    unmatched = sorted(label_files - used)
    names = {name_of(_rel(p, root)) for p in image_files}
    hint = _label_suffix_hint(unmatched, names, labels)
    n_lab = len(used) - len(other_format)
    if n_lab == 0:
        first = f" (first: {unmatched[0]})" if unmatched else ""
        raise UserError(
            f"{lab_root}: no label file matches an image: {len(label_files)} files{first}; "
            f"expected {expect}{hint}"
        )
    report.leave_out(unmatched, f"a label file that matches no image (expected {expect}){hint}")
    report.fact(
        "labels",
        f"{n_lab} in {labels}/ ({len(image_files) - n_lab} images without one: unlabeled)",
    )
    return entries


def save_manifest(manifest: Manifest, out: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Save ``manifest`` to ``out`` with ``meta.root`` pointing at ``root``.

    The root is stored relative to the manifest's folder when possible (so the dataset and
    its manifest can move together), absolute otherwise.
    """
    out = Path(out)
    root_abs = Path(root).resolve()
    out_dir = out.parent.resolve()
    try:
        rel = Path(os.path.relpath(root_abs, out_dir)).as_posix()
    except ValueError:  # another drive on Windows
        rel = root_abs.as_posix()
    manifest.meta.root = rel
    return manifest.save(out)
