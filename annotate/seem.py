"""The ``seem`` backend: SEEM (Segment Everything Everywhere All at Once) as annotator.

SEEM is not on PyPI. Install its code and its detectron2 fork next to this project (the recipe
is in ``docs/annotate.md``; ``python -m annotate seem-requirements`` writes the filtered
requirement files), then point ``[annotate] seem_root`` at the checkout, ``seem_config`` at a
config such as ``configs/seem/focall_unicl_lang_v1.yaml``, ``model`` at a checkpoint such as
``seem_focall_v1.pt`` and ``seem_tokenizer`` at a local copy of the CLIP tokenizer.

What SEEM's code requires, and how this adapter meets it (file names are SEEM's):

- CUDA only. ``modeling/architectures/seem_model_v1.py`` builds a buffer on
  ``torch.cuda.current_device()`` and ``modeling/language/vlpencoder.py`` sends the prompt
  tokens to ``.cuda()``, the *current* device. So the chosen device is made current
  (``torch.cuda.set_device``) before the model is built, the model is moved there, and only
  then are the prompts embedded. Any other device is refused.
- ``modeling/BaseModel.py`` loads the checkpoint with ``map_location=opt["device"]``, a key
  that SEEM's ``utils/distributed.init_distributed`` would set; that function also runs a
  shell command and MPI broadcasts, so the keys it sets for one process are set here instead.
- The text encoder's tokenizer (``openai/clip-vit-base-patch32``) is fetched from the hub by
  ``modeling/language/LangEncoder/__init__.build_tokenizer`` unless the config names a local
  one: ``seem_tokenizer`` is written into the config as ``MODEL.TEXT.PRETRAINED_TOKENIZER``.
  Offline, transformers 5 builds an *empty* tokenizer instead of failing; the prompts are
  tokenised once after the build to refuse that.

How the scores are made, from SEEM's raw outputs (the path of ``GeneralizedSEEM.evaluate``):

- prompts: every dataset class but the background is prompted with its name (or
  ``[annotate.prompts]``) and embedded with
  ``get_text_embeddings(prompts + ["background"], is_eval=True)``, the last slot being SEEM's
  "no object" (as in SEEM's own inference scripts);
- input: the image is resized so that its short side is ``input_short_side`` (512, SEEM's
  ``inference/xdecoder/infer_semseg.py``; bicubic, aspect ratio kept), normalised with the
  model's ``pixel_mean``/``pixel_std`` and zero-padded to ``size_divisibility`` (detectron2's
  ``ImageList.from_tensors``); ``backbone`` and ``sem_seg_head`` give ``pred_logits``
  (B, Q, P + 1) and ``pred_masks`` (B, Q, h/4, w/4);
- scores: Σ_q softmax(pred_logits)[..., c] · sigmoid(pred_masks) per channel, brought back to
  the image size the way ``sem_seg_postprocess`` does (crop the padding, bicubic); columns
  0..P-1 are SEEM's own ``sem_seg``;
- background (our choice of where it comes from, SEEM's own number): the dataset's background
  class takes the no-object column P, Σ_q softmax(pred_logits)[..., -1] · sigmoid(pred_masks),
  which SEEM's ``semantic_inference`` drops. Prompting "background" as a class as well would
  give it the same text embedding as the no-object slot and split its mass, so that prompt is
  refused. Datasets without a background class drop the column, as SEEM does;
- normalisation ("sum"): over all P + 1 columns the per-pixel sum is Σ_q sigmoid(mask_q), so
  a pixel's probabilities are the query class distributions averaged with weights
  sigmoid(mask_q): a proper mixture.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annotate.common import first_line, resize_images, sha256_file
from annotate.config import AnnotateConfig
from annotate.seem_install import (
    RECIPE,
    STEP_CHECKOUT,
    STEP_FORK,
    STEP_REQUIREMENTS,
    STEP_TORCH,
)
from annotate.vocab import prompt_channels
from data_manifest.errors import UserError

if TYPE_CHECKING:
    import torch

    from data_manifest.manifest import Manifest

NO_OBJECT = "<no object>"  # our name for the channel of SEEM's no-object column
NO_OBJECT_TEXT = "background"  # the text SEEM's scripts append as the no-object slot
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # CLIP's BPE files (or its tokenizer.json)
# suffixes SEEM's text encoder removes from a class name before the prompt templates
# (modeling/language/vlpencoder.py, LanguageEncoder.get_text_embeddings), in its order
SEEM_STRIPPED = ("-other", "-merged", "-stuff")
INSTALL_HINT = (
    "SEEM's code is not importable: set [annotate] seem_root to a checkout of "
    "https://github.com/UX-Decoder/Segment-Everything-Everywhere-All-At-Once (v1.0); "
    f"redo {STEP_CHECKOUT}"
)
# packages this project installs (pinned by seem-constraints.txt): an error raised inside them
# while SEEM is imported is the caller's, so the blame goes to the first frame outside them
PROVIDED_MODULES = {
    "torch", "numpy", "PIL", "transformers", "tokenizers", "huggingface_hub", "safetensors",
    "cv2", "importlib", "typing_extensions",
}  # fmt: skip


def seem_device(name: str) -> torch.device:
    """The CUDA device SEEM runs on: "auto"/"cuda" -> the current one, "cuda:N" -> N.

    Raises:
        UserError: not a CUDA device, no CUDA on this machine, or N out of range.
    """
    import torch

    if not (name in ("auto", "cuda") or name.startswith("cuda:")):
        raise UserError(
            f"[annotate] device = {name!r}: SEEM runs on CUDA only (its text encoder sends "
            'tokens to CUDA); expected "auto", "cuda" or "cuda:N" on a machine with a GPU'
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"[annotate] device = {name!r}: SEEM runs on CUDA only and this machine has no "
            "CUDA device; run it on a GPU machine"
        )
    if name in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index, count = name[5:], torch.cuda.device_count()
    if not index.isdigit() or int(index) >= count:
        raise UserError(
            f"[annotate] device = {name!r}: expected cuda:0 to cuda:{count - 1} "
            f"({count} CUDA device{'s' if count != 1 else ''} here)"
        )
    return torch.device("cuda", int(index))


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``short_side`` (0: unchanged), as
    ``torchvision.transforms.Resize(short_side)`` computes it (long side rounded down)."""
    if short_side <= 0:
        return height, width
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def _postprocess(x: torch.Tensor, size: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """SEEM's ``sem_seg_postprocess`` on a batch: crop (B, C, Hp, Wp) to ``size``, then bicubic
    (antialiased) to ``out``."""
    import torch.nn.functional as F

    x = x[:, :, : size[0], : size[1]]
    return F.interpolate(x, size=out, mode="bicubic", align_corners=False, antialias=True)


class SeemAnnotator:
    """A SEEM model behind the :class:`annotate.annotators.Annotator` protocol.

    Args:
        model: a SEEM ``BaseModel`` (``.model`` is the ``GeneralizedSEEM``), already built with
            ``device`` current.
        channels: output channel names: the prompts, and :data:`NO_OBJECT` where the dataset
            has a background class.
        groups: dataset class -> its channels.
        device: the CUDA device to run on.
        model_sha256: sha256 of the checkpoint.
        short_side: input short side in pixels (0: each image at its own size).
        extra: details for the cache metadata.
    """

    def __init__(
        self,
        model: Any,
        channels: tuple[str, ...],
        groups: dict[str, list[str]],
        device: torch.device,
        model_sha256: str,
        short_side: int = 512,
        extra: dict[str, Any] | None = None,
    ):
        import torch

        self.model = model
        self.classes = channels
        self.groups = groups
        self.normalization = "sum"
        self.model_sha256 = model_sha256
        self.name = "seem"
        self.short_side = short_side
        self.texts = [c for c in channels if c != NO_OBJECT]  # given to SEEM as they are
        # column of each channel in pred_logits: prompt i -> i, no-object -> the last one
        self._columns = torch.tensor(
            [len(self.texts) if c == NO_OBJECT else self.texts.index(c) for c in channels]
        )
        self.extra = dict(
            extra or {},
            prompts=[seem_text(t) for t in self.texts],  # what SEEM's text encoder embeds
            no_object_prompt=NO_OBJECT_TEXT,
            preprocessing={"short_side": short_side, "resample": "bicubic"},
        )
        self.device: torch.device | None = None
        self.to(device)

    def to(self, device: torch.device) -> None:
        """Make ``device`` current, move the model there, then embed the prompts (SEEM's text
        encoder sends the tokens to the current device)."""
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            raise UserError(
                f"[annotate] device = {str(device)!r}: SEEM runs on CUDA only; expected "
                '"auto", "cuda" or "cuda:N"'
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return
        torch.cuda.set_device(device)
        self.model.to(device)
        lang = self.model.model.sem_seg_head.predictor.lang_encoder
        with torch.no_grad():
            lang.get_text_embeddings(self.texts + [NO_OBJECT_TEXT], is_eval=True)
        self._columns = self._columns.to(device)
        self.device = device

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the device -> float32 (B, len(classes), H, W) scores."""
        import torch
        import torch.nn.functional as F

        net = self.model.model
        h, w = images.shape[-2:]
        size = resized_shape(int(h), int(w), self.short_side)
        x = (resize_images(images, size, "bicubic") - net.pixel_mean) / net.pixel_std
        div = int(net.size_divisibility)
        if div > 1:  # detectron2's ImageList.from_tensors: zeros at the bottom and right
            x = F.pad(x, (0, -size[1] % div, 0, -size[0] % div), value=0.0)
        out = net.sem_seg_head(net.backbone(x), target_queries=None)
        logits, masks = out["pred_logits"], out["pred_masks"]
        if logits.shape[-1] != len(self.texts) + 1:
            raise UserError(
                f"SEEM returned pred_logits with {logits.shape[-1]} columns for "
                f"{len(self.texts)} prompts; expected {len(self.texts) + 1} (one per prompt "
                "and the no-object column)"
            )
        with torch.autocast(x.device.type, enabled=False):
            cls = torch.softmax(logits.float(), dim=-1)[..., self._columns]
            masks = F.interpolate(
                masks.float(), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
            if net.sem_seg_postprocess_before_inference:
                masks = _postprocess(masks, size, (int(h), int(w)))
                return torch.einsum("bqc,bqhw->bchw", cls, masks.sigmoid())
            sem = torch.einsum("bqc,bqhw->bchw", cls, masks.sigmoid())
            return _postprocess(sem, size, (int(h), int(w)))


def seem_text(name: str) -> str:
    """The text SEEM's text encoder puts into its prompt templates for the class ``name``:
    ``-other``, ``-merged`` and ``-stuff`` removed, wherever they are, in that order
    (``modeling/language/vlpencoder.py``, ``get_text_embeddings``)."""
    for suffix in SEEM_STRIPPED:
        name = name.replace(suffix, "")
    return name


def check_prompt_texts(groups: dict[str, list[str]]) -> None:
    """Refuse prompts that SEEM would embed as its no-object text, or two prompts that SEEM
    would embed alike (CLIP's tokenizer lower-cases; SEEM strips suffixes): either would split
    one score between two channels."""
    seen: dict[str, tuple[str, str]] = {}
    for c, words in groups.items():
        for w in words:
            if w == NO_OBJECT:
                continue
            key = seem_text(w).strip().lower()
            if key == NO_OBJECT_TEXT:
                raise UserError(
                    f"[annotate] prompts: {c} = [... {w!r} ...]: SEEM already uses "
                    f"{NO_OBJECT_TEXT!r} as its no-object text, whose column is the background "
                    "score; expected other prompts"
                )
            if key in seen and seen[key][1] != w:
                raise UserError(
                    f"[annotate] prompts: {seen[key][0]} = {seen[key][1]!r} and {c} = {w!r} "
                    f"are both embedded as {key!r} by SEEM (it lower-cases and removes "
                    f"{', '.join(SEEM_STRIPPED)}); expected prompts that differ"
                )
            seen[key] = (c, w)


def check_checkpoint(ckpt: Path, model: Any, conf: Path) -> int:
    """Refuse a checkpoint made with another config (or tokenizer) than ``conf``.

    SEEM's ``BaseModel.from_pretrained`` loads whatever matches by name and shape and skips
    the rest with a log line (``utils/model.py``, ``align_and_update_state_dicts``), so another
    model's checkpoint would leave most weights random without an error. Refused: a tensor whose
    shape differs from the model's, or a model parameter the checkpoint lacks. Checkpoint
    tensors the model does not have are ignored, as SEEM does. Returns how many were ignored.
    """
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"{ckpt}: cannot read the SEEM checkpoint ({first_line(exc)})"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{ckpt}: expected a SEEM checkpoint (a state dict of tensors)")
    have = model.state_dict()
    shapes = [k for k in have if k in state and tuple(state[k].shape) != tuple(have[k].shape)]
    missing = [k for k, _ in model.named_parameters() if k not in state]
    if shapes or missing:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensors of another shape (e.g. {k}: "
                f"{tuple(state[k].shape)} in the checkpoint, {tuple(have[k].shape)} in the model)"
            )
        if missing:
            n = len(list(model.parameters()))
            parts.append(
                f"{len(missing)} of the model's {n} parameters missing (e.g. {missing[0]})"
            )
        raise UserError(
            f"{ckpt}: not a checkpoint of {conf.name}: {' and '.join(parts)}; expected a "
            "checkpoint made with this config and tokenizer"
        )
    return sum(k not in have for k in state)


def check_tokenizer(folder: str) -> Path:
    """``[annotate] seem_tokenizer``: a folder with the CLIP tokenizer's files, either
    ``tokenizer.json`` (what transformers 5 saves) or ``vocab.json`` and ``merges.txt``.

    Raises:
        UserError: the folder is missing, has neither, or holds a file that is not JSON.
    """
    path = Path(folder)
    if not path.is_dir():
        raise UserError(
            f"[annotate] seem_tokenizer = {folder!r}: folder not found; expected a local copy "
            "of the openai/clip-vit-base-patch32 tokenizer (docs/annotate.md)"
        )
    if not (path / "tokenizer.json").is_file() and not all(
        (path / f).is_file() for f in TOKENIZER_FILES
    ):
        raise UserError(
            f"[annotate] seem_tokenizer = {folder!r}: no tokenizer files; expected the CLIP "
            "tokenizer's tokenizer.json, or vocab.json and merges.txt (docs/annotate.md)"
        )
    for name in ("tokenizer.json", "vocab.json"):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{path / name}: not valid JSON ({exc})") from None
    return path


def _seem_checkout(seem_root: str) -> Path | None:
    """The resolved SEEM checkout folder (None: SEEM importable without one), checked."""
    if not seem_root:
        return None
    root = Path(seem_root).resolve()
    if not root.is_dir():
        raise UserError(
            f"[annotate] seem_root = {seem_root!r}: folder not found; expected a checkout "
            "of SEEM's repository"
        )
    if not ((root / "modeling").is_dir() and (root / "utils" / "arguments.py").is_file()):
        raise UserError(
            f"[annotate] seem_root = {seem_root!r}: not a SEEM checkout; expected its "
            "modeling/ folder and utils/arguments.py in it"
        )
    return root


def pillow_compat() -> None:
    """Give Pillow >= 10 the name ``Image.LINEAR`` back, as an alias of ``Image.BILINEAR``.

    SEEM's detectron2 fork uses it as a default argument in
    ``detectron2/data/transforms/transform.py``, so importing SEEM fails without it. Pillow 9
    had it as a deprecated alias of the same filter (value 2); Pillow 10 removed it.
    """
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.Resampling.BILINEAR


def _top_module(filename: str, root: Path | None) -> str:
    """The top-level module a source file belongs to ("seem" for SEEM's checkout, "" for the
    standard library and frozen modules)."""
    import sysconfig

    if filename.startswith("<"):
        return ""
    f = Path(filename).resolve()
    if root is not None and root in f.parents:
        return "seem"
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    if stdlib in f.parents and "site-packages" not in f.parts:
        return ""
    best: tuple[int, str] = (-1, "")
    for entry in sys.path:
        base = Path(entry or ".").resolve()
        if base in f.parents and len(base.parts) > best[0]:
            best = (len(base.parts), f.relative_to(base).parts[0].removesuffix(".py"))
    name = best[1]
    return "seem" if root is None and name in ("modeling", "utils") else name


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _import_failure(exc: BaseException, root: Path | None) -> UserError:
    """One line for any exception raised while SEEM is imported, naming the recipe step to
    redo: the module that is missing, or the package in which the error was raised (the first
    frame, from the deepest up, outside the standard library and this project's own packages)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if top in ("modeling", "utils"):
            return UserError(INSTALL_HINT)
        if top == "detectron2":
            return UserError(
                "SEEM's code imports detectron2, which is not installed: SEEM needs its fork; "
                f"redo {STEP_FORK}"
            )
        step = STEP_TORCH if top == "torchvision" else STEP_REQUIREMENTS
        return UserError(
            f"SEEM's code needs the module {exc.name!r}, which is not installed; redo {step}"
        )
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    blamed, where = "", ""
    if isinstance(exc, ImportError) and exc.name:  # "cannot import name ... from <name>"
        blamed = exc.name.split(".")[0]
    for filename, line in reversed(frames):
        top = _top_module(filename, root)
        if top and top not in PROVIDED_MODULES:
            blamed, where = blamed or top, f"{filename}:{line}"
            break
    what = f"{type(exc).__name__}: {first_line(exc)}"
    at = f" ({where})" if where else ""
    if blamed == "detectron2":
        return UserError(f"SEEM's detectron2 fork raised {what}{at}; redo {STEP_FORK}")
    if blamed == "torchvision":
        return UserError(
            f"torchvision {_version('torchvision')} does not work with torch "
            f"{_version('torch')} ({what}){at}; redo {STEP_TORCH}"
        )
    if blamed == "seem":
        return UserError(f"SEEM's code raised {what}{at}; expected v1.0: redo {STEP_CHECKOUT}")
    if blamed and blamed not in PROVIDED_MODULES:
        return UserError(
            f"the package {blamed!r} raised {what} while SEEM was imported{at}; "
            f"redo {STEP_REQUIREMENTS}"
        )
    return UserError(f"importing SEEM's code raised {what}{at}; see {RECIPE}")


def _import_seem(seem_root: str) -> tuple[Any, Any, Any, Any]:
    """(build_model, BaseModel, load_opt_from_config_files, get_prompt_templates) from SEEM's
    checkout, imported after :func:`pillow_compat`; any failure is one line naming the recipe
    step to redo."""
    root = _seem_checkout(seem_root)
    if root is not None:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    pillow_compat()
    # SEEM's import prints "Deformable Transformer Encoder is not available." (its v1 configs
    # do not use that encoder) and its dependencies warn about their own deprecations: neither
    # is for the user of this tool to act on, and an error must stay one line
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from modeling import build_model
            from modeling.BaseModel import BaseModel
            from utils.arguments import load_opt_from_config_files
            from utils.prompt_engineering import get_prompt_templates
        except Exception as exc:
            raise _import_failure(exc, root) from None
    import modeling

    if root is not None and root not in Path(modeling.__file__).resolve().parents:
        raise UserError(
            f"[annotate] seem_root = {seem_root!r}: Python imported another package named "
            f"'modeling' ({Path(modeling.__file__).parent}); expected SEEM's"
        )
    return build_model, BaseModel, load_opt_from_config_files, get_prompt_templates


def check_install(seem_root: str) -> dict[str, str]:
    """Import SEEM's code from ``seem_root`` as :func:`load_seem_annotator` does; return the
    versions it runs with (detectron2: where it is imported from, and whether its compiled
    operators, which SEEM's semantic forward does not use, are there).

    Raises:
        UserError: one line naming the step of the recipe to redo.
    """
    import importlib.util

    _import_seem(seem_root)
    import detectron2
    import modeling

    compiled = importlib.util.find_spec("detectron2._C") is not None
    where = Path(detectron2.__file__).parent.parent
    out = {
        name: _version(name)
        for name in ("torch", "torchvision", "numpy", "pillow", "transformers", "timm")
    }
    out["detectron2"] = (
        f"{getattr(detectron2, '__version__', '?')} from {where} "
        f"({'with' if compiled else 'without'} its compiled operators)"
    )
    out["SEEM"] = str(Path(modeling.__file__).parent.parent)
    return out


def _check_files(cfg: AnnotateConfig) -> tuple[Path, Path, Path | None]:
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
    return conf, ckpt, check_tokenizer(cfg.seem_tokenizer) if cfg.seem_tokenizer else None


def check_prompt_tokens(tokenizer: Any, prompts: tuple[str, ...], conf: Path) -> None:
    """Refuse a tokenizer that turns a prompt into special tokens only.

    transformers 5 does not fail when a tokenizer's files cannot be fetched (offline, or the
    hub unreachable): it returns a tokenizer with an empty vocabulary, and every prompt would
    get the same embedding.
    """
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for p in prompts:
        if p == NO_OBJECT:
            continue
        ids = tokenizer(p)["input_ids"]
        if all(i in special for i in ids):
            raise UserError(
                f"{conf}: SEEM's text tokenizer turns the prompt {p!r} into special tokens "
                "only (its vocabulary could not be loaded); set [annotate] seem_tokenizer to "
                "a local copy of it (docs/annotate.md)"
            )


def seem_options(opt: dict, device: torch.device, tokenizer: Path | None) -> dict:
    """SEEM's option dict for one process on ``device``: the keys ``init_distributed`` sets,
    and the local tokenizer folder."""
    opt.update(CUDA=True, world_size=1, local_size=1, rank=0, local_rank=device.index)
    opt["device"] = device
    if tokenizer is not None:
        text = opt.setdefault("MODEL", {}).setdefault("TEXT", {})
        if text.get("TOKENIZER", "clip") in ("clip", "clip-fast"):
            text["PRETRAINED_TOKENIZER"] = str(tokenizer)
        else:  # any other value is itself the name given to AutoTokenizer
            text["TOKENIZER"] = str(tokenizer)
    return opt


def load_seem_annotator(cfg: AnnotateConfig, manifest: Manifest) -> SeemAnnotator:
    """Build SEEM from ``cfg.seem_config`` and the checkpoint ``cfg.model`` on the CUDA device
    ``cfg.device`` (made current first)."""
    import torch

    _seem_checkout(cfg.seem_root)  # the checkout first: without it nothing else matters
    conf, ckpt, tokenizer = _check_files(cfg)
    channels, groups = prompt_channels(
        cfg.prompts, manifest.classes, manifest.meta.background_index, NO_OBJECT
    )
    check_prompt_texts(groups)
    device = seem_device(cfg.device)
    build_model, base_model, load_opt, templates = _import_seem(cfg.seem_root)
    opt = seem_options(load_opt([str(conf)]), device, tokenizer)
    torch.cuda.set_device(device)
    try:
        net = build_model(opt)
    except OSError as exc:  # transformers cannot fetch the tokenizer (offline)
        raise UserError(
            f"{conf}: SEEM could not load its text tokenizer ({first_line(exc)}); "
            "set [annotate] seem_tokenizer to a local copy of it (docs/annotate.md)"
        ) from None
    check_prompt_tokens(net.sem_seg_head.predictor.lang_encoder.tokenizer, channels, conf)
    ignored = check_checkpoint(ckpt, net, conf)
    try:
        model = base_model(opt, net).from_pretrained(str(ckpt)).eval()
    except Exception as exc:
        raise UserError(f"{ckpt}: cannot load the SEEM checkpoint ({first_line(exc)})") from None
    extra = {
        "config": conf.name,
        "checkpoint": ckpt.name,
        "checkpoint_tensors_ignored": ignored,
        "prompt_templates": list(templates()),
    }
    return SeemAnnotator(
        model, channels, groups, device, sha256_file(ckpt), cfg.input_short_side, extra
    )
