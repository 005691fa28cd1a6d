"""Dataset figures for ``python -m data_manifest summary``: images per split, label pixel counts."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from data_manifest.manifest import SPLITS, Manifest, Row


def label_histogram(manifest: Manifest, row: Row) -> np.ndarray:
    """Pixel count per value of one label (after ``reduce_zero_label``): int64 (256,)."""
    return np.bincount(manifest.read_label(row).ravel(), minlength=256).astype(np.int64)


def summarize(
    manifest: Manifest,
    pixels: bool = True,
    on_row: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Figures of a manifest as a JSON-ready dict.

    Keys: ``dataset``, ``fingerprint``, ``num_classes``, ``classes`` (index, name, palette),
    ``splits`` (per split: ``images``, ``with_label``, ``pixels``), and with ``pixels`` also
    ``label_pixels``: per split with labels, ``per_class`` (K ints) and ``ignore`` (255 count).
    """
    out: dict[str, Any] = {
        "dataset": manifest.meta.dataset,
        "fingerprint": manifest.fingerprint,
        "num_classes": manifest.num_classes,
        "background_index": manifest.meta.background_index,
        "reduce_zero_label": manifest.meta.reduce_zero_label,
        "classes": [
            {"index": i, "name": c, "palette": manifest.palette[i]}
            for i, c in enumerate(manifest.classes)
        ],
        "splits": {},
    }
    for s in SPLITS:
        rows = manifest.split(s)
        out["splits"][s] = {
            "images": len(rows),
            "with_label": sum(r.label is not None for r in rows),
            "pixels": sum(r.height * r.width for r in rows),
        }
    if not pixels:
        return out
    k = manifest.num_classes
    out["label_pixels"] = {}
    for s in SPLITS:
        rows = [r for r in manifest.split(s) if r.label is not None]
        if not rows:
            continue

        def one(r: Row) -> np.ndarray:
            try:
                return label_histogram(manifest, r)
            finally:
                if on_row is not None:
                    on_row()

        total = np.zeros(256, dtype=np.int64)
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            for h in pool.map(one, rows):
                total += h
        out["label_pixels"][s] = {
            "per_class": [int(v) for v in total[:k]],
            "ignore": int(total[255]),
            "other": int(total[k:255].sum()),
        }
    return out
