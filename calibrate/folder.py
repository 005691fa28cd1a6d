"""A pseudo-label folder: when it is complete, and how a run keeps it honest after a kill.

Protocol of ``python -m calibrate run`` on its output folder ``out``:

0. compute every PNG; those whose bytes differ from the file in ``out`` are written to the
   staging folder ``.<out name>.staging`` beside it (``out`` is not touched, so a refusal or a
   kill here leaves the previous folder as it was);
1. create the marker ``calibration.incomplete`` in ``out`` (atomically);
2. remove stale temporaries of killed runs and PNGs of ids that are no longer unlabeled;
3. move the staged PNGs into place (one rename each), write ``config.toml``, ``run.json``,
   ``kept_fraction.json`` and the plots;
4. write ``calibration.json``, which records the sha256 of every PNG;
5. remove the marker.

So a folder is complete exactly when ``calibration.json`` is there and the marker is not; a run
killed at any moment leaves either the previous complete folder (killed before step 1) or a
marked one, which :func:`check_complete` (and so the trainer) refuses until a run finishes.
Re-running with the same inputs stages nothing and rewrites no PNG.

This module imports no dask, zarr or annotate code, so readers (the trainer) stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_manifest.errors import UserError
from data_manifest.io import atomic_write_text
from data_manifest.manifest import id_path

REPORT = "calibration.json"
MARKER = "calibration.incomplete"
_MARKER_TEXT = (
    "A python -m calibrate run started writing this folder and has not finished: the PNGs may "
    "mix two runs. Run it again to complete the folder; trainers refuse it until then.\n"
)


def mark_incomplete(out_dir: Path) -> None:
    """Step 1: the folder is refused by readers from now until :func:`mark_complete`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / MARKER, _MARKER_TEXT)


def mark_complete(out_dir: Path) -> None:
    """Step 5 (after ``calibration.json`` is written)."""
    (out_dir / MARKER).unlink(missing_ok=True)


def is_ours(out_dir: Path) -> bool:
    """True when calibrate wrote this folder before (report or marker present)."""
    return (out_dir / REPORT).is_file() or (out_dir / MARKER).is_file()


def check_writable(out_dir: Path) -> None:
    """Refuse an existing, non-empty folder that calibrate did not write (its files would be
    mixed with the PNGs, and orphan clean-up must never touch them).

    Raises:
        UserError: ``out_dir`` is a file, or a non-empty folder without a calibrate report.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: out_dir is a file; expected a folder for the pseudo-labels")
    if out_dir.is_dir() and not is_ours(out_dir) and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir}: out_dir exists, is not empty and holds no {REPORT}; expected an "
            "empty or new folder, or one written by python -m calibrate run"
        )


def clean(out_dir: Path, keep_ids: Iterable[str]) -> tuple[int, int]:
    """Step 2: remove temporaries (``.*.tmp`` in ``out_dir`` and ``plots/``, left by killed
    writers) and pseudo-label PNGs (``out_dir/<id>.png``) whose id is not in ``keep_ids``.
    Call only on a folder calibrate owns (see :func:`check_writable`) and while no other run
    writes to it.

    Returns:
        (temporaries removed, orphan PNGs removed).
    """
    keep = {f"{i}.png" for i in keep_ids}
    tmp = orphans = 0
    for folder in (out_dir, out_dir / "plots"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            name = path.name
            if not path.is_file():
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                tmp += 1
            elif folder == out_dir and name.endswith(".png") and name not in keep:
                path.unlink(missing_ok=True)
                orphans += 1
    return tmp, orphans


def staging_dir(out_dir: Path) -> Path:
    """Where a run stages its new PNGs: a hidden folder beside ``out_dir`` (same file system,
    so that moving a PNG into place is one rename)."""
    return out_dir.parent / f".{out_dir.name}.staging"


def commit(stage: Path, out_dir: Path, ids: Iterable[str]) -> None:
    """Step 3: move the staged PNGs of ``ids`` into ``out_dir``; remove the staging folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        os.replace(id_path(stage, image_id), id_path(out_dir, image_id))
    shutil.rmtree(stage, ignore_errors=True)


def digest(path: Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_complete(
    pseudo_dir: str | os.PathLike, ids: Iterable[str] | None = None, verify: bool = True
) -> dict[str, Any] | None:
    """Check that a pseudo-label folder is a complete calibrate output; return its report.

    Args:
        pseudo_dir: the folder (``out_dir`` of ``python -m calibrate run``).
        ids: image ids that must have a PNG recorded in the report (None: no check).
        verify: also compare every recorded PNG's sha256 with the file on disk (reads all
            PNGs; off, only the report and the marker are checked).
    Returns:
        The content of ``calibration.json``; None for a folder that calibrate did not write
        (no report and no marker: PNGs from another tool, which the caller checks itself).
    Raises:
        UserError: a run is writing the folder or was stopped before it finished, the report
            is unreadable, an id has no recorded PNG, or a PNG differs from its record.
    """
    d = Path(pseudo_dir)
    if (d / MARKER).is_file():
        raise UserError(
            f"{d / MARKER}: the pseudo-labels are incomplete (a calibrate run is writing "
            "them or was stopped before it finished); expected a finished run: run "
            "python -m calibrate run again with the settings you want"
        )
    path = d / REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the calibration report ({exc})") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: expected a JSON object (the calibration report)")
    recorded = report.get("pngs")
    if recorded is None:  # written before PNG digests were recorded (schema 1)
        return report
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: field 'pngs' must map image ids to sha256 digests")
    if ids is not None:
        missing = [i for i in ids if i not in recorded]
        if missing:
            raise UserError(
                f"{path}: this run has no pseudo-label for {len(missing)} of the unlabeled "
                f"images (first: {missing[0]!r}); expected a calibrate run on this manifest"
            )
    if verify:
        for image_id, want in recorded.items():
            png = id_path(d, image_id)
            if not png.is_file():
                raise UserError(
                    f"{png}: listed in {REPORT} but missing; expected the folder as "
                    "calibrate wrote it (run python -m calibrate run again)"
                )
            if digest(png) != want:
                raise UserError(
                    f"{png}: differs from the sha256 recorded in {REPORT}; expected the "
                    "folder as calibrate wrote it (run python -m calibrate run again)"
                )
    return report
