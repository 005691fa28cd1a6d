"""A Dask cluster whose worker runs in another working directory: every path reaches it
resolved, so relative paths on the command line mean what they mean to the user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _calibrate_fixtures import make_dataset
from typer.testing import CliRunner

from calibrate.cli import app

BIN = Path(sys.executable).parent


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and one ``dask worker`` as subprocesses, the worker's working
    directory a folder of its own; yields the scheduler address."""
    dask = shutil.which("dask", path=str(BIN)) or "dask"
    info = tmp_path / "scheduler.json"
    worker_cwd = tmp_path / "worker_cwd"
    worker_cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    sched = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(info)],
        cwd=tmp_path,
        **quiet,
    )
    procs = [sched]
    try:
        deadline = time.monotonic() + 60
        while not info.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        procs.append(
            subprocess.Popen(
                [dask, "worker", address, "--nworkers", "1", "--nthreads", "1"]
                + ["--no-dashboard", "--local-directory", str(tmp_path / "scratch")],
                cwd=worker_cwd,
                **quiet,
            )
        )
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_relative_paths_with_a_worker_elsewhere(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "user"
    make_dataset(here / "ds", topk=2)
    monkeypatch.chdir(here)
    res = CliRunner().invoke(
        app,
        ["run", "--manifest", "ds/manifest.jsonl", "--cache", "ds/cache.zarr"]
        + ["--out-dir", "out/cp", "--scheduler", cluster, "--no-plots", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    out = here / "out" / "cp"
    report = json.loads((out / "calibration.json").read_text())
    assert sorted(report["pngs"]) == sorted(
        p.relative_to(out).as_posix()[:-4] for p in out.rglob("*.png")
    )
    assert len(report["pngs"]) == 5
    # nothing landed in the worker's working directory
    assert not any((tmp_path / "worker_cwd").rglob("*.png"))
    assert Path(report["cache"]["path"]).is_absolute()
    assert Path(report["manifest"]["path"]).is_absolute()


def _one(batch: list[int]) -> dict:
    return {"n": len(batch), "ids": list(batch)}


@pytest.mark.slow
def test_results_are_released_as_they_complete() -> None:
    """With 120 batches the client never holds more than a few finished results: each is
    merged (on a worker) and dropped as soon as a group of them is complete."""
    import logging

    from distributed import LocalCluster

    from calibrate import runner as R

    held = []
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cl:
        with R.Runner(cl.scheduler_address, show_progress=False) as run:
            client = run.client

            def advance(i: int) -> None:
                held.append(sum(f.status == "finished" for f in client.futures.values()))

            batches = [[i] for i in range(120)]
            out = run._distributed(_one, batches, advance, {})
    assert out["n"] == 120 and sorted(out["ids"]) == list(range(120))
    assert max(held) <= 3 * R._FAN_IN, max(held)
