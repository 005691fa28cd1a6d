"""The ``upstream`` tier: the SEEM recipe of docs/annotate.md executed in a fresh virtual
environment, then ``python -m annotate run --annotator seem`` against SEEM's real code.

``../shared/upstream`` (beside the project root) holds unmodified snapshots of SEEM v1.0 and its
detectron2 fork; without it every test here is skipped with one line. The recipe's bash block is
run line by line as written, except the lines that fetch from the network, each swapped for a
local source (:data:`SWAPS`): the two ``git clone`` lines copy the snapshots, the torch line
takes the matching torch + torchvision pair this machine has, and the checkpoint and tokenizer
downloads are left to the tests (random weights saved as a checkpoint by SEEM's own code, a
tiny CLIP tokenizer). The environment is kept in ``.upstream-cache/<key>/`` (ignored by git;
``CONFORMALSAM_UPSTREAM_CACHE`` moves it), keyed by the recipe's text and the files it runs, so
that a second run reuses it (only the latest is kept); the project's code under test always
comes from this checkout.

SEEM is CUDA-only: its processes run with CUDA simulated on the CPU (``tests/_cuda_sim.py``,
loaded by ``tests/upstream/sitecustomize.py``). ``CONFORMALSAM_SEEM_DEVICE=cuda`` runs them on a
real GPU instead, and ``CONFORMALSAM_SEEM_PYTHON`` names an interpreter where SEEM's
requirements are already installed (the recipe is then not run): ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _annotate_fixtures import make_dataset, write_clip_tokenizer, write_config

from annotate import open_cache

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream"
SITE = Path(__file__).resolve().parent / "upstream"  # sitecustomize.py, seem_reference.py
DOCS = REPO / "docs" / "annotate.md"
MARK = "<!-- seem-recipe"
CONFIG_T = "configs/seem/focalt_unicl_lang_v1.yaml"  # Focal-T v1: the smallest v1 model
CONFIG_L = "configs/seem/focall_unicl_lang_v1.yaml"
CLASSES = ["background", "person", "wall"]
# prompts as a user may copy them from SEEM's COCO class names: SEEM removes "-other-merged"
PROMPTS = {"wall": ["wall-other-merged"]}
SIZES = [(375, 500), (375, 500), (500, 333)]  # VOC-like, both orientations, batch of 2 + 1
SHORT_SIDE = 512  # SEEM's own (inference/xdecoder/infer_semseg.py)
WORDS = ("person", "wall", "photo", "background", "the", "of")
DEVICE = os.environ.get("CONFORMALSAM_SEEM_DEVICE", "")  # "cuda": a real GPU
# torch + torchvision built together, from this machine's package index (docs: step 0)
LOCAL_TORCH = os.environ.get(
    "CONFORMALSAM_TORCH_SPEC",
    "torch==2.9.1 torchvision==0.24.1"
    if platform.machine() == "aarch64"
    else "torch==2.14.1 torchvision==0.29.1",
)
# recipe lines that reach the network (by their start) -> the local command run instead
SWAPS = {
    "TORCH_SPEC=": f'TORCH_SPEC="{LOCAL_TORCH}"',
    "git clone --branch v1.0 https://github.com/UX-Decoder/": (
        f"cp -r {UPSTREAM / 'seem'} ../seem && chmod -R u+w ../seem"
    ),
    "git clone https://github.com/MaureenZOU/detectron2-xyz ": (
        f"cp -r {UPSTREAM / 'detectron2-xyz'} ../detectron2-xyz && chmod -R u+w ../detectron2-xyz"
    ),
    "wget -P checkpoints ": ": the tests save random weights as the checkpoint",
    '.venv/bin/python -c "from huggingface_hub': ": the tests write a tiny tokenizer",
}

pytestmark = [
    pytest.mark.upstream,
    pytest.mark.skipif(
        not (UPSTREAM / "seem").is_dir() or not (UPSTREAM / "detectron2-xyz").is_dir(),
        reason=f"no SEEM snapshot in {UPSTREAM} (the upstream tier needs ../shared/upstream)",
    ),
]


def recipe_lines(text: str) -> list[str]:
    """The commands of the SEEM recipe: the first ```bash block after the marker."""
    if MARK not in text:
        raise AssertionError(f"{DOCS}: no {MARK!r} marker before the SEEM recipe")
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def local_recipe(lines: list[str]) -> list[str]:
    """The recipe with each line of :data:`SWAPS` replaced; every swap must match exactly one
    line, and no other line may reach the network."""
    out = list(lines)
    for start, local in SWAPS.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(start)]
        assert len(hits) == 1, f"recipe lines starting with {start!r}: {len(hits)}, expected 1"
        out[hits[0]] = local
    for line in out:
        code = line.split("#", 1)[0]
        assert not re.search(r"https?://", code), f"recipe line reaches the network: {line}"
    return out


def _environment_key(script: str) -> str:
    h = hashlib.sha256(script.encode())
    for rel in ("pyproject.toml", "Makefile", "annotate/seem_install.py", "annotate/cli.py"):
        h.update(rel.encode() + b"\0" + (REPO / rel).read_bytes())
    return h.hexdigest()[:16]


def _copy_project(dest: Path) -> None:
    """The files of this checkout that git tracks or would track, as they are now."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


def _clean_env() -> dict[str, str]:
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="session")
def recipe() -> dict:
    """The environment the recipe builds: {"python", "home" (where ../seem etc. are),
    "log"}. Built once per recipe text and kept (see the module docstring)."""
    if os.environ.get("CONFORMALSAM_SEEM_PYTHON"):
        return {"python": os.environ["CONFORMALSAM_SEEM_PYTHON"], "home": None, "log": ""}
    script = "\n".join(["set -euxo pipefail", *local_recipe(recipe_lines(DOCS.read_text()))])
    cache = Path(os.environ.get("CONFORMALSAM_UPSTREAM_CACHE", REPO / ".upstream-cache"))
    home = cache / _environment_key(script)
    log = home / "recipe.log"
    if not (home / "done").is_file():
        for old in cache.glob("*"):  # only the latest environment is kept (each ~6 GB)
            shutil.rmtree(old, ignore_errors=True)
        (home / "project").mkdir(parents=True)
        _copy_project(home / "project")
        (home / "recipe.sh").write_text(script + "\n")
        with open(log, "w") as f:
            r = subprocess.run(
                ["bash", str(home / "recipe.sh")],
                cwd=home / "project",
                env=_clean_env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=1800,
            )
        if r.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            pytest.fail(f"the SEEM recipe failed (exit {r.returncode}); {log}:\n" + "\n".join(tail))
        (home / "done").write_text("")
    return {
        "python": str(home / "project" / ".venv" / "bin" / "python"),
        "home": home,
        "log": log.read_text(errors="replace"),
    }


def _seem_root(recipe: dict) -> Path:
    return recipe["home"] / "seem" if recipe["home"] else UPSTREAM / "seem"


def _run(recipe: dict, args: list[str], cwd: Path, timeout: int = 900, **env: str):
    """A Python process in the recipe's environment, with tests/upstream (its sitecustomize:
    simulated CUDA unless CONFORMALSAM_SEEM_DEVICE=cuda) and this checkout's code first on the
    path."""
    paths = [str(SITE), str(REPO)]
    if not recipe["home"]:  # the caller's environment: its own path, the fork's snapshot
        paths += [str(UPSTREAM / "detectron2-xyz"), os.environ.get("PYTHONPATH", "")]
    full = {**_clean_env(), "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", **env}
    if DEVICE != "cuda":
        full["CONFORMALSAM_FAKE_CUDA"] = "1"
    return subprocess.run(
        [recipe["python"], *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def seem_run(recipe, tmp_path_factory) -> dict:
    """SEEM's own forward (reference + the random-weight checkpoint), then ``python -m annotate
    run --annotator seem`` on the same images with that checkpoint."""
    tmp = tmp_path_factory.mktemp("seem_upstream")
    root = _seem_root(recipe)
    tok = write_clip_tokenizer(tmp / "clip", WORDS)
    man = make_dataset(tmp / "ds", 2, 1, 0, sizes=SIZES, classes=CLASSES)
    from PIL import Image
    from skimage import data as photos

    crops = [photos.astronaut(), photos.astronaut(), np.rot90(photos.coffee())]  # 600 x 400
    images = tmp / "images"
    images.mkdir()
    for (h, w), photo, name in zip(SIZES, crops, ("l00", "l01", "u00"), strict=True):
        rgb = Image.fromarray(np.ascontiguousarray(photo[:h, :w]))
        rgb.save(tmp / "ds" / "images" / f"{name}.png")  # real photos at non-square sizes
        rgb.save(images / f"{name}.png")
    ckpt, ref = tmp / "seem_focalt_random.pt", tmp / "reference.npz"
    prompts = ",".join(PROMPTS.get(c, [c])[0] for c in CLASSES[1:])
    r = _run(
        recipe,
        [str(SITE / "seem_reference.py"), str(root), str(root / CONFIG_T), str(tok), str(ckpt)]
        + [str(images), str(ref), "--prompts", prompts, "--short-side", str(SHORT_SIDE)],
        tmp,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    conf = write_config(
        tmp / "run.toml",
        tmp / "run",
        man,
        seem_root=str(root),
        seem_config=str(root / CONFIG_T),
        model=str(ckpt),
        seem_tokenizer=str(tok),
        device="cuda",
        amp=False,
        batch_size=2,
        topk=0,
        input_short_side=SHORT_SIDE,
    )
    with open(conf, "a") as f:
        f.write("[annotate.prompts]\n")
        f.writelines(f"{c} = {json.dumps(words)}\n" for c, words in PROMPTS.items())
    said = tmp / "tokenized.jsonl"
    run = _run(
        recipe,
        ["-m", "annotate", "run", "--config", str(conf), "--annotator", "seem", "--no-progress"],
        tmp,
        CONFORMALSAM_TOKENIZED=str(said),
    )
    return {
        "tmp": tmp,
        "run": run,
        "cache": tmp / "run" / "cache.zarr",
        "reference": dict(np.load(ref)),
        "tokenized": [json.loads(x) for x in said.read_text().splitlines()]
        if said.is_file()
        else [],
        "config": conf,
        "checkpoint": ckpt,
        "tokenizer": tok,
        "root": root,
    }


def test_recipe_gives_an_importable_seem_next_to_the_pinned_versions(recipe):
    if not recipe["home"]:
        pytest.skip("CONFORMALSAM_SEEM_PYTHON: the recipe was not run")
    env = recipe["home"] / "project" / "checkpoints" / "seem-env"
    pins = dict(line.split("==", 1) for line in (env / "seem-constraints.txt").read_text().split())
    names = ["torch", "torchvision", "numpy", "pillow", "transformers", "zarr", "dask"]
    r = _run(
        recipe,
        [
            "-c",
            f"import importlib.metadata as m, json; print(json.dumps({{n: m.version(n) "
            f"for n in {names!r}}}))",
        ],
        REPO,
    )
    installed = json.loads(r.stdout)
    assert {n: installed[n] for n in names} == {n: pins[n] for n in names}
    assert installed["torchvision"].split("+")[0] == LOCAL_TORCH.split("==")[-1]
    major = int(installed["pillow"].split(".")[0])
    assert major >= 10  # the fork's Image.LINEAR is gone there: the adapter's alias is needed
    log = recipe["log"]
    assert "No broken requirements found." in log  # pip check
    # seem-check (the recipe's last step) imported SEEM and its fork without compiled operators
    assert "without its compiled operators" in log and "SEEM imports" in log


def test_annotate_run_equals_seem_own_forward(seem_run):
    """The cache against SEEM's own ``evaluate`` (+ its no-object column) at non-square sizes.

    Tolerance: the cache stores float16, whose rounding is at most 2^-11 of the value; on the
    CPU the float32 computations of the adapter and of SEEM's ``evaluate`` differ by far less
    (the same operations, batched differently). On a GPU, convolutions may run in TF32 with
    kernels chosen per batch shape: 2e-3 of the value there.
    """
    run = seem_run["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cache = open_cache(seem_run["cache"])
    assert list(cache.classes) == CLASSES
    assert cache.meta.annotator == "seem"
    worst = 0.0
    for name, want in seem_run["reference"].items():
        got = cache.scores(name)
        # reference: [person, wall-other-merged, no object]; cache: [background, person, wall]
        want = np.stack([want[-1], *want[:-1]])
        assert got.shape == want.shape == (3, *SIZES[["l00", "l01", "u00"].index(name)])
        err = np.abs(got - want)
        rtol = 2e-3 if DEVICE == "cuda" else 2.0**-11
        assert (err <= rtol * np.abs(want) + 1e-5).all(), (name, float(err.max()))
        worst = max(worst, float((err / (np.abs(want) + 1e-3)).max()))
    print(f"largest relative difference to SEEM's own forward: {worst:.2e}")


def test_cache_records_the_prompts_seem_embedded(seem_run):
    """SEEM strips -other/-merged/-stuff before its templates: the cache says what it embedded
    (the texts SEEM's text encoder passed to its tokenizer, recorded in that process)."""
    assert seem_run["run"].returncode == 0, seem_run["run"].stderr[-3000:]
    model = open_cache(seem_run["cache"]).meta.extra["model"]
    assert model["prompts"] == ["person", "wall"]  # "wall-other-merged" as SEEM embeds it
    assert model.get("no_object_prompt") == "background"
    texts = [*model["prompts"], model["no_object_prompt"]]
    embedded = [[t.format(p) for t in model["prompt_templates"]] for p in texts]
    assert seem_run["tokenized"] == embedded


def _annotate_error(seem_run, recipe, tmp: Path, extra_env: dict | None = None, **keys) -> str:
    conf = Path(seem_run["config"]).read_text()
    for key, value in keys.items():
        conf = re.sub(rf"^{key} = .*$", f"{key} = {json.dumps(str(value))}", conf, flags=re.M)
    conf = re.sub(r"^run_dir = .*$", f"run_dir = {json.dumps(str(tmp / 'run'))}", conf, flags=re.M)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "run.toml").write_text(conf)
    r = _run(
        recipe,
        ["-m", "annotate", "run", "--config", str(tmp / "run.toml"), "--annotator", "seem"]
        + ["--no-progress"],
        tmp,
        **(extra_env or {}),
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert not (tmp / "run" / "cache.zarr").exists()
    return lines[0]


def test_bad_seem_installs_are_one_line_each(seem_run, recipe, tmp_path):
    # a SEEM checkout without the fork: detectron2 cannot be imported
    line = _annotate_error(seem_run, recipe, tmp_path / "a", {"CONFORMALSAM_HIDE": "detectron2"})
    assert line == (
        "error: SEEM's code imports detectron2, which is not installed: SEEM needs its fork; "
        "redo step 3 of the SEEM recipe in docs/annotate.md (its detectron2 fork, "
        "MaureenZOU/detectron2-xyz)"
    )
    # a fork that raises while SEEM imports it (first on the path: a copy with a bad name)
    fork = tmp_path / "fork"
    shutil.copytree(UPSTREAM / "detectron2-xyz" / "detectron2", fork / "detectron2")
    bad = fork / "detectron2" / "data" / "transforms" / "transform.py"
    bad.chmod(0o644)
    bad.write_text(bad.read_text().replace("interp=Image.LINEAR", "interp=Image.LINEAR_GONE"))
    line = _annotate_error(
        seem_run,
        recipe,
        tmp_path / "b",
        {"PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), str(fork)])},
    )
    assert line.startswith(
        "error: SEEM's detectron2 fork raised AttributeError: module 'PIL.Image' has no "
        f"attribute 'LINEAR_GONE' ({bad}:"
    ), line
    assert line.endswith(
        "redo step 3 of the SEEM recipe in docs/annotate.md (its detectron2 "
        "fork, MaureenZOU/detectron2-xyz)"
    ), line


def test_bad_checkpoint_and_tokenizer_are_one_line_each(seem_run, recipe, tmp_path):
    root = seem_run["root"]
    # Focal-T's checkpoint given with Focal-L's config
    line = _annotate_error(seem_run, recipe, tmp_path / "a", seem_config=root / CONFIG_L)
    ckpt = seem_run["checkpoint"]
    assert line.startswith(f"error: {ckpt}: not a checkpoint of focall_unicl_lang_v1.yaml: "), line
    assert "tensors of another shape (e.g. backbone." in line, line
    assert line.endswith("expected a checkpoint made with this config and tokenizer"), line
    # a tokenizer folder without its vocabulary files
    tok = tmp_path / "no_vocab"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    line = _annotate_error(seem_run, recipe, tmp_path / "b", seem_tokenizer=tok)
    assert line == (
        f"error: {tmp_path / 'b' / 'run.toml'}: [annotate] seem_tokenizer = {str(tok)!r}: no "
        "tokenizer files; expected the CLIP tokenizer's tokenizer.json, or vocab.json and "
        "merges.txt (docs/annotate.md)"
    )
