"""The ``seem`` backend: SEEM (Segment Everything Everywhere All at Once) as annotator.

SEEM is not on PyPI. Install its repository and its detectron2 fork by hand (see the README's
``## annotate`` section), then point ``[annotate] seem_root`` at the repository (or put it on
``PYTHONPATH``), ``seem_config`` at a config file such as ``configs/seem/focall_unicl_lang_v1.yaml``
and ``model`` at a checkpoint such as ``seem_focall_v1.pt``.

How the scores are made (SEEM's public API):

- every dataset class is prompted by its names (``[annotate] prompts``, default the class name);
  the prompts become text embeddings with
  ``lang_encoder.get_text_embeddings(prompts + ["background"], is_eval=True)``, the last slot
  acting as "no object";
- ``model.model.evaluate([{"image", "height", "width"}, ...])`` gives ``sem_seg`` (P, H, W) =
  Σ_queries softmax(class logits)[:-1] · sigmoid(mask), values in [0, ~#queries]: not a
  distribution, so it is normalised per pixel ("sum" normalization);
- panoptic and instance heads are switched off (they assume SEEM's own class list);
- datasets with a background class: the part of a pixel that no query covers,
  ``max(0, 1 − Σ_p sem_seg[p])``, is added to the background class (our choice: SEEM has no
  explicit background score, and an uncovered pixel would otherwise get a uniform distribution).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annotate.annotators import sha256_file
from annotate.config import AnnotateConfig
from annotate.vocab import prompt_groups
from data_manifest.errors import UserError

if TYPE_CHECKING:
    import torch

    from data_manifest.manifest import Manifest

INSTALL_HINT = (
    "SEEM is not installed: clone https://github.com/UX-Decoder/Segment-Everything-Everywhere-"
    "All-At-Once, install its requirements (assets/requirements/requirements.txt, which brings "
    "its detectron2 fork), then set [annotate] seem_root to the clone (or add it to PYTHONPATH)"
)


class SeemAnnotator:
    """A SEEM model behind the :class:`annotate.annotators.Annotator` protocol.

    Args:
        model: a SEEM ``BaseModel`` (or any object with the same contract: ``.model.evaluate``,
            ``.model.sem_seg_head.predictor.lang_encoder.get_text_embeddings``).
        prompts: the text prompts, one output channel each.
        groups: dataset class -> its prompts.
        background_prompt: the prompt that receives uncovered pixels (None: no background).
    """

    def __init__(
        self,
        model: Any,
        prompts: tuple[str, ...],
        groups: dict[str, list[str]],
        background_prompt: str | None,
        model_sha256: str,
        extra: dict[str, Any] | None = None,
    ):
        self.model = model
        self.classes = prompts
        self.groups = groups
        self.normalization = "sum"
        self.model_sha256 = model_sha256
        self.name = "seem"
        self.extra = dict(extra or {}, background_prompt=background_prompt)
        self._bg = None if background_prompt is None else prompts.index(background_prompt)
        net = model.model
        for flag, on in (("semantic_on", True), ("panoptic_on", False), ("instance_on", False)):
            setattr(net, flag, on)
        switch = getattr(net, "task_switch", None)
        if isinstance(switch, dict):
            for k in ("spatial", "visual", "grounding", "audio"):
                if k in switch:
                    switch[k] = False
        net.sem_seg_head.num_classes = len(prompts)
        self._embed()

    def _embed(self) -> None:
        import torch

        with torch.no_grad():
            self.model.model.sem_seg_head.predictor.lang_encoder.get_text_embeddings(
                list(self.classes) + ["background"], is_eval=True
            )

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self._embed()  # the text embeddings are plain attributes: recompute them on the device

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        h, w = images.shape[-2:]
        batch = [{"image": img, "height": int(h), "width": int(w)} for img in images]
        outs = self.model.model.evaluate(batch)
        sem = torch.stack([o["sem_seg"].float() for o in outs])
        if sem.shape[1] != len(self.classes):
            raise UserError(
                f"SEEM returned sem_seg with {sem.shape[1]} channels for "
                f"{len(self.classes)} prompts; expected one per prompt"
            )
        if self._bg is not None:
            uncovered = (1.0 - sem.clamp_min(0).sum(dim=1)).clamp_min(0)
            sem[:, self._bg] += uncovered
        return sem


def background_prompt(
    groups: dict[str, list[str]], classes: list[str], background_index: int | None
) -> str | None:
    """The first prompt of the dataset's background class, or None without one."""
    if background_index is None:
        return None
    return groups[classes[background_index]][0]


def load_seem_annotator(cfg: AnnotateConfig, manifest: Manifest) -> SeemAnnotator:
    """Build SEEM from ``cfg.seem_config`` and the checkpoint ``cfg.model``."""
    if cfg.seem_root:
        root = Path(cfg.seem_root)
        if not root.is_dir():
            raise UserError(
                f"[annotate] seem_root = {cfg.seem_root!r}: folder not found; "
                "expected a clone of SEEM's repository"
            )
        for p in (root, root / "demo_code"):
            if p.is_dir() and str(p) not in sys.path:
                sys.path.insert(0, str(p))
    try:
        from modeling import build_model
        from modeling.BaseModel import BaseModel
        from utils.arguments import load_opt_from_config_files
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    conf, ckpt = Path(cfg.seem_config), Path(cfg.model)
    if not cfg.seem_config or not conf.is_file():
        raise UserError(
            f"[annotate] seem_config = {cfg.seem_config!r}: file not found; expected "
            "a SEEM config such as configs/seem/focall_unicl_lang_v1.yaml"
        )
    if not cfg.model or not ckpt.is_file():
        raise UserError(
            f"[annotate] model = {cfg.model!r}: file not found; expected a SEEM "
            "checkpoint such as seem_focall_v1.pt"
        )
    opt = load_opt_from_config_files([str(conf)])
    try:
        from utils.distributed import init_distributed

        opt = init_distributed(opt)
    except ImportError:
        pass
    model = BaseModel(opt, build_model(opt)).from_pretrained(str(ckpt)).eval()
    prompts, groups = prompt_groups(cfg.prompts, manifest.classes)
    bg = background_prompt(groups, manifest.classes, manifest.meta.background_index)
    return SeemAnnotator(
        model,
        prompts,
        groups,
        bg,
        sha256_file(ckpt),
        {"config": conf.name, "checkpoint": ckpt.name},
    )
