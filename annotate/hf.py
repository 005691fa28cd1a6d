"""The ``hf`` backend: ``transformers`` segmentation models loaded offline from a local folder.

Supported (by the folder's ``config.json`` ``model_type``):

- per-pixel heads (SegFormer, UperNet, DPT, BEiT, ...): ``logits`` (B, K, h, w), softmax;
- mask classification (Mask2Former, MaskFormer, OneFormer): the semantic map
  ``Σ_q softmax(class_q)[:-1] · sigmoid(mask_q)`` of their image processors'
  ``post_process_semantic_segmentation`` before its final resize, normalised per pixel ("sum").
  MaskFormer and OneFormer give it at the mask resolution; Mask2Former's processor first
  resizes the mask logits to 384 × 384 (bilinear, whatever the input's shape;
  ``models/mask2former/image_processing_mask2former.py``), then takes the sigmoid, and so does
  this backend (:data:`MASK_LOGITS_SIZE`);
- CLIPSeg: one text prompt per channel (``[annotate] prompts``, default the class names). The
  image goes through the CLIP vision encoder once; only the light decoder runs once per prompt.
  Its per-prompt logits are independent: CLIPSeg is trained with a binary cross-entropy per
  (image, prompt) pair, so sigmoid(logit) is the probability that the prompt is at the pixel,
  and logits of different prompts are not on a common scale. The scores are these sigmoids,
  normalised per pixel by their sum ("sum"; our choice): a pixel claimed by one prompt with
  probability s gets s, two prompts that both claim it share it. A dataset's background class
  is not prompted by default: it takes the probability that no prompt is present,
  Π_prompts (1 − sigmoid) (our choice, the counterpart of SEEM's no-object column), plus the
  sigmoids of any prompts listed for it. (A softmax across the prompts' logits would instead
  rank claims by a scale the model was never trained to share.)

Preprocessing follows the folder's ``preprocessor_config.json`` as the model's transformers
image processor applies it (keys it does not list take that processor's defaults): resize to a
fixed size, or by shortest/longest edge with the aspect ratio kept (Mask2Former/MaskFormer:
then rounded up to ``size_divisor``), with its resampling filter, antialiased like PIL; then
rescale and normalise. It runs on the model's device. The outputs cover the whole resized
image, so the cache maps them back to the image by a plain resize. Class names come from
``id2label``. Install with ``pip install -e ".[hf]"``. Nothing is downloaded
(``local_files_only``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annotate.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    first_line,
    resize_images,
    sha256_folder,
)
from annotate.config import AnnotateConfig
from annotate.vocab import prompt_channels
from data_manifest.errors import UserError

if TYPE_CHECKING:
    import torch

    from data_manifest.manifest import Manifest

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STANDARD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN and _STD
MASK_CLASSIFICATION = ("mask2former", "maskformer", "oneformer")
# post_process_semantic_segmentation resizes these models' mask logits to this (h, w) before the
# sigmoid (transformers 4.26 to 5.x: "(384, 384) for all models"); the others use them as they are
MASK_LOGITS_SIZE = {"mask2former": (384, 384)}
NO_PROMPT = "<no prompt>"  # CLIPSeg's channel: no prompt present at the pixel
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model")

# transformers' image processor class defaults (models/*/image_processing_*.py, 5.x) for the
# keys a preprocessor_config.json may leave out. "divisor": the resize rounds up to
# size_divisor (Mask2Former and MaskFormer only); "square": an int size means (n, n);
# "batch_pad": do_pad only pads a batch to its largest image (a no-op on same-size images).
_COMMON = {"resample": 2, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "SegformerImageProcessor": {**_COMMON, "size": {"height": 512, "width": 512}},
    "Mask2FormerImageProcessor": {
        **_COMMON,
        "size": {"shortest_edge": 800, "longest_edge": 1333},
        "size_divisor": 32,
        "square": False,
        "divisor": True,
        "batch_pad": True,
    },
    "OneFormerImageProcessor": {
        **_COMMON,
        "size": {"shortest_edge": 800, "longest_edge": 1333},
        "square": False,
        "batch_pad": True,
    },
    "ViTImageProcessor": {
        "resample": 2,
        "image_mean": STANDARD,
        "image_std": STANDARD,
        "size": {"height": 224, "width": 224},
    },
    "BeitImageProcessor": {
        "resample": 3,
        "image_mean": STANDARD,
        "image_std": STANDARD,
        "size": {"height": 224, "width": 224},
    },
    "DPTImageProcessor": {
        "resample": 3,
        "image_mean": STANDARD,
        "image_std": STANDARD,
        "size": {"height": 384, "width": 384},
    },
}
PROCESSOR_DEFAULTS["MaskFormerImageProcessor"] = PROCESSOR_DEFAULTS["Mask2FormerImageProcessor"]
# PIL resampling codes -> torch modes; LANCZOS becomes bicubic, as transformers does on CUDA
RESAMPLE = {0: "nearest-exact", 1: "bicubic", 2: "bilinear", 3: "bicubic"}
# geometry an image processor may apply that the outputs could not be mapped back from
UNSUPPORTED = ("do_center_crop", "keep_aspect_ratio", "do_pad")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(
            '[annotate] annotator = "hf" needs the transformers library; install it '
            'with `pip install -e ".[hf]"`'
        ) from None
    return transformers


@dataclass(frozen=True)
class Preprocessing:
    """An image processor's resize, rescale and normalisation, applied on the model's device.

    Attributes:
        height, width: fixed output size (0: none).
        shortest_edge, longest_edge: resize keeping the aspect ratio (0: none).
        size_divisor: round the resized sides up to a multiple of this (0: no rounding).
        resample: torch interpolation mode.
        rescale_factor: multiply the 0-255 pixels by this first (0: no rescale).
        mean, std: then subtract and divide (empty: no normalisation).
    """

    height: int = 0
    width: int = 0
    shortest_edge: int = 0
    longest_edge: int = 0
    size_divisor: int = 0
    resample: str = "bilinear"
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of (height, width) is resized to."""
        if self.height:
            h, w = self.height, self.width
        elif self.shortest_edge:
            h, w = aspect_size(height, width, self.shortest_edge, self.longest_edge)
        else:
            h, w = height, width
        d = self.size_divisor
        return (-(-h // d) * d, -(-w // d) * d) if d > 1 else (h, w)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 3, h, w) pixel values for the model."""

        h, w = images.shape[-2:]
        x = resize_images(images, self.output_size(int(h), int(w)), self.resample)
        if self.rescale_factor:
            x = x * self.rescale_factor
        if self.mean:
            mean, std = _channel_stats(self.mean, self.std, x.device)
            x = (x - mean) / std
        return x

    def describe(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: Any) -> tuple[Any, Any]:
    """mean and std as float32 (1, 3, 1, 1) tensors on ``device``, made once per device."""
    import torch

    def t(v: tuple) -> Any:
        return torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    return t(mean), t(std)


def aspect_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """Resize keeping the aspect ratio: the short side to ``shortest`` unless the long side
    would then exceed ``longest`` (0: no limit), sides rounded down; transformers'
    ``image_transforms.get_size_with_aspect_ratio`` (and ``get_resize_output_image_size``
    without a limit)."""
    short, long_ = min(height, width), max(height, width)
    raw = None
    if longest and long_ / short * shortest > longest:
        raw = longest * short / long_
        shortest = int(round(raw))
    if short == shortest:
        return height, width
    scale = raw if raw is not None else shortest
    if width < height:
        return int(scale * height / width), shortest
    return shortest, int(scale * width / height)


def read_preprocessing(
    folder: Path, default_type: str = "", fallback: dict[str, Any] | None = None
) -> Preprocessing:
    """The folder's ``preprocessor_config.json`` as a :class:`Preprocessing`.

    Keys the file leaves out take the defaults of its ``image_processor_type`` (else of
    ``default_type``; for other processors ``fallback``, else ImageNet mean/std). Without the
    file: no resize.

    Raises:
        UserError: invalid JSON, a size this backend cannot map back to the image, or a
            resampling filter it does not implement.
    """
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        d: dict[str, Any] = {"do_resize": False, "size_divisor": 0}
        kind = default_type
    else:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{f}: not valid JSON ({exc.msg})") from None
        if not isinstance(d, dict):
            raise UserError(f"{f}: expected a JSON object of image processor settings")
        kind = str(d.get("image_processor_type") or default_type)
    kind = kind.removesuffix("Fast").removesuffix("Pil")
    base = PROCESSOR_DEFAULTS.get(kind, fallback or {})

    def get(key: str, default: Any = None) -> Any:
        return d[key] if d.get(key) is not None else base.get(key, default)

    for key in UNSUPPORTED:
        if d.get(key) and not (key == "do_pad" and base.get("batch_pad")):
            raise UserError(
                f"{f}: {key} = {d[key]!r} is not supported (the scores could not be mapped "
                f"back to the image); expected {key} = false"
            )
    if int(d.get("ensure_multiple_of") or 1) > 1:
        raise UserError(f"{f}: ensure_multiple_of = {d['ensure_multiple_of']} is not supported")
    resample = int(get("resample", 2))
    if resample not in RESAMPLE:
        raise UserError(
            f"{f}: resample = {resample} is not supported; expected 0 (nearest), "
            "2 (bilinear), 3 (bicubic) or 1 (Lanczos, done as bicubic)"
        )
    size = _size(get("size") if get("do_resize", True) else None, d, base, f)
    mean, std = get("image_mean", IMAGENET_MEAN), get("image_std", IMAGENET_STD)
    return Preprocessing(
        **size,
        size_divisor=int(get("size_divisor", 0) or 0) if base.get("divisor") else 0,
        resample=RESAMPLE[resample],
        rescale_factor=float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 0.0,
        mean=tuple(_triple(mean, f)) if get("do_normalize", True) else (),
        std=tuple(_triple(std, f)) if get("do_normalize", True) else (),
    )


def _triple(v: Any, f: Path) -> list[float]:
    v = [v] * 3 if isinstance(v, int | float) else list(v)
    if len(v) != 3:
        raise UserError(f"{f}: image_mean/image_std = {v!r}; expected three numbers")
    return [float(x) for x in v]


def _size(size: Any, d: dict, base: dict, f: Path) -> dict[str, int]:
    """transformers' ``get_size_dict``: an int is square or a shortest edge (with the legacy
    ``max_size`` as longest edge); a pair is (height, width); None is no resize."""
    if size is None:
        return {}
    if isinstance(size, int):
        if base.get("square", True):
            return {"height": size, "width": size}
        return {"shortest_edge": size, "longest_edge": int(d.get("max_size") or 0)}
    if isinstance(size, list | tuple) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        if size.get("height") and size.get("width"):
            return {"height": int(size["height"]), "width": int(size["width"])}
        if size.get("shortest_edge"):
            return {
                "shortest_edge": int(size["shortest_edge"]),
                "longest_edge": int(size.get("longest_edge") or 0),
            }
    raise UserError(
        f"{f}: size = {size!r} is not supported; expected a number, "
        '{"height", "width"} or {"shortest_edge"[, "longest_edge"]}'
    )


class HFAnnotator:
    """A ``transformers`` model behind the :class:`annotate.annotators.Annotator` protocol.

    Args:
        model: the loaded model (put in eval mode here).
        kind: "pixel" (per-pixel logits), "mask" (mask classification) or "clipseg".
        classes: output channel names.
        pre: the image processor's preprocessing.
        model_sha256: sha256 over the folder's files.
        model_type: ``config.model_type``.
        text: CLIPSeg: the prompts' conditional embeddings (P, projection_dim); OneFormer: the
            task tokens (1, task_seq_len).
        groups: dataset class -> channels (prompt-based models).
    """

    def __init__(
        self,
        model: Any,
        kind: str,
        classes: tuple[str, ...],
        pre: Preprocessing,
        model_sha256: str,
        model_type: str,
        text: Any = None,
        groups: dict[str, list[str]] | None = None,
    ):
        import torch

        self.model = model.eval()
        self.kind = kind
        self.classes = classes
        self.normalization = {"pixel": "softmax", "mask": "sum", "clipseg": "sum"}[kind]
        self.model_sha256 = model_sha256
        self.name = "hf"
        self.groups = groups
        self.pre = pre
        self.extra = {"model_type": model_type, "preprocessing": pre.describe()}
        self.mask_size = MASK_LOGITS_SIZE.get(model_type) if kind == "mask" else None
        if self.mask_size:
            self.extra["mask_logits_resized_to"] = list(self.mask_size)
        self._text = text
        prompts = [c for c in classes if c != NO_PROMPT]
        # CLIPSeg: column of each channel among [prompt sigmoids..., no-prompt]
        self._columns = torch.tensor(
            [len(prompts) if c == NO_PROMPT else prompts.index(c) for c in classes]
        )

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self._columns = self._columns.to(device)
        if self._text is not None:
            self._text = self._text.to(device)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the device -> float (B, len(classes), h, w) scores at the
        model's output resolution over the whole resized image."""
        import torch
        import torch.nn.functional as F

        x = self.pre(images)
        b = x.shape[0]
        if self.kind == "pixel":
            return self.model(pixel_values=x).logits
        if self.kind == "mask":
            kwargs = {}
            if self._text is not None:
                kwargs["task_inputs"] = self._text.expand(b, -1)
            out = self.model(pixel_values=x, **kwargs)
            cls = torch.softmax(out.class_queries_logits.float(), dim=-1)[..., :-1]
            masks = out.masks_queries_logits.float()
            if self.mask_size:
                masks = F.interpolate(
                    masks, size=self.mask_size, mode="bilinear", align_corners=False
                )
            masks = masks.sigmoid()
            return torch.einsum("bqc,bqhw->bchw", cls, masks)
        return self._clipseg(x)

    def _clipseg(self, x: torch.Tensor) -> torch.Tensor:
        """CLIPSegForImageSegmentation.forward with the vision encoder run once per image:
        its activations are repeated for the P prompts, then decoded."""
        import torch
        import torch.nn.functional as F

        b, p = x.shape[0], self._text.shape[0]
        vision = self.model.clip.vision_model(
            pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True
        )
        acts = [
            vision.hidden_states[i + 1].repeat_interleave(p, dim=0)
            for i in self.model.extract_layers
        ]
        logits = self.model.decoder(acts, self._text.repeat(b, 1)).logits
        logits = logits.float().reshape(b, p, *logits.shape[-2:])
        # log Π(1 − sigmoid(l)) = −Σ softplus(l): the probability that no prompt is present
        none = torch.exp(-F.softplus(logits).sum(dim=1, keepdim=True))
        return torch.cat([logits.sigmoid(), none], dim=1)[:, self._columns]


def _tokenizer(tf: Any, folder: Path, what: str) -> Any:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{folder}: {what} needs its tokenizer in the model folder (tokenizer.json, or "
            "vocab.json and merges.txt); none found; save it there with "
            "tokenizer.save_pretrained(folder)"
        )
    try:
        return tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UserError(f"{folder}: cannot load {what}'s tokenizer ({first_line(exc)})") from None


def load_hf_annotator(cfg: AnnotateConfig, manifest: Manifest) -> HFAnnotator:
    """Load the model folder ``cfg.model`` (``config.json`` + weights, saved with
    ``save_pretrained``); CLIPSeg and OneFormer folders also need their tokenizer files."""
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
            f"{folder / 'config.json'}: cannot read transformers config ({first_line(exc)})"
        ) from None
    model_type = conf.model_type
    sha = sha256_folder(folder)

    def load(cls: Any) -> Any:
        try:
            return cls.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise UserError(
                f"{folder}: cannot load {model_type} model ({first_line(exc)})"
            ) from None

    if model_type == "clipseg":
        return _load_clipseg(tf, folder, conf, cfg, manifest, sha, load)
    id2label = getattr(conf, "id2label", None) or {}
    classes = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    if not classes:
        raise UserError(
            f"{folder / 'config.json'}: id2label is empty; expected the model's class names"
        )
    if model_type in MASK_CLASSIFICATION:
        kind = {"oneformer": "OneFormer", "maskformer": "MaskFormer"}.get(model_type, "Mask2Former")
        pre = read_preprocessing(folder, f"{kind}ImageProcessor")
        model = load(
            tf.AutoModelForUniversalSegmentation
            if model_type != "maskformer"
            else tf.MaskFormerForInstanceSegmentation
        )
        task = None
        if model_type == "oneformer":
            task = _oneformer_task(_tokenizer(tf, folder, "OneFormer"), int(conf.task_seq_len))
        return HFAnnotator(model, "mask", classes, pre, sha, model_type, text=task)
    pre = read_preprocessing(folder)
    model = load(tf.AutoModelForSemanticSegmentation)
    return HFAnnotator(model, "pixel", classes, pre, sha, model_type)


def _load_clipseg(
    tf: Any,
    folder: Path,
    conf: Any,
    cfg: AnnotateConfig,
    manifest: Manifest,
    sha: str,
    load: Any,
) -> HFAnnotator:
    """CLIPSeg: square input (its decoder assumes a square patch grid), the prompts embedded
    once here."""
    import torch

    pre = read_preprocessing(folder, fallback={"image_mean": CLIP_MEAN, "image_std": CLIP_STD})
    side = int(conf.vision_config.image_size)
    if not (pre.height or pre.shortest_edge):  # no processor settings: the model's own grid
        pre = Preprocessing(height=side, width=side, mean=pre.mean, std=pre.std)
    if pre.height != pre.width or pre.shortest_edge:
        raise UserError(
            f"{folder / 'preprocessor_config.json'}: CLIPSeg needs a square input size "
            f"(its decoder assumes a square patch grid); got {pre.describe()}"
        )
    channels, groups = prompt_channels(
        cfg.prompts, manifest.classes, manifest.meta.background_index, NO_PROMPT
    )
    prompts = [c for c in channels if c != NO_PROMPT]
    tok = _tokenizer(tf, folder, "CLIPSeg")
    model = load(tf.CLIPSegForImageSegmentation).eval()
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cond = model.get_conditional_embeddings(
            batch_size=len(prompts),
            input_ids=enc["input_ids"],
            attention_mask=enc.get("attention_mask"),
        )
    return HFAnnotator(model, "clipseg", channels, pre, sha, "clipseg", text=cond, groups=groups)


def _oneformer_task(tok: Any, seq_len: int) -> Any:
    """OneFormer's task prompt "the task is semantic", tokenised as ``OneFormerProcessor``
    does (padded to the model's ``task_seq_len``): int64 (1, seq_len)."""
    enc = tok(
        ["the task is semantic"],
        padding="max_length",
        max_length=seq_len,
        truncation=True,
        return_tensors="pt",
    )
    return enc["input_ids"]
