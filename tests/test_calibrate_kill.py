"""A re-run with new settings, stopped at any moment, never leaves a folder that looks complete:
the folder is the old complete run, the new complete run, or refused by check_complete (and so
by the trainer). Killed runs are recovered by running again."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _calibrate_fixtures import make_dataset
from typer.testing import CliRunner

from calibrate import folder
from calibrate.cli import app
from data_manifest.errors import UserError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("kill") / "ds", n_unlabeled=12, topk=2)


def args(ds: tuple[Path, Path], out: Path, alpha: str) -> list[str]:
    return [
        "run",
        "--manifest",
        str(ds[0]),
        "--cache",
        str(ds[1]),
        "--out-dir",
        str(out),
        "--alpha",
        alpha,
        "--quiet",
        "--no-plots",
    ]


def state(out: Path) -> dict[str, bytes]:
    """Every file a trainer or user reads (not run.json, the log of the last run, nor
    config.toml, which names the folder, nor the lock file a killed run leaves behind)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("run.json", "config.toml", ".conformalsam.lock")
    }


def verdict(out: Path, old: dict, new: dict) -> str:
    """ "old", "new" or "refused"; fails on anything else."""
    try:
        report = folder.check_complete(out)
    except UserError:
        return "refused"
    assert report is not None
    now = state(out)
    if now == old:
        return "old"
    assert now == new, sorted(set(now) ^ set(new)) or "bytes differ"
    return "new"


@pytest.fixture(scope="module")
def runs(ds: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The complete folders of the old settings (α = 0.05) and the new ones (α = 0.3)."""
    base = tmp_path_factory.mktemp("ref")
    for alpha in ("0.05", "0.3"):
        res = runner.invoke(app, args(ds, base / alpha, alpha))
        assert res.exit_code == 0, res.output
    old, new = state(base / "0.05"), state(base / "0.3")
    assert {k for k in old if k.endswith(".png")} == {k for k in new if k.endswith(".png")}
    assert sum(old[k] != new[k] for k in old if k.endswith(".png")) >= 6  # most PNGs change
    return old, new


def _restore(out: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


@pytest.mark.parametrize("stop_after", [0, 1, 5, 11, "clean", "report"])
def test_interrupted_commit(
    ds: tuple[Path, Path],
    runs: tuple[dict, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_after: int | str,
) -> None:
    """Stopped while the folder changes (after n PNGs moved into place, after the clean-up,
    while the report is written): refused; the next run completes it."""
    old, new = runs
    out = tmp_path / "out"
    _restore(out, old)
    assert verdict(out, old, new) == "old"

    class Stop(BaseException):
        pass

    moved = []
    real_replace = os.replace
    stage = str(folder.staging_dir(out))

    def replace(a: object, b: object) -> None:  # counts the moves from staging into place
        if str(a).startswith(stage + os.sep) and not str(b).startswith(stage + os.sep):
            if isinstance(stop_after, int) and len(moved) == stop_after:
                raise Stop
            moved.append(b)
        real_replace(a, b)

    def stop(*a: object, **k: object) -> None:
        raise Stop

    monkeypatch.setattr(folder.os, "replace", replace)
    if stop_after == "clean":
        monkeypatch.setattr("calibrate.job.clean", stop)
    if stop_after == "report":
        monkeypatch.setattr("calibrate.report.write_all", stop)
    with pytest.raises(Stop):
        runner.invoke(app, args(ds, out, "0.3"), catch_exceptions=False)
    monkeypatch.undo()
    assert verdict(out, old, new) == "refused"
    assert runner.invoke(app, args(ds, out, "0.3")).exit_code == 0
    assert verdict(out, old, new) == "new"


def test_refusal_before_commit_leaves_the_old_folder(
    ds: tuple[Path, Path], runs: tuple[dict, dict], tmp_path: Path
) -> None:
    """A run refused after computing every label (too many pixels left open by top-k) has
    touched nothing: the old folder is still complete, no staging folder is left."""
    old, new = runs
    out = tmp_path / "out"
    _restore(out, old)
    res = runner.invoke(
        app, [*args(ds, out, "0.3"), "--mode", "class", "--topk-undetermined-max", "0"]
    )
    if res.exit_code == 0:
        pytest.skip("no undetermined pixels in this class-mode run")
    assert "topk_undetermined_max" in res.output
    assert verdict(out, old, new) == "old"
    assert not folder.staging_dir(out).exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_random_moments(
    ds: tuple[Path, Path], runs: tuple[dict, dict], tmp_path: Path, seed: int
) -> None:
    old, new = runs
    out = tmp_path / "out"
    _restore(out, old)
    cmd = [sys.executable, "-m", "calibrate", *args(ds, out, "0.3")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    full = time.monotonic() - t0
    _restore(out, old)
    (out / "calibration.json").write_bytes(old["calibration.json"])
    assert verdict(out, old, new) == "old"
    delay = random.Random(seed).uniform(0.3 * full, 1.05 * full)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = verdict(out, old, new)
    assert seen in ("old", "new", "refused")
    # whatever was left, running again completes the new folder
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert verdict(out, old, new) == "new"
    report = json.loads((out / "run.json").read_text())
    assert report["removed_orphans"] == 0


def test_check_complete_on_other_folders(tmp_path: Path) -> None:
    """No report and no marker: PNGs from another tool (None, the caller checks them); a
    report written before digests were recorded: accepted as it is; a broken report: one line."""
    (tmp_path / "a.png").write_bytes(b"png")
    assert folder.check_complete(tmp_path) is None
    (tmp_path / "calibration.json").write_text(json.dumps({"schema": 1, "alpha": 0.1}))
    assert folder.check_complete(tmp_path, ids=["a"]) == {"schema": 1, "alpha": 0.1}
    (tmp_path / "calibration.json").write_text("{")
    with pytest.raises(UserError, match="cannot read the calibration report"):
        folder.check_complete(tmp_path)
    (tmp_path / "calibration.json").write_text(json.dumps({"pngs": {"../x": "0"}}))
    with pytest.raises(UserError):
        folder.check_complete(tmp_path)
