"""Split files and the split maker.

UniMatch's split files are the convention for published semi-supervised splits::

    splits/<dataset>/<name>/labeled.txt     one line per image: "image_rel label_rel"
    splits/<dataset>/<name>/unlabeled.txt   "image_rel label_rel" or just "image_rel"
    splits/<dataset>/val.txt                "image_rel label_rel"

Paths are relative to the dataset root. :func:`read_unimatch` reads such a folder (``val.txt``
is looked for in the folder itself, then in its parent), :func:`write_unimatch` writes one
from a manifest, and :func:`make_splits` draws a deterministic split for the user's own data.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_manifest.errors import UserError
from data_manifest.io import atomic_write_text
from data_manifest.manifest import Manifest, Row, check_relative

#: split name -> UniMatch file name
UNIMATCH_FILES = {"labeled": "labeled.txt", "unlabeled": "unlabeled.txt", "val": "val.txt"}


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: an image path and, optionally, its label path."""

    image: str
    label: str | None
    where: str


def _read_split_file(path: Path) -> list[SplitEntry]:
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        if len(parts) > 2:
            raise UserError(
                f"{where}: line has {len(parts)} fields; expected 'image_rel label_rel' "
                "or 'image_rel'"
            )
        image = parts[0].lstrip("/")
        label = parts[1].lstrip("/") if len(parts) == 2 else None
        check_relative(image, where)
        if label is not None:
            check_relative(label, where)
        entries.append(SplitEntry(image, label, where))
    return entries


def read_unimatch(split_dir: str | os.PathLike) -> dict[str, list[SplitEntry]]:
    """Read ``labeled.txt``, ``unlabeled.txt`` and ``val.txt`` of a UniMatch split folder.

    ``labeled.txt`` is required; ``unlabeled.txt`` and ``val.txt`` (in the folder or its
    parent, as UniMatch keeps it) are optional. UniMatch writes VOC paths with a leading '/'
    in places; it is dropped.

    Returns:
        split name -> entries in file order.
    Raises:
        UserError: missing folder or ``labeled.txt``, malformed line, path leaving the root,
            or an image listed in two splits.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: split folder not found; expected a folder with labeled.txt")
    out: dict[str, list[SplitEntry]] = {}
    for split, name in UNIMATCH_FILES.items():
        path = split_dir / name
        if split == "val" and not path.is_file():
            path = split_dir.parent / name
        if not path.is_file():
            if split == "labeled":
                raise UserError(f"{path}: split file not found; expected UniMatch's labeled.txt")
            continue
        out[split] = _read_split_file(path)
    seen: dict[str, tuple[str, str]] = {}
    for split, entries in out.items():
        for e in entries:
            if e.image in seen:
                other_split, other_where = seen[e.image]
                raise UserError(
                    f"{e.where}: image {e.image!r} is also listed in split {other_split!r} "
                    f"({other_where}); expected each image in one split"
                )
            seen[e.image] = (split, e.where)
    return out


def write_unimatch(manifest: Manifest, split_dir: str | os.PathLike) -> list[Path]:
    """Write the manifest's splits as UniMatch split files.

    ``labeled.txt`` and ``unlabeled.txt`` go into ``split_dir``; ``val.txt`` into its parent
    (``splits/<dataset>/val.txt``). Lines are in manifest order; an unlabeled image without a
    label file gets a one-field line.

    Returns:
        The files written.
    """
    split_dir = Path(split_dir)
    written = []
    for split, name in UNIMATCH_FILES.items():
        rows = manifest.split(split)
        if split == "unlabeled" and not rows:
            continue
        target = (split_dir.parent if split == "val" else split_dir) / name
        lines = [r.image if r.label is None else f"{r.image} {r.label}" for r in rows]
        atomic_write_text(target, "".join(line + "\n" for line in lines))
        written.append(target)
    return written


def parse_amount(text: str, what: str) -> int | float:
    """``"92"`` -> 92 images; ``"0.125"`` -> a fraction. Raises UserError otherwise."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0.0 <= value < 1.0:
            raise UserError(
                f"{what} = {text!r}; expected an image count (integer) or a fraction in [0, 1)"
            ) from None
        return value
    if value < 0:
        raise UserError(f"{what} = {text!r}; expected a non-negative image count")
    return value


def _count(amount: int | float, total: int) -> int:
    return int(round(amount * total)) if isinstance(amount, float) else int(amount)


def make_splits(
    manifest: Manifest,
    labeled: int | float,
    val: int | float | None = None,
    seed: int = 0,
) -> Manifest:
    """Re-split a manifest deterministically.

    Images with a label file are the candidates for ``labeled`` and ``val``; they are sorted
    by id and shuffled with ``numpy.random.default_rng(seed)``, so the result does not depend
    on the row order. ``val`` images are drawn first (``val=None`` keeps the current val split
    as it is), then ``labeled``; every other image becomes ``unlabeled`` (keeping its label
    file, which training never reads). An ``int`` is a count, a ``float`` a fraction of the
    candidates.

    Returns:
        A new manifest (same root and metadata, ``splits_made_by`` updated); not saved.
    Raises:
        UserError: asking for more images than there are candidates.
    """
    keep_val = val is None
    fixed_val = {r.id for r in manifest.split("val")} if keep_val else set()
    pool = sorted(
        (r for r in manifest.rows if r.label is not None and r.id not in fixed_val),
        key=lambda r: r.id,
    )
    n_val = 0 if keep_val else _count(val, len(pool))
    n_lab = _count(labeled, len(pool))
    if n_val + n_lab > len(pool):
        raise UserError(
            f"{manifest.path}: asked for {n_lab} labeled + {n_val} val images but only "
            f"{len(pool)} images have labels; expected at most {len(pool)} in total"
        )
    if n_lab == 0:
        raise UserError(f"labeled = {labeled!r}; expected at least one labeled image")
    order = np.random.default_rng(seed).permutation(len(pool))
    new_split: dict[str, str] = {}
    for rank, idx in enumerate(order):
        new_split[pool[idx].id] = (
            "val" if rank < n_val else ("labeled" if rank < n_val + n_lab else "unlabeled")
        )
    rows = []
    for r in manifest.rows:
        split = "val" if r.id in fixed_val else new_split.get(r.id, "unlabeled")
        rows.append(dataclasses.replace(r, split=split))
    made_by = f"split: labeled={labeled!r} val={'kept' if keep_val else repr(val)} seed={seed}"
    meta = dataclasses.replace(manifest.meta, splits_made_by=made_by, fingerprint="")
    return Manifest(meta=meta, rows=sort_rows(rows), path=None)


def sort_rows(rows: list[Row]) -> list[Row]:
    """Rows ordered by split (labeled, unlabeled, val), then by id."""
    order = {"labeled": 0, "unlabeled": 1, "val": 2}
    return sorted(rows, key=lambda r: (order[r.split], r.id))
