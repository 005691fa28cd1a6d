"""Annotators: models that turn a batch of images into per-class score maps.

An annotator obeys a small protocol (:class:`Annotator`): it has class names, says how its
scores become probabilities, and maps a uint8 image batch to float scores at its own output
resolution. Backends are chosen by name from the plain dict :data:`BACKENDS`:

========  ===============================================================================
``demo``  the demo's annotator (this project's trainer, trained on the demo source domain)
``torch`` a TorchScript file, or a checkpoint written by this project's trainer
``hf``    a ``transformers`` semantic segmentation model from a local folder (``annotate.hf``)
``seem``  SEEM, built from its config file and checkpoint (``annotate.seem``)
========  ===============================================================================

Heavy libraries (torch, transformers, SEEM) are imported only when a backend is built.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from annotate.common import IMAGENET_MEAN, IMAGENET_STD, sha256_file
from annotate.config import DEMO_MODEL, AnnotateConfig
from data_manifest.errors import UserError

if TYPE_CHECKING:
    import torch

    from data_manifest.manifest import Manifest

TORCHSCRIPT_META = "annotator.json"


class Annotator(Protocol):
    """What the runner needs from a model.

    Attributes:
        name: backend name recorded in the cache ("torch", "hf", "seem", ...).
        classes: the annotator's own class names, one per output channel.
        normalization: how its scores become probabilities: "softmax" (logits), "sum"
            (non-negative scores divided by their per-pixel sum) or "probs".
        model_sha256: sha256 of the weights, so a cache never mixes two models.
        groups: optional default vocabulary (dataset class -> annotator classes), used by
            prompt-based annotators whose channels are prompt synonyms.
        extra: JSON-friendly details for the cache metadata.
    """

    name: str
    classes: tuple[str, ...]
    normalization: str
    model_sha256: str
    groups: dict[str, list[str]] | None
    extra: dict[str, Any]

    def to(self, device: torch.device) -> None:
        """Move the model to ``device``."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            images: uint8 (B, 3, H, W) RGB on the model's device, all of one size.
        Returns:
            float (B, len(classes), h, w) scores at the model's output resolution.
        """


class NetAnnotator:
    """A torch module that maps normalised float images (B, 3, H, W) to logits (B, K, h, w).

    Inputs are scaled as ``(x / 255 - mean) / std``. Outputs may be a tensor, or a dict or
    tuple whose first tensor (or key ``"out"``/``"logits"``) holds the scores.
    """

    def __init__(
        self,
        module: Any,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        normalization: str,
        model_sha256: str,
        name: str,
        extra: dict[str, Any] | None = None,
    ):
        import torch

        self.module = module.eval()
        self.classes = tuple(classes)
        self.normalization = normalization
        self.model_sha256 = model_sha256
        self.name = name
        self.groups = None
        self.extra = dict(extra or {}, mean=list(mean), std=list(std))
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def to(self, device: torch.device) -> None:
        self.module.to(device)
        self._mean, self._std = self._mean.to(device), self._std.to(device)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self._mean) / self._std
        out = self.module(x)
        if isinstance(out, dict):
            out = out.get("out", out.get("logits", next(iter(out.values()))))
        elif isinstance(out, list | tuple):
            out = out[0]
        if out.ndim != 4 or out.shape[1] != len(self.classes):
            raise UserError(
                f"annotator {self.name}: model output has shape {tuple(out.shape)}; "
                f"expected (B, {len(self.classes)}, h, w) for its "
                f"{len(self.classes)} classes"
            )
        return out


def is_torchscript(path: Path) -> bool:
    """True when ``path`` is a TorchScript archive (it holds compiled code and constants)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def load_torch(
    cfg: AnnotateConfig, manifest: Manifest, path: str | None = None, name: str = "torch"
) -> NetAnnotator:
    """The ``torch`` backend: a TorchScript file or a trainer checkpoint at ``cfg.model``.

    TorchScript files take their classes, mean, std and normalization from an embedded
    ``annotator.json`` extra file if present, else from ``[annotate] model_classes``, ``mean``,
    ``std``, ``normalization`` (defaults: the dataset's classes, ImageNet statistics, softmax).
    Trainer checkpoints are read through ``train.inference.load_checkpoint_model``.
    """
    import torch

    model_path = Path(path or cfg.model)
    if not str(path or cfg.model):
        raise UserError(
            "[annotate] model is not set; expected the path of a TorchScript file or "
            "a trainer checkpoint (.pt)"
        )
    if not model_path.is_file():
        what = "is a folder" if model_path.is_dir() else "file not found"
        raise UserError(
            f"[annotate] model = {str(model_path)!r}: {what}; expected a "
            "TorchScript file or a trainer checkpoint"
        )
    sha = sha256_file(model_path)
    if is_torchscript(model_path):
        files = {TORCHSCRIPT_META: ""}
        try:
            module = torch.jit.load(str(model_path), map_location="cpu", _extra_files=files)
        except Exception as exc:
            raise UserError(f"{model_path}: cannot load TorchScript model ({exc})") from None
        meta: dict[str, Any] = {}
        if files[TORCHSCRIPT_META]:
            try:
                meta = json.loads(files[TORCHSCRIPT_META])
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{model_path}: embedded {TORCHSCRIPT_META} is not valid JSON ({exc.msg})"
                ) from None
        classes = cfg.model_classes or tuple(meta.get("classes") or manifest.classes)
        return NetAnnotator(
            module,
            classes,
            cfg.mean or tuple(meta.get("mean") or IMAGENET_MEAN),
            cfg.std or tuple(meta.get("std") or IMAGENET_STD),
            cfg.normalization or meta.get("normalization") or "softmax",
            sha,
            name,
            {"format": "torchscript", "file": model_path.name},
        )
    try:
        from train.inference import load_checkpoint_model
    except ImportError as exc:
        raise UserError(
            f"{model_path}: is not TorchScript, and reading trainer checkpoints "
            f"needs the train package ({exc})"
        ) from None
    try:
        module, info = load_checkpoint_model(model_path, map_location="cpu")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{model_path}: cannot load trainer checkpoint ({exc})") from None
    return NetAnnotator(
        module,
        cfg.model_classes or tuple(info["classes"]),
        cfg.mean or tuple(info["mean"]),
        cfg.std or tuple(info["std"]),
        cfg.normalization or "softmax",
        sha,
        name,
        {"format": "checkpoint", "arch": str(info.get("arch", "")), "file": model_path.name},
    )


