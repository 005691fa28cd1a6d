"""The annotate speed benchmark runs (CPU, CUDA with ``pytest -m gpu``) and measures another
git revision of the project on the same inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import annotate_speed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def test_voc_mode_measures_phases_and_is_deterministic():
    r = annotate_speed.measure(
        images=4, batch_size=2, repeats=2, model="conv1x1", size=(40, 30), classes=5
    )
    assert r["image_size"] == [30, 40] and r["classes"] == 5 and r["images"] == 4
    assert r["runs_identical"] and r["images_per_s"] > 0 and r["cpu_ms_per_image"] > 0
    assert set(r["phases_s"]) == {
        "decode", "h2d", "forward", "post", "d2h", "encode", "write", "wall"
    }  # fmt: skip
    assert r["phases_s"]["post"] > 0 and r["ratio"] > 0


@pytest.mark.slow
def test_baseline_revision_runs_in_its_own_tree(tmp_path):
    clean = not subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()
    s = annotate_speed.Setup(
        model="conv1x1", size=(40, 30), classes=5, images=4, batch_size=2, repeats=1
    )
    r = annotate_speed.compare(s, "HEAD", rounds=1, profile=False)
    assert (
        r["baseline_commit"]
        == subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    base, cur = r["baseline"]["runs"][0], r["current_code"]["runs"][0]
    assert Path(cur["code"]) == ROOT and Path(base["code"]) != ROOT
    assert r["speedup"] > 0 and r["cpu_time_ratio"] > 0
    if clean:  # the same code in two trees writes the same bytes
        assert r["cache_identical_to_baseline"]
    with pytest.raises(SystemExit, match="--baseline no-such-rev: not a revision"):
        annotate_speed.export_revision("no-such-rev", tmp_path / "x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_voc_mode_on_cuda():
    r = annotate_speed.measure(images=16, repeats=1, device="cuda", model="conv1x1")
    assert r["device"].startswith("cuda") and r["runs_identical"]
    assert r["phases_s"]["d2h"] > 0 and r["phases_s"]["forward"] > 0
