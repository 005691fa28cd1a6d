"""SEEM's requirements, filtered for installing SEEM next to this project.

SEEM's ``assets/requirements/requirements.txt`` pins torch 2.1, numpy 1.23 and transformers
4.34 (and 30 more packages, most for its training, demo and evaluation code);
``requirements_custom.txt`` adds its detectron2 fork, einops and whisper from GitHub.
Installing them as they are would replace this project's versions. :func:`filter_requirements`
keeps what SEEM's inference code needs (``modeling/``, ``utils/`` and detectron2), without
version pins, drops what this project provides and what only other parts of SEEM import,
and adds what the detectron2 fork imports. The fork itself is not built: SEEM's semantic
forward uses only its Python modules, so :func:`write_path_file` writes a path configuration
file (``detectron2-xyz.pth``) that puts the fork's checkout on the environment's path.
:func:`constraints` pins this project's installed packages (torchvision included, checked by
:func:`check_torchvision`) so that pip keeps them. ``python -m annotate seem-requirements
SEEM_ROOT --detectron2 FORK`` writes the files and prints the commands (docs/annotate.md).
"""

from __future__ import annotations

import importlib.metadata as md
import re
from dataclasses import dataclass, field
from pathlib import Path

from annotate.common import first_line
from data_manifest.errors import UserError

REQUIREMENT_FILES = (
    "assets/requirements/requirements.txt",
    "assets/requirements/requirements_custom.txt",
)
DETECTRON2_FORK = "MaureenZOU/detectron2-xyz"

# packages this project (or the user's own PyTorch install) provides: SEEM's pins are dropped
PROVIDED = {
    "torch": "this project's PyTorch (SEEM pins 2.1)",
    "torchvision": "install the torchvision built for your torch, from the same index",
    "numpy": "this project's (SEEM pins 1.23)",
    "transformers": "this project's [hf] extra (SEEM pins 4.34)",
    "pillow": "this project's",
    "opencv-python": "this project has opencv-python-headless; the two conflict",
    "scikit-image": "only SEEM's dataset code imports it",
}
# imported only by SEEM's training, demo, dataset or evaluation code, or by nothing
NOT_NEEDED = {
    "gradio": "SEEM's demo app",
    "openai-whisper": "SEEM's demo (audio prompts)",
    "whisper": "SEEM's demo (audio prompts)",
    "wandb": "SEEM's training logs",
    "deepspeed": "SEEM's training",
    "infinibatch": "SEEM's training data pipeline",
    "diffdist": "SEEM's distributed training",
    "accelerate": "not imported by SEEM",
    "mup": "not imported by SEEM",
    "vision-datasets": "not imported by SEEM",
    "pyarrow": "SEEM's dataset registration",
    "cityscapesscripts": "not imported by SEEM",
    "json-tricks": "not imported by SEEM",
    "scikit-learn": "not imported by SEEM",
    "pandas": "not imported by SEEM",
    "shapely": "not imported by SEEM",
    "cython": "a build tool; pycocotools ships wheels",
}
# needed, though not in SEEM's files
EXTRA = {
    "setuptools": "SEEM imports distutils (modeling/language/loss.py), gone from Python 3.12",
    "scipy": "modeling/modules/matcher.py imports it (SEEM's list has it only through "
    "scikit-learn and scikit-image)",
    "omegaconf": "modeling/utils/config.py imports it whenever a module is built",
    "mpich": "the MPI library the mpi4py wheel loads; SEEM's utils/distributed.py imports "
    "mpi4py (or use your system's MPI)",
    "iopath": "the detectron2 fork imports it (its setup.py lists it)",
    "tabulate": "the detectron2 fork imports it (its setup.py lists it)",
    "termcolor": "the detectron2 fork imports it (its setup.py lists it)",
}
PATH_FILE = "detectron2-xyz.pth"
RECIPE = "the SEEM recipe in docs/annotate.md"
# the recipe's steps, by what they install (errors name the one to redo)
STEP_TORCH = f"step 0 of {RECIPE} (torch and the torchvision built for it, from one index)"
STEP_CHECKOUT = f"step 1 of {RECIPE} (SEEM's checkout, v1.0)"
STEP_REQUIREMENTS = f"step 2 of {RECIPE} (python -m annotate seem-requirements, pip install)"
STEP_FORK = f"step 3 of {RECIPE} (its detectron2 fork, MaureenZOU/detectron2-xyz)"
# this project's packages whose installed versions the constraints file pins
PINNED_EXTRA = ("transformers", "tokenizers", "huggingface-hub", "safetensors", "torchvision")


