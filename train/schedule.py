"""How long a run is and how each iteration is weighted.

* :class:`Plan`: iterations per epoch, per stage, evaluation and checkpoint cadence.
* :func:`poly_factor`: the learning-rate factor (1 − it/total)^power over the whole run.
* :func:`lambda_at` and :func:`unlabeled_weight`: the weight λ of the unlabeled loss in
  L = (1 − λ)·L_s + λ·L_u, the one formula of every iteration:

  - labeled-only baseline: λ = 0 (L = L_s);
  - Stage I: λ = pseudo_weight / (1 + pseudo_weight) (1/2 by default: the mean of the two
    losses, UniMatch's and AllSpark's ``(loss_x + loss_u) / 2``);
  - Stage II: λ(t) = lambda0 · exp(−lambda_decay · t), t = (it − S1) / S2 ∈ [0, 1)
    (lambda_decay 0 for the "fixmatch" and "unimatch" modes unless set: UniMatch's constant
    ``(loss_x + loss_u) / 2``).

  The weights always sum to 1, so the loss scale (and the effective step size) does not jump
  at the Stage I → II switch; with the defaults (pseudo_weight 1, lambda0 0.5) the weights
  themselves are continuous there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from train.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """Iteration counts of a run (all in optimizer steps)."""

    iters_per_epoch: int
    stage1_iters: int
    stage2_iters: int
    eval_every: int
    save_every: int

    @property
    def total(self) -> int:
        return self.stage1_iters + self.stage2_iters

    def stage(self, it: int) -> int:
        """The stage (1 or 2) that iteration ``it`` (0-based) belongs to."""
        return 1 if it < self.stage1_iters else 2

    def segments(self, start: int) -> list[tuple[int, int, int]]:
        """``(stage, begin, end)`` of each stage still to run from iteration ``start``."""
        spans = ((1, 0, self.stage1_iters), (2, self.stage1_iters, self.total))
        return [(s, max(lo, start), hi) for s, lo, hi in spans if lo < hi and start < hi]

    def evaluates_after(self, it_done: int) -> bool:
        """Evaluate after ``it_done`` iterations: every ``eval_every`` and at each stage's end."""
        return it_done % self.eval_every == 0 or it_done in (self.stage1_iters, self.total)

    def saves_after(self, it_done: int) -> bool:
        """Write latest.pt after ``it_done`` iterations (also after every evaluation)."""
        return it_done % self.save_every == 0 or self.evaluates_after(it_done)


def make_plan(cfg: TrainConfig, n_labeled: int, n_unlabeled: int, world: int = 1) -> Plan:
    """Turn the configured lengths into iterations.

    An epoch is one pass over the unlabeled split (UniMatch's ``unimatch.py`` convention) in
    whole iterations, as UniMatch's loaders count it (``DistributedSampler`` then
    ``drop_last=True``): ⌊⌈N / world⌉ / (batch_size × accum_steps)⌋, at least 1.

    The labeled-only baseline follows UniMatch's ``supervised.py`` instead: its epochs are passes
    over the *labeled* split, and it trains ``stage1_length + stage2_length`` of them (VOC:
    60 + 20 = 80 epochs, UniMatch's ``epochs: 80`` in ``configs/pascal.yaml``; 92 labeled
    images, 2 per GPU on 4 GPUs: ⌊23 / 2⌋ = 11 iterations per epoch, 880 in all). With
    ``length_unit = "iters"`` both train ``stage1_length + stage2_length`` iterations.

    Samples are a continuous stream (:mod:`train.data`): the images an epoch leaves out start
    the next one instead of being skipped.
    """
    n = n_unlabeled if n_unlabeled > 0 and not cfg.labeled_only else n_labeled
    ipe = max(1, math.ceil(n / world) // (cfg.batch_size * cfg.accum_steps))
    unit = ipe if cfg.length_unit == "epochs" else 1
    s1 = cfg.stage1_length * unit
    s2 = cfg.stage2_length * unit if cfg.stage2 else 0
    if cfg.labeled_only:
        s1, s2 = s1 + s2, 0
    eval_every = cfg.eval_every or ipe
    return Plan(ipe, s1, s2, eval_every, cfg.save_every or eval_every)


def poly_factor(it: int, total: int, power: float) -> float:
    """Poly learning-rate factor (1 − it/total)^power."""
    return (1.0 - it / max(total, 1)) ** power


def lambda_at(t: float, lambda0: float, decay: float) -> float:
    """Stage II weight of the unlabeled loss at progress t ∈ [0, 1]: lambda0 · exp(−decay · t)."""
    return lambda0 * math.exp(-decay * t)


def unlabeled_weight(cfg: TrainConfig, plan: Plan, it: int) -> float:
    """λ of iteration ``it`` (0-based) in L = (1 − λ)·L_s + λ·L_u (see the module docstring)."""
    if plan.stage(it) == 2:
        t = (it - plan.stage1_iters) / max(plan.stage2_iters, 1)
        return lambda_at(t, cfg.lambda0, cfg.lambda_decay)
    if not cfg.uses_pseudo:
        return 0.0
    return cfg.pseudo_weight / (1.0 + cfg.pseudo_weight)
