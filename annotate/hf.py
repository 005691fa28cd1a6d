"""The ``hf`` backend: ``transformers`` segmentation models loaded offline from a local folder.

Supported (by the folder's ``config.json`` ``model_type``):

- per-pixel heads (SegFormer, UperNet, DPT, BEiT, ...): ``logits`` (B, K, h, w), softmax;
- mask classification (Mask2Former, MaskFormer, OneFormer): the semantic map
  ``Σ_q softmax(class_q)[:-1] · sigmoid(mask_q)``, normalised per pixel ("sum");
- CLIPSeg: one text prompt per channel (``[annotate] prompts``, default the class names),
  logits (B, P, h, w), softmax across prompts.

Class names come from ``id2label``; mean and std from ``preprocessor_config.json`` when present.
Install with ``pip install -e ".[hf]"``. Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annotate.annotators import IMAGENET_MEAN, IMAGENET_STD, sha256_folder
from annotate.config import AnnotateConfig
from annotate.vocab import prompt_groups
from data_manifest.errors import UserError

if TYPE_CHECKING:
    import torch

    from data_manifest.manifest import Manifest

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MASK_CLASSIFICATION = ("mask2former", "maskformer", "oneformer")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(
            '[annotate] annotator = "hf" needs the transformers library; install it '
            'with `pip install -e ".[hf]"`'
        ) from None
    return transformers


def _preprocessing(folder: Path, default_mean: tuple, default_std: tuple) -> tuple[list, list]:
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return list(default_mean), list(default_std)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{f}: not valid JSON ({exc.msg})") from None
    return list(d.get("image_mean") or default_mean), list(d.get("image_std") or default_std)


class HFAnnotator:
    """A ``transformers`` model behind the :class:`annotate.annotators.Annotator` protocol."""

    def __init__(
        self,
        model: Any,
        kind: str,
        classes: tuple[str, ...],
        mean: list,
        std: list,
        model_sha256: str,
        model_type: str,
        input_ids: Any = None,
        attention_mask: Any = None,
        task_inputs: Any = None,
        groups: dict[str, list[str]] | None = None,
    ):
        import torch

        self.model = model.eval()
        self.kind = kind
        self.classes = classes
        self.normalization = {"pixel": "softmax", "mask": "sum", "clipseg": "softmax"}[kind]
        self.model_sha256 = model_sha256
        self.name = "hf"
        self.groups = groups
        self.extra = {"model_type": model_type, "mean": mean, "std": std}
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._text = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "task_inputs": task_inputs,
        }

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        self._text = {k: None if v is None else v.to(device) for k, v in self._text.items()}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        x = (images.float() - self._mean) / self._std
        b = x.shape[0]
        if self.kind == "pixel":
            return self.model(pixel_values=x).logits
        if self.kind == "mask":
            kwargs = {}
            if self._text["task_inputs"] is not None:
                kwargs["task_inputs"] = self._text["task_inputs"].expand(b, -1)
            out = self.model(pixel_values=x, **kwargs)
            cls = torch.softmax(out.class_queries_logits.float(), dim=-1)[..., :-1]
            masks = out.masks_queries_logits.float().sigmoid()
            return torch.einsum("bqc,bqhw->bchw", cls, masks)
        p = self._text["input_ids"].shape[0]
        ids = self._text["input_ids"].repeat(b, 1)
        mask = self._text["attention_mask"]
        out = self.model(
            input_ids=ids,
            attention_mask=None if mask is None else mask.repeat(b, 1),
            pixel_values=x.repeat_interleave(p, dim=0),
        )
        logits = out.logits
        return logits.reshape(b, p, *logits.shape[-2:])


def load_hf_annotator(cfg: AnnotateConfig, manifest: Manifest) -> HFAnnotator:
    """Load the model folder ``cfg.model`` (``config.json`` + weights, saved with
    ``save_pretrained``); a CLIPSeg folder also needs its tokenizer files."""
    tf = _transformers()
    folder = Path(cfg.model)
    if not str(cfg.model) or not (folder / "config.json").is_file():
        raise UserError(
            f"[annotate] model = {cfg.model!r}: expected a folder with a "
            "transformers config.json and weights (saved with save_pretrained)"
        )
    try:
        conf = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UserError(
            f"{folder / 'config.json'}: cannot read transformers config ({exc})"
        ) from None
    model_type = conf.model_type
    sha = sha256_folder(folder)

    def load(cls: Any) -> Any:
        try:
            return cls.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise UserError(f"{folder}: cannot load {model_type} model ({exc})") from None

    id2label = getattr(conf, "id2label", None) or {}
    classes = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    if model_type == "clipseg":
        mean, std = _preprocessing(folder, CLIP_MEAN, CLIP_STD)
        model = load(tf.CLIPSegForImageSegmentation)
        prompts, groups = prompt_groups(cfg.prompts, manifest.classes)
        try:
            tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise UserError(
                f"{folder}: CLIPSeg needs its tokenizer files in the model folder ({exc})"
            ) from None
        enc = tok(list(prompts), padding=True, return_tensors="pt")
        return HFAnnotator(
            model,
            "clipseg",
            prompts,
            mean,
            std,
            sha,
            model_type,
            input_ids=enc["input_ids"],
            attention_mask=enc.get("attention_mask"),
            groups=groups,
        )
    mean, std = _preprocessing(folder, IMAGENET_MEAN, IMAGENET_STD)
    if not classes:
        raise UserError(
            f"{folder / 'config.json'}: id2label is empty; expected the model's class names"
        )
    if model_type in MASK_CLASSIFICATION:
        model = load(
            tf.AutoModelForUniversalSegmentation
            if model_type != "maskformer"
            else tf.MaskFormerForInstanceSegmentation
        )
        task_inputs = None
        if model_type == "oneformer":
            task_inputs = _oneformer_task(tf, folder, int(conf.task_seq_len))
        return HFAnnotator(
            model, "mask", classes, mean, std, sha, model_type, task_inputs=task_inputs
        )
    model = load(tf.AutoModelForSemanticSegmentation)
    return HFAnnotator(model, "pixel", classes, mean, std, sha, model_type)


def _oneformer_task(tf: Any, folder: Path, seq_len: int) -> Any:
    """OneFormer's task prompt "the task is semantic", tokenised by the tokenizer saved in the
    model folder and padded to the model's ``task_seq_len``: int64 (1, seq_len)."""
    try:
        tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UserError(
            f"{folder}: OneFormer needs its tokenizer files in the model folder ({exc})"
        ) from None
    enc = tok(
        ["the task is semantic"],
        padding="max_length",
        max_length=seq_len,
        truncation=True,
        return_tensors="pt",
    )
    return enc["input_ids"]
