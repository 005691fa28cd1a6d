"""Split files for UniMatch / AllSpark: the filtered pseudo-labels as a plug-in.

Both frameworks read ``splits/<dataset>/<split>/{labeled,unlabeled}.txt`` with lines
``<image> <label>`` joined onto their ``data_root`` with ``os.path.join``; a path that is
absolute replaces the root, so pseudo-labels outside the dataset work as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_manifest.io import atomic_write_text
from data_manifest.manifest import Manifest
from train.data import pseudo_path

FILES = ("labeled.txt", "unlabeled.txt", "pseudo_labeled.txt", "labeled_plus_pseudo.txt", "val.txt")


def _rel(path: Path, root: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def export_splits(
    manifest: Manifest, pseudo_dir: str | os.PathLike, out: str | os.PathLike
) -> dict[str, int]:
    """Write the split files into ``out``; returns the number of lines of each.

    * ``labeled.txt``: ground-truth labeled images, ``image label`` (paths relative to the root).
    * ``pseudo_labeled.txt``: unlabeled images with their pseudo-label PNG (absolute path unless
      inside the root) — feed it as extra labeled data.
    * ``unlabeled.txt``: the same lines, as the unlabeled list of a semi-supervised run.
    * ``labeled_plus_pseudo.txt``: both, for a supervised run on labeled + pseudo-labeled data.
    * ``val.txt``: validation images and labels.

    Only unlabeled images whose PNG exists are listed (calibrate writes one per image).
    """
    root, out = manifest.root, Path(out)
    labeled = [f"{r.image} {r.label}" for r in manifest.split("labeled")]
    val = [f"{r.image} {r.label}" for r in manifest.split("val")]
    pseudo = []
    for r in manifest.split("unlabeled"):
        png = pseudo_path(pseudo_dir, r.id)
        if png.is_file():
            pseudo.append(f"{r.image} {_rel(png, root)}")
    content = {
        "labeled.txt": labeled,
        "unlabeled.txt": pseudo,
        "pseudo_labeled.txt": pseudo,
        "labeled_plus_pseudo.txt": labeled + pseudo,
        "val.txt": val,
    }
    for name, lines in content.items():
        atomic_write_text(out / name, "".join(x + "\n" for x in lines))
    return {name: len(lines) for name, lines in content.items()}
