"""The losses of one micro-batch, per kind of iteration: each function reads top to bottom as
the upstream step it follows, and returns ``L_s`` and ``L_u`` (the trainer weighs them with λ).

| function | iteration | follows |
|---|---|---|
| :func:`supervised` | labeled-only baseline | UniMatch's ``supervised.py`` |
| :func:`pseudo_labels` | Stage I | ground truth + calibrated pseudo-label PNGs |
| :func:`self_training` | Stage II, ``stage2_mode = "self"`` | this project's self-reliance |
| :func:`fixmatch` | Stage II, ``"fixmatch"`` | UniMatch's ``fixmatch.py`` |
| :func:`unimatch` | Stage II, ``"unimatch"`` | UniMatch's ``unimatch.py`` |

Arguments common to all: ``net`` is what gradients flow through (the model or its DDP
wrapper), ``model`` the bare model (forward passes without gradient), ``x_l`` float32
(B, 3, H, W) normalised labeled images, ``y_l`` int64 (B, H, W) labels (255 ignored),
``autocast`` a factory of the step's autocast context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from train.augment import IGNORE, paste
from train.losses import Targets, confident_ce, masked_ce, mix_targets, predicted_targets

Autocast = Callable[[], contextlib.AbstractContextManager]

# Strong views (each with its own CutMix box) that the unlabeled stream carries, per mode.
STRONG_VIEWS = {"self": 0, "fixmatch": 1, "unimatch": 2}
# unimatch.py's weights of the strong views and of the feature-perturbed weak view in L_u
UNIMATCH_WEIGHTS = {"s1": 0.25, "s2": 0.25, "fp": 0.5}


@dataclass
class Unlabeled:
    """One unlabeled micro-batch on the device.

    ``image`` float32 (B, 3, H, W): the normalised weak view; ``label`` int64 (B, H, W): the
    pseudo-label PNG in Stage I, in Stage II 0 on the image and 255 on padding; ``strong``:
    normalised strong views, float32 (B, 3, H, W) each; ``box``: bool (B, H, W) CutMix box
    of each strong view.
    """

    image: torch.Tensor
    label: torch.Tensor
    strong: list[torch.Tensor] = field(default_factory=list)
    box: list[torch.Tensor] = field(default_factory=list)

    @property
    def valid(self) -> torch.Tensor:
        """bool (B, H, W): pixels of the image (not padding)."""
        return self.label != IGNORE


@dataclass
class StepLoss:
    """``loss_s``, ``loss_u``: float32 scalars; ``mask_ratio``: the fraction of the weak
    view's valid pixels confident enough to count (Stage II; None otherwise); ``parts``: the
    terms of ``loss_u``; ``targets``: the targets each term used (for tests and inspection)."""

    loss_s: torch.Tensor
    loss_u: torch.Tensor
    mask_ratio: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, Targets] = field(default_factory=dict)


def supervised(
    net: nn.Module, x_l: torch.Tensor, y_l: torch.Tensor, autocast: Autocast
) -> StepLoss:
    """The labeled-only baseline: CE on the labeled batch; ``loss_u`` is 0."""
    with autocast():
        logits = net(x_l)
    return StepLoss(masked_ce(logits, y_l), torch.zeros((), device=x_l.device))


def pseudo_labels(
    net: nn.Module, x_l: torch.Tensor, y_l: torch.Tensor, u: Unlabeled, autocast: Autocast
) -> StepLoss:
    """Stage I: one forward pass over labeled and unlabeled images; CE on the labels and on
    the pseudo-labels (255 ignored)."""
    n = x_l.shape[0]
    with autocast():
        logits = net(torch.cat([x_l, u.image]))
    return StepLoss(masked_ce(logits[:n], y_l), masked_ce(logits[n:], u.label))


@torch.no_grad()
def _eval_targets(
    model: nn.Module, x: torch.Tensor, valid: torch.Tensor, autocast: Autocast
) -> Targets:
    """The model's targets for ``x`` in eval mode (running batch-norm statistics, no dropout);
    the model is left in training mode."""
    model.eval()
    with autocast():
        logits = model(x)
    model.train()
    return predicted_targets(logits, valid)


def self_training(
    net: nn.Module,
    model: nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    u: Unlabeled,
    threshold: float,
    autocast: Autocast,
) -> StepLoss:
    """Stage II self-reliance: the targets are the model's own argmax on the same view in eval
    mode; the loss is on the training forward pass over labeled and unlabeled images together.
    Pixels below ``threshold`` count 0 (divided by all valid pixels, as UniMatch's loss)."""
    t = _eval_targets(model, u.image, u.valid, autocast)
    n = x_l.shape[0]
    with autocast():
        logits = net(torch.cat([x_l, u.image]))
    l_u = confident_ce(logits[n:], t, threshold)
    return StepLoss(masked_ce(logits[:n], y_l), l_u, t.mask_ratio(threshold), {"u": l_u}, {"u": t})


def fixmatch(
    net: nn.Module,
    model: nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    u: Unlabeled,
    mix: Unlabeled,
    threshold: float,
    autocast: Autocast,
) -> StepLoss:
    """FixMatch as UniMatch's ``fixmatch.py`` runs it.

    The CutMix source batch ``mix`` is predicted in eval mode without gradient; its strong
    view is pasted into the strong view inside the box; the weak view goes through the
    training forward pass together with the labeled batch, and its argmax (detached) is the
    target, with the source's targets inside the box; the strong view has a forward pass of
    its own. ``L_u`` = :func:`~train.losses.confident_ce` on the strong view.
    """
    source = _eval_targets(model, mix.image, mix.valid, autocast)
    x_s = paste(u.strong[0], mix.strong[0], u.box[0])
    n, m = x_l.shape[0], u.image.shape[0]
    with autocast():
        logits_x, logits_w = net(torch.cat([x_l, u.image])).split([n, m])
        logits_s = net(x_s)
    t = predicted_targets(logits_w, u.valid)
    t_s = mix_targets(t, source, u.box[0])
    l_u = confident_ce(logits_s, t_s, threshold)
    return StepLoss(
        masked_ce(logits_x, y_l), l_u, t.mask_ratio(threshold), {"s1": l_u}, {"w": t, "s1": t_s}
    )


def unimatch(
    net: nn.Module,
    model: nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    u: Unlabeled,
    mix: Unlabeled,
    threshold: float,
    autocast: Autocast,
) -> StepLoss:
    """UniMatch's step (``unimatch.py``): as :func:`fixmatch`, with two strong views (each its
    own CutMix box from the source batch's matching view) in one forward pass, and the weak
    view's feature perturbation (``net(x, need_fp=True)``: the decoder on dropped-out features)
    trained towards the weak view's own targets.
    ``L_u`` = 0.25·CE(s1) + 0.25·CE(s2) + 0.5·CE(fp), each a :func:`~train.losses.confident_ce`.
    """
    source = _eval_targets(model, mix.image, mix.valid, autocast)
    x_s1 = paste(u.strong[0], mix.strong[0], u.box[0])
    x_s2 = paste(u.strong[1], mix.strong[1], u.box[1])
    n, m = x_l.shape[0], u.image.shape[0]
    with autocast():
        preds, preds_fp = net(torch.cat([x_l, u.image]), need_fp=True)
        logits_x, logits_w = preds.split([n, m])
        logits_fp = preds_fp[n:]
        logits_s1, logits_s2 = net(torch.cat([x_s1, x_s2])).chunk(2)
    t = predicted_targets(logits_w, u.valid)
    t1, t2 = mix_targets(t, source, u.box[0]), mix_targets(t, source, u.box[1])
    parts = {
        "s1": confident_ce(logits_s1, t1, threshold),
        "s2": confident_ce(logits_s2, t2, threshold),
        "fp": confident_ce(logits_fp, t, threshold),
    }
    l_u = sum(UNIMATCH_WEIGHTS[k] * parts[k] for k in ("s1", "s2", "fp"))
    targets = {"w": t, "s1": t1, "s2": t2}
    return StepLoss(masked_ce(logits_x, y_l), l_u, t.mask_ratio(threshold), parts, targets)