def load_demo(cfg: AnnotateConfig, manifest: Manifest) -> NetAnnotator:
    """The ``demo`` backend: the torch backend on the demo annotator checkpoint.

    When the default checkpoint (``data/demo/annotator/best.pt``) is absent it is trained first
    by running ``python -m train fit --config <demo_train_config>`` (a few minutes on a CPU);
    any other missing ``model`` is an error.
    """
    path = Path(cfg.model or DEMO_MODEL)
    if not path.is_file() and path != Path(DEMO_MODEL):
        # only the default checkpoint is trained on demand: the training config writes there
        what = "is a folder" if path.is_dir() else "file not found"
        raise UserError(
            f"[annotate] model = {str(path)!r}: {what}; expected a demo annotator "
            f"checkpoint (leave model unset to use, and train once, {DEMO_MODEL})"
        )
    if not path.is_file():
        train_cfg = Path(cfg.demo_train_config)
        if not train_cfg.is_file():
            raise UserError(
                f"[annotate] demo_train_config = {str(train_cfg)!r}: file not found; "
                f"expected the run config that trains the demo annotator ({path} "
                "does not exist yet)"
            )
        from data_manifest.cli_support import err_console

        err_console.print(
            f"[bold]annotate:[/] the demo annotator {path} does not exist yet; "
            f"training it now with `python -m train fit --config {train_cfg}` "
            "(once, a few minutes)",
            highlight=False,
        )
        proc = subprocess.run(
            [sys.executable, "-m", "train", "fit", "--config", str(train_cfg)], check=False
        )
        if proc.returncode != 0 or not path.is_file():
            raise UserError(
                f"{train_cfg}: training the demo annotator failed (exit status "
                f"{proc.returncode}); expected it to write {path}"
            )
    return load_torch(cfg, manifest, str(path), name="demo")


def load_hf(cfg: AnnotateConfig, manifest: Manifest) -> Annotator:
    from annotate.hf import load_hf_annotator

    return load_hf_annotator(cfg, manifest)


def load_seem(cfg: AnnotateConfig, manifest: Manifest) -> Annotator:
    from annotate.seem import load_seem_annotator

    return load_seem_annotator(cfg, manifest)


BACKENDS: dict[str, Callable[[AnnotateConfig, Manifest], Annotator]] = {
    "demo": load_demo,
    "torch": load_torch,
    "hf": load_hf,
    "seem": load_seem,
}


def build_annotator(cfg: AnnotateConfig, manifest: Manifest) -> Annotator:
    """Build the annotator named by ``cfg.annotator``."""
    try:
        backend = BACKENDS[cfg.annotator]
    except KeyError:
        raise UserError(
            f"[annotate] annotator = {cfg.annotator!r}; expected one of {', '.join(BACKENDS)}"
        ) from None
    return backend(cfg, manifest)
