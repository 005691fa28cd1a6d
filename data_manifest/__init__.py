"""Describe a dataset once: images, labels, splits, classes, palette and a fingerprint.

>>> import data_manifest
>>> m = data_manifest.load("data/demo/target/manifest.jsonl")
>>> m.classes, len(m.split("labeled"))
>>> image = m.read_image(m.split("val")[0])  # (H, W, 3) uint8 RGB
"""

from data_manifest.errors import UserError
from data_manifest.manifest import (
    IGNORE_INDEX,
    SCHEMA,
    SPLITS,
    Manifest,
    Meta,
    Row,
    compute_fingerprint,
    load,
)
from data_manifest.resolve import DataConfig, resolve_manifest

__all__ = [
    "IGNORE_INDEX",
    "SCHEMA",
    "SPLITS",
    "Manifest",
    "Meta",
    "Row",
    "UserError",
    "compute_fingerprint",
    "load",
    "DataConfig",
    "resolve_manifest",
]
