"""SEEM's requirements filtered for installing next to this project
(``python -m annotate seem-requirements``)."""

from __future__ import annotations

import importlib.metadata as md
import sys
import sysconfig

import pytest
from typer.testing import CliRunner

from annotate.cli import app
from annotate.seem_install import (
    DETECTRON2_FORK,
    EXTRA,
    PATH_FILE,
    check_torchvision,
    constraints,
    filter_requirements,
)
from data_manifest.errors import UserError

# The kinds of lines SEEM's two requirement files have (v1.0): exact pins of packages this
# project provides, of packages only SEEM's training or demo imports, of packages its
# inference code needs, GitHub installs; plus comments, extras, markers and a duplicate.
LINES = [
    "# SEEM",
    "torch==2.1.0",
    "torchvision==0.16.0",
    "numpy==1.23.1",
    "transformers==4.34.0",
    "opencv-python==4.8.1.78",
    "Pillow==9.4.0",
    "timm==0.4.12",
    "fvcore==0.1.5.post20221221",
    "kornia==0.7.0",
    "mpi4py==3.1.5",
    "pycocotools==2.0.7  # masks",
    "gradio==3.42.0",
    "wandb==0.15.12",
    "json_tricks==3.17.3",
    "nltk[twitter]==3.8.1 ; python_version >= '3.8'",
    "einops==0.7.0",
    "",
    "git+https://github.com/arogozhnikov/einops.git",
    f"git+https://github.com/{DETECTRON2_FORK}.git",
    "git+https://github.com/openai/whisper.git",
    "git+https://github.com/someone/needed-thing.git@v2",
    "timm>=0.9",
]
KEPT = [
    "timm",
    "fvcore",
    "kornia",
    "mpi4py",
    "pycocotools",
    'nltk[twitter]; python_version >= "3.8"',
    "einops",
]


def test_filter_keeps_inference_needs_unpinned_and_sets_detectron2_apart():
    f = filter_requirements(LINES)
    assert f.keep == [*KEPT, "git+https://github.com/someone/needed-thing.git@v2", *EXTRA]
    assert "setuptools" in EXTRA and "scipy" in EXTRA and "mpich" in EXTRA
    assert f.build == [f"git+https://github.com/{DETECTRON2_FORK}.git"]
    dropped = dict(f.dropped)
    assert set(dropped) == {
        "torch==2.1.0",
        "torchvision==0.16.0",
        "numpy==1.23.1",
        "transformers==4.34.0",
        "opencv-python==4.8.1.78",
        "Pillow==9.4.0",
        "gradio==3.42.0",
        "wandb==0.15.12",
        "json_tricks==3.17.3",
        "git+https://github.com/arogozhnikov/einops.git",
        "git+https://github.com/openai/whisper.git",
    }
    assert dropped["numpy==1.23.1"] == "this project's (SEEM pins 1.23)"
    assert "opencv-python-headless" in dropped["opencv-python==4.8.1.78"]
    assert dropped["git+https://github.com/openai/whisper.git"] == "SEEM's demo (audio prompts)"


def test_filter_rejects_a_line_that_is_not_a_requirement():
    with pytest.raises(UserError, match=r"req.txt, line 2: 'torch ==== 2' is not a requirement"):
        filter_requirements(["numpy", "torch ==== 2"], "req.txt")


def test_constraints_pin_this_projects_installed_versions():
    pins = dict(line.split("==") for line in constraints())
    assert pins["torch"] == md.version("torch") and pins["numpy"] == md.version("numpy")
    assert pins["transformers"] == md.version("transformers")
    assert "zarr" in pins and "pytest" not in pins and "ruff" not in pins  # no dev tools


def test_command_writes_both_files_and_prints_the_commands(tmp_path, monkeypatch):
    monkeypatch.setattr("annotate.seem_install.check_torchvision", lambda: "0.28.0")
    seem = tmp_path / "seem"
    (seem / "assets" / "requirements").mkdir(parents=True)
    (seem / "assets" / "requirements" / "requirements.txt").write_text("\n".join(LINES[:17]))
    (seem / "assets" / "requirements" / "requirements_custom.txt").write_text(
        "\n".join(LINES[18:21])
    )
    out = tmp_path / "env"
    r = CliRunner().invoke(app, ["seem-requirements", str(seem), "--out", str(out)])
    assert r.exit_code == 0, r.output
    req = (out / "seem-requirements.txt").read_text().splitlines()
    assert [x for x in req if not x.startswith("#")] == [*KEPT, *EXTRA]
    assert "#   numpy==1.23.1: this project's (SEEM pins 1.23)" in req
    con = (out / "seem-constraints.txt").read_text().splitlines()
    assert f"numpy=={md.version('numpy')}" in con
    assert f"pip install -r {out / 'seem-requirements.txt'} -c {out / 'seem-constraints.txt'}" in (
        r.output
    )
    assert "(and SEEM's detectron2 fork: --detectron2)" in r.output
    assert not (out / PATH_FILE).exists()
    # with the fork's checkout: the path file, and the command that puts it in site-packages
    fork = tmp_path / "detectron2-xyz"
    (fork / "detectron2").mkdir(parents=True)
    (fork / "detectron2" / "__init__.py").write_text("")
    args = ["seem-requirements", str(seem), "--detectron2", str(fork), "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / PATH_FILE).read_text() == f"{fork.resolve()}\n"
    assert f"cp {out / PATH_FILE} {sysconfig.get_path('purelib')}" in r.output
    r = CliRunner().invoke(app, [*args[:3], str(tmp_path), "--out", str(out)])
    assert r.exit_code == 1
    assert f"{tmp_path}: detectron2/__init__.py not found; expected a checkout of" in r.output
    r = CliRunner().invoke(app, ["seem-requirements", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert "assets/requirements/requirements.txt not found; expected a checkout" in r.output


def test_torchvision_must_be_installed_and_import(tmp_path, monkeypatch):
    """Without a torchvision that imports beside the installed torch, pip would take PyPI's
    build for timm (SEEM needs both); seem-requirements stops with one line instead."""
    monkeypatch.setattr(md, "version", _versions({"torch": "2.13.0+cpu"}))
    with pytest.raises(UserError) as exc:
        check_torchvision()
    assert str(exc.value) == (
        "torchvision is not installed; install the torchvision built for torch 2.13.0+cpu, "
        "from the index torch came from: step 0 of the SEEM recipe in docs/annotate.md (torch "
        "and the torchvision built for it, from one index)"
    )
    # installed, but built for another torch: it fails at import, as PyPI's build does here
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(md, "version", _versions({"torch": "2.13.0+cpu", "torchvision": "0.28.0"}))
    with pytest.raises(UserError) as exc:
        check_torchvision()
    assert str(exc.value) == (
        "torchvision 0.28.0 does not work with torch 2.13.0+cpu (operator torchvision::nms does "
        "not exist); install the torchvision built for that torch, from the index torch came "
        "from: step 0 of the SEEM recipe in docs/annotate.md (torch and the torchvision built "
        "for it, from one index)"
    )
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)


def _versions(known: dict[str, str]):
    def version(name: str) -> str:
        if name not in known:
            raise md.PackageNotFoundError(name)
        return known[name]

    return version
