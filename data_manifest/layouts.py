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
``folder``      ``images/**/<id>.{jpg,png}``, ``labels/**/<id>.png``, ``classes.txt``
==============  ===========================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image

from data_manifest.errors import UserError
from data_manifest.manifest import Manifest, Meta, Row, check_id
from data_manifest.splits import SplitEntry, read_unimatch, sort_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

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
        UserError: missing file, no classes, a bad colour, or some lines with colours and
            some without.
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
        names.append(" ".join(parts))
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
    """(height, width) from the image header, without decoding the pixels."""
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:  # Pillow raises several unrelated types for broken files
        raise UserError(f"{path}: cannot read image header ({exc})") from None
    return h, w


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _make_rows(
    root: Path,
    entries: Iterable[tuple[str, str, str | None, str]],
    require_labels: bool = True,
) -> list[Row]:
    """Rows from (id, image_rel, label_rel or None, split), image sizes read in parallel.

    A label path whose file is missing is an error for labeled/val rows and dropped (None)
    for unlabeled rows.
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
    return [
        Row(id=i, image=im, label=lb, split=s, height=h, width=w)
        for (i, im, lb, s), (h, w) in zip(checked, sizes, strict=True)
    ]


def _from_split_files(
    root: Path, split_dir: str | os.PathLike, id_of: Callable[[str], str]
) -> list[tuple[str, str, str | None, str]]:
    found = read_unimatch(split_dir)
    out = []
    for split, entries in found.items():
        for e in entries:
            _require_label(e, split)
            out.append((id_of(e.image), e.image, e.label, split))
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
) -> Manifest:
    """PASCAL VOC 2012 layout (also the layout of the embedded demo).

    Args:
        root: the ``VOC2012`` folder (``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/``).
        classes_file: a classes file (see :func:`read_classes_file`) instead of VOC's 21.
        sbd: folder (relative to ``root``) of the SBD augmented labels, e.g.
            ``SegmentationClassAug``: labels are taken from it, and its images outside the
            labeled and val lists become the unlabeled split.
        splits: a UniMatch split folder (``splits/pascal/1464``); overrides the lists. With
            ``sbd`` too, label paths under ``SegmentationClass/`` are read from ``sbd``.
        train_list, val_list: names of the lists in ``ImageSets/Segmentation/`` that give the
            labeled and val splits when ``splits`` is not given.
        unlabeled_rest: without ``sbd`` and ``splits``, every other image in ``JPEGImages/``
            becomes unlabeled.
    """
    root = _check_root(root, "PASCAL VOC", "JPEGImages")
    if classes_file is not None:
        classes, palette = read_classes_file(classes_file)
        palette = palette or voc_colormap(len(classes))
    else:
        classes, palette = list(VOC_CLASSES), voc_colormap(len(VOC_CLASSES))
    background = 0 if classes[0].lower() in ("background", "_background_") else None
    label_dir = "SegmentationClass"
    if sbd is not None:
        label_dir = PurePosixPath(sbd).as_posix().strip("/")
        if not (root / label_dir).is_dir():
            raise UserError(
                f"{root / label_dir}: SBD label folder not found; expected a folder "
                "of augmented label PNGs such as SegmentationClassAug"
            )
    if splits is not None:
        entries = _from_split_files(root, splits, lambda p: PurePosixPath(p).stem)
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
    rows = _make_rows(root, entries)
    meta = _meta(root, dataset, classes, palette, made_by, background_index=background)
    return Manifest(meta=meta, rows=sort_rows(rows))


def build_ade20k(
    root: str | os.PathLike, *, splits: str | os.PathLike | None = None, dataset: str = "ade20k"
) -> Manifest:
    """ADE20K scene parsing (``ADEChallengeData2016``): 150 classes, ``reduce_zero_label``.

    Label value 0 ("other") is ignored and v becomes class v - 1 when labels are read.
    Without ``splits``, ``training`` images are labeled and ``validation`` images are val.
    """
    root = _check_root(root, "ADE20K (ADEChallengeData2016)", "images")
    if splits is not None:
        entries = _from_split_files(root, splits, lambda p: PurePosixPath(p).stem)
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
) -> Manifest:
    """Cityscapes fine annotations as ``labelTrainIds`` (19 classes, 255 = ignore).

    The ``*_gtFine_labelTrainIds.png`` files are made by cityscapesScripts'
    ``createTrainIdLabelImgs``. Without ``splits``, ``train`` is labeled and ``val`` is val.
    """
    root = _check_root(root, "Cityscapes", "leftImg8bit")
    if splits is not None:
        entries = _from_split_files(root, splits, _cityscapes_id)
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


def build_folder(
    root: str | os.PathLike,
    *,
    classes_file: str | os.PathLike | None = None,
    images: str = "images",
    labels: str = "labels",
    splits: str | os.PathLike | None = None,
    background_index: int | None = None,
    dataset: str | None = None,
) -> Manifest:
    """The user's own data: ``images/`` and ``labels/`` with matching relative names.

    ``labels/<name>.png`` holds class indices (palette or greyscale PNG, 255 = ignore) for
    ``images/<name>.<ext>``; names may contain sub-folders, whose parts the id joins with
    ``__`` (``images/city/a.jpg`` has id ``city__a``), since an id is a plain file name.
    Hidden files and folders (names starting with ".") are skipped. Images with a label file
    are labeled, the others unlabeled; use ``python -m data_manifest split`` to draw
    labeled/val splits, or pass UniMatch ``splits``. ``background_index`` defaults to 0 when
    class 0 is named "background".
    """
    root = _check_root(root, "folder-layout", images)
    classes, palette = read_classes_file(classes_file or root / "classes.txt")
    palette = palette or voc_colormap(len(classes))
    if background_index is None and classes[0].lower() == "background":
        background_index = 0
    if background_index is not None and not 0 <= background_index < len(classes):
        raise UserError(
            f"background_index = {background_index}; expected a class index in "
            f"[0, {len(classes) - 1}]"
        )
    img_root = root / images

    def name_of(image_rel: str) -> str:
        """The image's path under ``images/`` without its suffix ("city/a")."""
        p = PurePosixPath(image_rel)
        parts = p.parts[len(PurePosixPath(images).parts) :]
        return PurePosixPath(*parts).with_suffix("").as_posix() if parts else p.stem

    def id_of(image_rel: str) -> str:
        return name_of(image_rel).replace("/", "__")

    if splits is not None:
        entries = _from_split_files(root, splits, id_of)
        made_by = _split_label(splits)
    else:
        entries = []
        for p in sorted(img_root.rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue
            if any(part.startswith(".") for part in p.relative_to(img_root).parts):
                continue
            rel = _rel(p, root)
            image_id = id_of(rel)
            label = f"{labels}/{name_of(rel)}.png"
            has = (root / label).is_file()
            entries.append(
                (image_id, rel, label if has else None, "labeled" if has else "unlabeled")
            )
        if not entries:
            raise UserError(
                f"{img_root}: no images found; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            )
        made_by = "images with a label file labeled, the rest unlabeled"
    rows = _make_rows(root, entries)
    meta = _meta(
        root, dataset or root.name, classes, palette, made_by, background_index=background_index
    )
    return Manifest(meta=meta, rows=sort_rows(rows))


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
