"""A pseudo-label folder: when it is complete, and how a run keeps it honest after a kill.

Protocol of ``python -m calibrate run`` on its output folder ``out``:

0. compute every PNG; those whose bytes differ from the file in ``out`` are written to the
   staging folder ``.<out name>.staging`` beside it (``out`` is not touched, so a refusal or a
   kill here leaves the previous folder as it was);
1. create the marker ``calibration.incomplete`` in ``out`` (atomically), listing the ids whose
   PNGs this run puts there;
2. remove stale temporaries of killed runs and PNGs of ids that are no longer unlabeled (only
   PNGs a calibrate run wrote: those listed in the previous ``calibration.json`` or in a
   marker left by a killed run; any other file in the folder is left alone);
3. move the staged PNGs into place (one rename each), write ``config.toml``, ``run.json``,
   ``kept_fraction.json`` and the plots;
4. write ``calibration.json``, which records the sha256 of every PNG;
5. remove the marker.

So a folder is complete exactly when ``calibration.json`` is there and the marker is not; a run
killed at any moment leaves either the previous complete folder (killed before step 1) or a
marked one, which :func:`check_complete` (and so the trainer) refuses until a run finishes.
Re-running with the same inputs stages nothing and rewrites no PNG.

Ownership and locks (:mod:`data_manifest.ownership`): a run writes only into a folder that is
new, empty or marked as calibrate's (a folder written before the mark is recognised by its
report or marker), and holds the folder's lock from its first check to its last write.

Readers: :func:`check_pseudo_folder` is the one check every reader of a pseudo-label folder
applies (the trainer, ``calibrate evaluate``): finished, made from the reader's manifest, and
unchanged since.

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
from data_manifest.io import atomic_write_json
from data_manifest.manifest import Manifest, id_path
from data_manifest.ownership import check_claim, claim

REPORT = "calibration.json"
MARKER = "calibration.incomplete"
OWNER = "calibrate run"
_MARKER_NOTE = (
    "A python -m calibrate run started writing this folder and has not finished: the PNGs may "
    "mix two runs. Run it again to complete the folder; trainers refuse it until then."
)


def mark_incomplete(out_dir: Path, ids: Iterable[str], option: str = "out_dir") -> None:
    """Step 1: mark the folder as calibrate's and incomplete (readers refuse it from now until
    :func:`mark_complete`); the marker lists ``ids``, the images whose PNGs this run writes."""
    claim(out_dir, OWNER, option, legacy=is_ours)
    atomic_write_json(out_dir / MARKER, {"note": _MARKER_NOTE, "pngs": sorted(ids)})


def mark_complete(out_dir: Path) -> None:
    """Step 5 (after ``calibration.json`` is written)."""
    (out_dir / MARKER).unlink(missing_ok=True)


def is_ours(out_dir: Path) -> bool:
    """True when calibrate wrote this folder before (report or marker present)."""
    return (out_dir / REPORT).is_file() or (out_dir / MARKER).is_file()


def check_writable(out_dir: Path, option: str = "out_dir") -> None:
    """Refuse a folder calibrate may not write into: a file, a folder marked by another
    command, or a non-empty one that calibrate did not write (its files would be mixed with
    the PNGs). ``option`` names where the path came from, for the message.

    Raises:
        UserError: one line naming the folder and what it holds.
    """
    check_claim(out_dir, OWNER, option, legacy=is_ours)


def written_ids(out_dir: Path) -> set[str]:
    """Ids whose PNG a calibrate run wrote into ``out_dir``: those recorded in its report and
    those listed in the marker of a run that did not finish."""
    ids: set[str] = set()
    for name, key in ((REPORT, "pngs"), (MARKER, "pngs")):
        try:
            listed = json.loads((out_dir / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(listed, dict | list):
            ids.update(i for i in listed if isinstance(i, str))
    return ids


def _ours_temporary(name: str) -> bool:
    """A temporary of an atomic write of a file calibrate writes (PNG, JSON, TOML, HTML):
    ``.<file>.<random>[.<suffix>].tmp`` (see :func:`data_manifest.io.atomic_path`)."""
    return (
        name.startswith(".")
        and name.endswith(".tmp")
        and any(f"{ext}." in name for ext in (".png", ".json", ".toml", ".html"))
    )


def clean(out_dir: Path, keep_ids: Iterable[str], previous: set[str]) -> tuple[int, int]:
    """Step 2: remove temporaries of killed writers (``.<name>.<random>.tmp`` in ``out_dir``
    and ``plots/``) and the PNGs of ``previous`` ids (:func:`written_ids`, read before step 1)
    that are not in ``keep_ids``. Other files are never touched. Call only on a folder
    calibrate owns, under its lock.

    Returns:
        (temporaries removed, orphan PNGs removed).
    """
    keep = set(keep_ids)
    tmp = orphans = 0
    for folder in (out_dir, out_dir / "plots"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and _ours_temporary(path.name):
                path.unlink(missing_ok=True)
                tmp += 1
    for image_id in sorted(previous - keep):
        try:
            png = id_path(out_dir, image_id)
        except UserError:  # a hand-edited report: an id that is no file name of ours
            continue
        if png.is_file():
            png.unlink()
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


def refuse_incomplete(pseudo_dir: str | os.PathLike) -> None:
    """Refuse a folder a calibrate run is writing or was stopped in (its marker is there)."""
    d = Path(pseudo_dir)
    if (d / MARKER).is_file():
        raise UserError(
            f"{d / MARKER}: the pseudo-labels are incomplete (a calibrate run is writing "
            "them or was stopped before it finished); expected a finished run: run "
            "python -m calibrate run again with the settings you want"
        )


def check_pseudo_folder(
    pseudo_dir: str | os.PathLike,
    manifest: Manifest,
    verify: bool = True,
    need_report: bool = False,
) -> dict[str, Any] | None:
    """The check every reader applies to a pseudo-label folder before using it.

    In order: no calibrate run is writing the folder or was stopped in it; its report comes
    from ``manifest`` (same fingerprint: another dataset, or another version of
    this one, is named as such); the report lists a PNG for every unlabeled image of
    ``manifest``; and (``verify``) every listed PNG has the recorded sha256.

    Args:
        need_report: refuse a folder without ``calibration.json`` (PNGs from another tool,
            which the trainer accepts after checking the PNGs themselves).
    Returns:
        The report, or None for a folder without one.
    Raises:
        UserError: the first check that fails, in one line.
    """
    d = Path(pseudo_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"{d}: is a file; expected a folder of pseudo-label PNGs")
    refuse_incomplete(d)
    report = _read_report(d)
    if report is None:
        if need_report:
            raise UserError(
                f"{d}: not a pseudo-label folder (no {REPORT}); expected an output folder "
                "of python -m calibrate run"
            )
        return None
    made_from = report.get("manifest")
    fp = made_from.get("fingerprint") if isinstance(made_from, dict) else None
    if isinstance(fp, str) and fp != manifest.fingerprint:
        path = made_from.get("path", "?")
        raise UserError(
            f"{d / REPORT}: the pseudo-labels were made from another manifest ({path}, "
            f"fingerprint {fp[:12]}); expected pseudo-labels made from {manifest.path} "
            f"(fingerprint {manifest.fingerprint[:12]}): run python -m calibrate run on it"
        )
    return _check_pngs(d, report, [r.id for r in manifest.split("unlabeled")], verify)


def state(pseudo_dir: str | os.PathLike) -> tuple[str | None, bool]:
    """(sha256 of the report or None, whether the folder is marked incomplete): a reader that
    takes this before and after reading the folder knows whether a calibrate run changed it
    meanwhile (readers take no lock: they write nothing into calibrate's folder)."""
    d = Path(pseudo_dir)
    report = d / REPORT
    return (digest(report) if report.is_file() else None), (d / MARKER).is_file()


def refuse_changed(
    pseudo_dir: str | os.PathLike, before: tuple[str | None, bool], use: str, again: str
) -> None:
    """Raise when :func:`state` of the folder differs from ``before``: ``use`` (``"the run in
    runs/x"``) read two sets of pseudo-labels; ``again`` says what to do (``"train again with
    --restart"``)."""
    if state(pseudo_dir) != before:
        raise UserError(
            f"{pseudo_dir}: a calibrate run changed the pseudo-labels while {use} read them; "
            f"expected them unchanged ({use} mixed two sets): {again} once the folder is "
            "complete"
        )


def nothing_kept(pseudo_dir: str | os.PathLike) -> bool:
    """True when the folder's report says its PNGs keep no pixel (all 255); False when they
    keep some, or when there is no readable report."""
    try:
        report = _read_report(Path(pseudo_dir))
    except UserError:
        return False
    unlabeled = (report or {}).get("unlabeled")
    return isinstance(unlabeled, dict) and unlabeled.get("kept_pixels") == 0


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
    refuse_incomplete(d)
    report = _read_report(d)
    if report is None:
        return None
    return _check_pngs(d, report, ids, verify)


def _read_report(d: Path) -> dict[str, Any] | None:
    """``d/calibration.json`` as a dict; None when there is none."""
    path = d / REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the calibration report ({exc})") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: expected a JSON object (the calibration report)")
    return report


def _check_pngs(
    d: Path, report: dict[str, Any], ids: Iterable[str] | None, verify: bool
) -> dict[str, Any]:
    """The report lists a PNG for every id of ``ids``; (``verify``) each listed PNG has the
    recorded sha256. Returns ``report``."""
    path = d / REPORT
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
