"""SegFormer (Xie et al., 2021), the paper's MiT-B5 backbone, through transformers (``[hf]``).

The network is transformers' ``SegformerForSemanticSegmentation`` (MiT encoder + all-MLP
decoder); this module only loads it from a local folder and upsamples its logits, which come at
1/4 of the input resolution, to the input size (bilinear, ``align_corners=False``, as
transformers' own loss and AllSpark's decoder do). ImageNet weights: download ``nvidia/mit-b5``
once and point ``backbone_weights`` at the folder::

    from transformers import SegformerForImageClassification
    SegformerForImageClassification.from_pretrained("nvidia/mit-b5").save_pretrained("mit-b5")

Such a folder holds the encoder only: the decoder head starts from random weights (with
``num_classes`` outputs), as in AllSpark and transformers' fine-tuning examples.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HF_EXTRA_HINT = "transformers is not installed; expected the [hf] extra (pip install '.[hf]')"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(HF_EXTRA_HINT) from None
    return transformers


@contextlib.contextmanager
def _quiet_loading(transformers: Any) -> Iterator[None]:
    """No loading report or progress bar: the trainer reports missing encoder keys itself."""
    log = transformers.utils.logging
    verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bar:
            log.enable_progress_bar()


class SegFormer(nn.Module):
    """``SegformerForSemanticSegmentation`` returning logits at input resolution.

    Parameters: ``model.segformer.*`` (the MiT encoder: ``backbone_parameters``) and
    ``model.decode_head.*`` (``head_parameters``, which the trainer gives ``head_lr_mult`` × lr).

    Forward: float32 (B, 3, H, W) ImageNet-normalised images → logits float32 (B, K, H, W).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(model.config.num_labels)
        self.build_kwargs: dict[str, Any] = {"config": _plain_config(model.config)}

    def forward(
        self, x: torch.Tensor, need_fp: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, H, W); with ``need_fp`` the pair ``(logits, logits_fp)``: UniMatch's
        feature perturbation on the features the decoder reads (here all four encoder stages,
        each after channel dropout p 0.5 in stage order), decoded together with the clean
        features in one pass, as UniMatch's DeepLabV3+ does with its two."""
        if not need_fp:
            logits = self.model(pixel_values=x).logits  # (B, K, ceil(H/4), ceil(W/4))
            return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        hidden = self.model.segformer(pixel_values=x, output_hidden_states=True).hidden_states
        feats = [torch.cat([h, F.dropout2d(h, 0.5, training=True)]) for h in hidden]
        logits = self.model.decode_head(feats)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return tuple(logits.chunk(2))  # type: ignore[return-value]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.model.decode_head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.model.segformer.parameters())


def _plain_config(config: Any) -> dict[str, Any]:
    """The model config as plain values (checkpoint ``info``), without the folder path."""
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return d


def build_segformer(
    num_classes: int,
    pretrained: bool = True,
    weights: str | os.PathLike = "",
    config: dict[str, Any] | None = None,
) -> SegFormer:
    """SegFormer with ``num_classes`` outputs.

    Args:
        pretrained: load the encoder weights of the folder ``weights``; False builds random
            weights of the folder's (or ``config``'s) architecture.
        weights: a folder written by ``save_pretrained`` (``config.json`` + weights), e.g. of
            ``nvidia/mit-b5``; read with ``local_files_only`` (never the network).
        config: a ``SegformerConfig`` as a dict (what checkpoints store to rebuild the model).

    Raises:
        ImportError: transformers is not installed (names the [hf] extra).
        ValueError: no such folder, no config.json in it, or its weights leave encoder keys
            missing or of another shape (another model).
    """
    tf = _transformers()
    if config is not None and not pretrained:
        cfg = tf.SegformerConfig.from_dict({**config, "num_labels": num_classes})
        return SegFormer(tf.SegformerForSemanticSegmentation(cfg))
    folder = Path(weights) if weights else None
    if folder is None:
        raise ValueError(
            "arch 'segformer' needs backbone_weights = a folder written by save_pretrained "
            "(e.g. of nvidia/mit-b5)"
        )
    if not folder.is_dir():
        raise ValueError(
            "folder not found; expected a folder written by save_pretrained (e.g. of nvidia/mit-b5)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            "no config.json in the folder; expected a folder written by save_pretrained"
        )
    if not pretrained:
        cfg = tf.SegformerConfig.from_pretrained(folder, num_labels=num_classes)
        return SegFormer(tf.SegformerForSemanticSegmentation(cfg))
    with _quiet_loading(tf):
        model, report = tf.SegformerForSemanticSegmentation.from_pretrained(
            folder,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            local_files_only=True,
            output_loading_info=True,
        )
    # Only the decoder may start from random weights (the classifier for another class count).
    unfit = set(report["missing_keys"]) | {m[0] for m in report.get("mismatched_keys", [])}
    encoder = sorted(k for k in unfit if k.startswith("segformer."))
    if encoder:
        raise ValueError(
            f"the folder's weights leave {len(encoder)} encoder keys missing or of another "
            f"shape (first: {encoder[0]}); expected a SegFormer/MiT checkpoint"
        )
    return SegFormer(model.float())