def canonical(name: str) -> str:
    """PEP 503 normalised package name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Filtered:
    """The outcome of :func:`filter_requirements`.

    Attributes:
        keep: requirement lines for pip (names without version pins, extras/markers kept).
        dropped: (SEEM's line, why it is left out).
        build: packages to build from source against the installed torch.
        extra: (requirement, why) added to ``keep``.
    """

    keep: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)


def _git_name(line: str) -> str:
    """``git+https://github.com/owner/repo.git@ref`` -> "owner/repo"."""
    m = re.search(r"github\.com[/:]([^/]+/[^/@#]+?)(?:\.git)?(?:[@#].*)?$", line)
    return m.group(1) if m else line


def filter_requirements(lines: list[str], where: str = "requirements") -> Filtered:
    """Filter SEEM's requirement lines (both files' lines, in order).

    Raises:
        UserError: a line that is neither a requirement nor a git URL (one clear line).
    """
    from packaging.requirements import InvalidRequirement, Requirement

    out = Filtered()
    seen: set[str] = set()
    for n, raw in enumerate(lines, 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("git+", "http://", "https://")):
            repo = _git_name(line)
            name = canonical(repo.split("/")[-1])
            if repo.lower() == DETECTRON2_FORK.lower():
                out.build.append(line)
            elif name in seen or name == "einops":
                seen.add(name)
                out.dropped.append((line, "the PyPI release is used instead"))
            elif name in NOT_NEEDED:
                out.dropped.append((line, NOT_NEEDED[name]))
            else:
                out.keep.append(line)
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise UserError(
                f"{where}, line {n}: {raw.strip()!r} is not a requirement ({exc})"
            ) from None
        name = canonical(req.name)
        if name in PROVIDED or name in NOT_NEEDED:
            out.dropped.append((line, PROVIDED.get(name) or NOT_NEEDED[name]))
            continue
        if name in seen:
            continue
        seen.add(name)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        marker = f"; {req.marker}" if req.marker else ""
        out.keep.append(f"{req.name}{extras}{marker}")
    for name, why in EXTRA.items():
        if name not in seen:
            out.keep.append(name)
            out.extra.append((name, why))
    return out


def read_seem_requirements(seem_root: str | Path) -> list[str]:
    """The lines of SEEM's two requirement files under ``seem_root``.

    Raises:
        UserError: the folder or ``requirements.txt`` is missing.
    """
    root = Path(seem_root)
    main = root / REQUIREMENT_FILES[0]
    if not main.is_file():
        raise UserError(
            f"{root}: {REQUIREMENT_FILES[0]} not found; expected a checkout of SEEM's "
            "repository (v1.0)"
        )
    lines = main.read_text(encoding="utf-8").splitlines()
    custom = root / REQUIREMENT_FILES[1]
    if custom.is_file():
        lines += custom.read_text(encoding="utf-8").splitlines()
    return lines


def constraints() -> list[str]:
    """``name==version`` for this project's installed dependencies (and transformers and its
    companions, torchvision), so that installing SEEM's requirements changes none of them."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in md.requires("conformalsam") or []]
    names = [canonical(r.name) for r in reqs if "extra" not in str(r.marker or "")]
    out: dict[str, str] = {}
    for name in [*names, *PINNED_EXTRA]:
        try:
            out.setdefault(name, md.version(name))
        except md.PackageNotFoundError:
            continue
    return [f"{n}=={v}" for n, v in sorted(out.items())]


def render(filtered: Filtered, seem_root: str | Path) -> str:
    """The text of ``seem-requirements.txt``."""
    head = [
        "# SEEM's requirements for installing next to conformalsam, from",
        f"# {Path(seem_root) / REQUIREMENT_FILES[0]} (+ requirements_custom.txt):",
        "# version pins removed; left out:",
        *(f"#   {line}: {why}" for line, why in filtered.dropped),
        *(f"#   {line}: its checkout goes on the path (--detectron2)" for line in filtered.build),
        "# added:",
        *(f"#   {name}: {why}" for name, why in filtered.extra),
    ]
    return "\n".join([*head, *filtered.keep]) + "\n"


def check_fork(fork: str | Path) -> Path:
    """The resolved checkout of SEEM's detectron2 fork.

    Raises:
        UserError: the folder has no ``detectron2/__init__.py``.
    """
    root = Path(fork).resolve()
    if not (root / "detectron2" / "__init__.py").is_file():
        raise UserError(
            f"{fork}: detectron2/__init__.py not found; expected a checkout of "
            f"https://github.com/{DETECTRON2_FORK} (SEEM's detectron2 fork)"
        )
    return root


def write_path_file(fork: str | Path, out: Path) -> Path:
    """Write ``out/detectron2-xyz.pth``: one line, the fork's absolute path. Copied into an
    environment's site-packages, it makes the fork's ``detectron2`` importable there."""
    from data_manifest.io import atomic_write_text

    path = out / PATH_FILE
    atomic_write_text(path, f"{check_fork(fork)}\n")
    return path


def check_torchvision() -> str:
    """The installed torchvision's version, once it imports beside the installed torch.

    timm (which SEEM needs) requires torchvision: without one installed, pip would take PyPI's
    build, which matches only PyPI's torch of the same release.

    Raises:
        UserError: torchvision is not installed, or does not work with the installed torch.
    """
    torch_version = md.version("torch")
    try:
        version = md.version("torchvision")
    except md.PackageNotFoundError:
        raise UserError(
            f"torchvision is not installed; install the torchvision built for torch "
            f"{torch_version}, from the index torch came from: {STEP_TORCH}"
        ) from None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        raise UserError(
            f"torchvision {version} does not work with torch {torch_version} "
            f"({first_line(exc)}); install the torchvision built for that torch, from the index "
            f"torch came from: {STEP_TORCH}"
        ) from None
    return version
