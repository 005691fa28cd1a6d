"""The training loop: :class:`Trainer` holds a run's state; :func:`fit` is the entry point.

A run is the labeled-only baseline, Stage I (ground truth + the calibrated pseudo-label PNGs),
and/or Stage II (the model's own predictions on the unlabeled images: ``stage2_mode`` "self",
"fixmatch" or "unimatch"). Every iteration computes L = (1 − λ)·L_s + λ·L_u; λ and the
learning rate come from :mod:`train.schedule`, L_s and L_u from :mod:`train.steps` (one
function per kind of iteration, each read against the upstream file it follows). One
iteration (:meth:`Trainer.train_step`):

    lr ← base_lr · poly(it); λ ← unlabeled_weight(it); torch's generator ← (seed, it, rank)
    for each of accum_steps micro-batches:
        (labeled batch, unlabeled batch, CutMix source batch) from the loader
        L_s, L_u ← steps.<kind of iteration>(...)
        backward(((1 − λ)·L_s + λ·L_u) / accum_steps)
    optimizer step; log the mean losses over micro-batches and processes

Evaluation (:mod:`train.evaluation`) runs every ``eval_every`` iterations and at the end of
each stage; ``latest.pt`` is written at the checkpoint cadence and after every evaluation
(:mod:`train.run_folder`). Sampling, augmentation and every random draw of a step are functions
of (seed, position) or (seed, iteration), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from data_manifest.cli_support import console, progress, table
from data_manifest.config import section_dict
from data_manifest.errors import UserError
from data_manifest.manifest import Manifest
from train import data as tdata
from train import steps
from train.augment import Augment
from train.checkpoint import checkpoint_info
from train.config import TrainConfig
from train.distributed import (
    all_reduce_sum,
    broadcast_object,
    device_type,
    pick_device,
    setup_distributed,
    sync_buffers,
    teardown_distributed,
    wrap_model,
)
from train.evaluation import EvalSettings, evaluate_rows, print_iou_table
from train.inference import normalize
from train.losses import mixed_loss
from train.metrics import summarize
from train.models import NORMALIZATION, build_model
from train.run_folder import RunFolder, RunIdentity, pseudo_fingerprint, train_state
from train.schedule import make_plan, poly_factor, unlabeled_weight

Batch = dict[str, torch.Tensor]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Two parameter groups, backbone (``lr``) and head (``lr × head_lr_mult``), as UniMatch
    and AllSpark; each remembers its ``base_lr`` for the poly schedule.

    ``optimizer = "sgd"``: momentum and weight decay from the config. ``"adamw"``: AdamW with
    betas (0.9, 0.999) and the configured weight decay (SegFormer's own recipe; docs/train.md).
    """
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.lr, "base_lr": cfg.lr},
        {
            "params": model.head_parameters(),
            "lr": cfg.lr * cfg.head_lr_mult,
            "base_lr": cfg.lr * cfg.head_lr_mult,
        },
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _build(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The configured model; build errors become one-line UserErrors naming the key."""
    kwargs = dict(cfg.model_kwargs or {})
    try:
        return build_model(
            cfg.arch, num_classes, pretrained=cfg.pretrained, weights=cfg.backbone_weights, **kwargs
        )
    except ImportError as exc:
        raise UserError(f"[train] arch = {cfg.arch!r}: {exc}") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"[train] backbone_weights = {cfg.backbone_weights!r}: {exc}") from None
    except TypeError as exc:
        raise UserError(f"[train] model_kwargs = {kwargs!r}: {exc}") from None


def _check_single_image_passes(cfg: TrainConfig, device: torch.device, world: int) -> None:
    """DeepLabV3+'s image pooling ends in a batch norm over a 1x1 map, which needs more than one
    image per training forward pass (or SyncBatchNorm across processes, as UniMatch runs it).
    The labeled-only baseline and FixMatch's strong view pass ``batch_size`` images alone.

    Raises:
        UserError: ``batch_size = 1`` where such a pass would hold one image.
    """
    alone = cfg.labeled_only or (cfg.uses_unlabeled and cfg.stage2_mode == "fixmatch")
    synced = device.type == "cuda" and world > 1
    if alone and cfg.batch_size == 1 and not synced and cfg.arch.startswith("deeplabv3plus"):
        what = "the labeled-only baseline" if cfg.labeled_only else "fixmatch's strong view"
        raise UserError(
            f"[train] batch_size = 1: {what} passes one image through DeepLabV3+, whose "
            "image-pooling batch norm needs two or more; expected batch_size >= 2, or "
            "torchrun on several GPUs (SyncBatchNorm pools their images)"
        )


class Trainer:
    """One training run and all of its state, as attributes.

    Set up once: ``cfg``, ``manifest``, ``dist`` (rank, world), ``device``, ``plan``
    (iterations), ``model`` (the bare model), ``net`` (what the step trains through: ``model``
    or its DDP wrapper), ``optimizer``, ``scaler`` (AMP), ``folder`` (the run folder) and
    ``identity`` (what a resumed run must share). Counters, saved in ``latest.pt``:
    ``iteration`` (done), ``best_miou``, ``best_iter``, and ``last_eval`` (the latest
    evaluation, restored from ``metrics.jsonl`` on resume).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        manifest: Manifest,
        *,
        out: Path,
        pseudo_dir: Path,
        seed: int,
        resolved: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg, self.manifest, self.seed = cfg, manifest, seed
        self.pseudo_dir = Path(pseudo_dir)
        self.resolved, self.show_progress = resolved, show_progress
        self.dist = setup_distributed(device_type(cfg.device))
        self.device = pick_device(cfg.device, self.dist.local_rank)
        tdata.check_inputs(cfg, manifest, self.pseudo_dir)
        _check_single_image_passes(cfg, self.device, self.dist.world)
        self.labeled, self.unlabeled, self.val = (
            manifest.split(s) for s in ("labeled", "unlabeled", "val")
        )
        self.plan = make_plan(cfg, len(self.labeled), len(self.unlabeled), self.dist.world)
        self.mean, self.std = NORMALIZATION[cfg.arch]
        eval_crop = cfg.eval_crop or cfg.crop
        self.eval_settings = EvalSettings(
            self.mean,
            self.std,
            cfg.eval_mode,
            eval_crop,
            cfg.eval_stride or max(1, eval_crop * 2 // 3),
        )
        torch.manual_seed(seed)
        # train mode: transformers' from_pretrained returns a model in eval mode
        self.model = _build(cfg, manifest.num_classes).to(self.device).train()
        self.net: nn.Module = self.model
        self.optimizer = make_optimizer(cfg, self.model)
        cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp)
        self.memory_format = (
            torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
        )
        self.folder = RunFolder(Path(out), writer=self.dist.main)
        self.identity = RunIdentity(
            config=section_dict(cfg),
            seed=seed,
            manifest_fingerprint=manifest.fingerprint,
            pseudo_fingerprint=pseudo_fingerprint(self.pseudo_dir) if cfg.uses_pseudo else None,
            world_size=self.dist.world,
        )
        self.iteration, self.best_miou, self.best_iter = 0, -1.0, -1
        self.last_eval: dict[str, Any] | None = None

    # -- the run ------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict[str, Any]:
        """Train from where the run folder stands to the end; returns the final figures (also
        in ``final.json``). ``resume`` False starts again, replacing an earlier run."""
        self.restore(resume)
        if self.memory_format is torch.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net, self.model = wrap_model(self.model, self.dist, self.device)
        self.model.train()
        try:
            for stage, begin, end in self.plan.segments(self.iteration):
                self.train_stage(stage, begin, end)
            if self.last_eval is None or self.last_eval["iter"] != self.plan.total:
                self.evaluate()  # a finished run whose last evaluation was not logged
                self.save_latest()
        finally:
            self.folder.close()
        return self.finish()

    def restore(self, resume: bool) -> None:
        """Continue from ``latest.pt`` (checked to be the same run) or start afresh; every
        process ends with the same counters and last evaluation as rank 0."""
        ckpt = None
        if resume:
            ckpt = self.folder.resume_checkpoint(
                self.identity, Path(self.manifest.path), self.pseudo_dir
            )
        if ckpt is not None:
            state = ckpt["train_state"]
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.iteration = int(state["iteration"])
            self.best_miou, self.best_iter = float(state["best_miou"]), int(state["best_iter"])
        self.folder.prepare(self.iteration, self.resolved)
        if self.iteration > 0:
            last = None
            if self.dist.main:  # rank 0 has just cut metrics.jsonl back to the checkpoint
                last = self.folder.last_eval(self.iteration, self.manifest.classes)
            self.last_eval = broadcast_object(last, self.dist)

    def train_stage(self, stage: int, begin: int, end: int) -> None:
        """Iterations ``[begin, end)`` of ``stage`` with the real input pipeline, logging,
        evaluation and checkpoint cadence (what a run does between two stage boundaries)."""
        loader = self.loader(stage, begin, end)
        batches = iter(loader)
        with _EpochBar(self.plan.iters_per_epoch, self.plan.total, stage, self._bar_on()) as bar:
            for it in range(begin, end):
                record = self.train_step(it, batches)
                self.folder.log(record)
                self.iteration = it + 1
                bar.advance(it, record)
                if self.plan.evaluates_after(self.iteration):
                    self.evaluate()
                if self.plan.saves_after(self.iteration):
                    self.save_latest()
        del batches, loader

    def loader(self, stage: int, begin: int, end: int) -> DataLoader:
        """The input pipeline of iterations ``[begin, end)`` of ``stage`` for this process:
        ``accum_steps`` tuples per iteration of one batch dict per stream (labeled first)."""
        return tdata.make_joint_loader(
            self._streams(stage),
            self.cfg.batch_size,
            begin,
            end,
            self.cfg.accum_steps,
            self.dist.rank,
            self.dist.world,
            self.cfg.workers,
        )

    # -- one iteration ------------------------------------------------------------------------
    def train_step(self, it: int, batches: Any) -> dict[str, Any]:
        """Iteration ``it`` (0-based) on the next ``accum_steps`` batches; returns its
        ``metrics.jsonl`` record (losses averaged over micro-batches and processes; in Stage
        II also ``mask_ratio``, the confident fraction of the unlabeled pixels)."""
        cfg, plan = self.cfg, self.plan
        factor = poly_factor(it, plan.total, cfg.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        lam = unlabeled_weight(cfg, plan, it)
        # Dropout, drop path (SegFormer) and feature perturbation (UniMatch) draw from torch's
        # generator: seed it per iteration.
        step_seed = np.random.SeedSequence([self.seed, it, self.dist.rank]).generate_state(1)
        torch.manual_seed(int(step_seed[0]))
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for a in range(cfg.accum_steps):
            last = a == cfg.accum_steps - 1
            sync = (
                contextlib.nullcontext() if last or self.net is self.model else self.net.no_sync()
            )
            with sync:
                out = self.micro_batch_loss(plan.stage(it), next(batches))
                loss = mixed_loss(out.loss_s, out.loss_u, lam)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            ratio = out.mask_ratio if out.mask_ratio is not None else torch.zeros(())
            sums += torch.stack([loss, out.loss_s, out.loss_u, ratio.to(loss)]).detach().double()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        total = all_reduce_sum(sums, self.dist) / (cfg.accum_steps * self.dist.world)
        loss, l_s, l_u, ratio = total.tolist()
        record = {
            "type": "train",
            "iter": it + 1,
            "stage": plan.stage(it),
            "epoch": it // plan.iters_per_epoch + 1,
            "loss": loss,
            "loss_s": l_s,
            "loss_u": l_u,
            "lr": self.optimizer.param_groups[0]["lr"],
            "lambda": lam,
        }
        if plan.stage(it) == 2 and not cfg.labeled_only:
            record["mask_ratio"] = ratio
        return record

    def micro_batch_loss(self, stage: int, batches: tuple[Batch, ...]) -> steps.StepLoss:
        """L_s and L_u of one micro-batch (float32 scalars on the device).

        ``batches``: one batch dict per stream from the loader (:meth:`loader`): labeled
        (``image`` uint8 (B, 3, crop, crop), ``label`` int64 (B, crop, crop)); then, unless
        labeled-only, unlabeled (the same, plus ``strong`` uint8 (B, k, 3, crop, crop) and
        ``box`` bool (B, k, crop, crop) in the "fixmatch"/"unimatch" modes); then in those
        modes the CutMix source batch (the same images, augmented again).
        """
        lb, *rest = batches
        x_l, y_l = self._images(lb["image"]), self._to_device(lb["label"])
        if not rest:
            return steps.supervised(self.net, x_l, y_l, self._autocast)
        u = self._unlabeled(rest[0])
        if stage == 1:
            return steps.pseudo_labels(self.net, x_l, y_l, u, self._autocast)
        mode, threshold = self.cfg.stage2_mode, float(self.cfg.stage2_threshold or 0.0)
        if mode == "self":
            return steps.self_training(self.net, self.model, x_l, y_l, u, threshold, self._autocast)
        step = steps.fixmatch if mode == "fixmatch" else steps.unimatch
        mix = self._unlabeled(rest[1])
        return step(self.net, self.model, x_l, y_l, u, mix, threshold, self._autocast)

    # -- evaluation, checkpoints, the end -----------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Evaluate on val after ``iteration`` iterations: log it, keep ``best.pt``, print a
        table and redraw the plots (rank 0). Returns the summary (miou, acc, iou)."""
        it = self.iteration
        sync_buffers(self.model, self.dist)
        conf = evaluate_rows(
            self.model, self.manifest, self.val, self.eval_settings, self.device, self.dist
        )
        summary = summarize(conf, self.manifest.classes)
        self.last_eval = {"iter": it, **summary}
        improved = summary["miou"] > self.best_miou
        if improved:
            self.best_miou, self.best_iter = summary["miou"], it
        stage = self.plan.stage(it - 1)
        self.folder.log(
            {
                "type": "eval",
                "iter": it,
                "stage": stage,
                "miou": summary["miou"],
                "acc": summary["acc"],
                "iou": [summary["iou"][c] for c in self.manifest.classes],
            }
        )
        if improved:
            self.folder.save("best.pt", self.model, self._info(summary["miou"]))
        if self.dist.main:
            percent = [round(100 * v, 2) for v in (summary["miou"], summary["acc"], self.best_miou)]
            console.print(
                table(
                    f"evaluation at iteration {it}/{self.plan.total}",
                    ["iter", "stage", "mIoU %", "pixel acc %", "best mIoU %"],
                    [[it, stage, *percent]],
                )
            )
            self.folder.plot()
        return summary

    def save_latest(self) -> None:
        """Write ``latest.pt``: the model, the optimizer and the counters (rank 0)."""
        counters = {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "best_miou": self.best_miou,
            "best_iter": self.best_iter,
        }
        miou = None if self.last_eval is None else self.last_eval["miou"]
        self.folder.save(
            "latest.pt", self.model, self._info(miou), train_state(self.identity, counters)
        )

    def finish(self) -> dict[str, Any]:
        """Write ``final.json`` and print the per-class table (rank 0); returns the figures."""
        last = self.last_eval or {}
        final = {
            "iterations": self.plan.total,
            "stage1_iters": self.plan.stage1_iters,
            "stage2_iters": self.plan.stage2_iters,
            "miou": last["miou"],
            "acc": last["acc"],
            "iou": last["iou"],
            "best_miou": self.best_miou,
            "best_iter": self.best_iter,
            "classes": self.manifest.classes,
            "labeled_only": self.cfg.labeled_only,
            "eval_mode": self.cfg.eval_mode,
        }
        self.folder.write_final(final)
        if self.dist.main:
            print_iou_table(f"final per-class IoU on val ({len(self.val)} images)", last)
        return final

    # -- small helpers ------------------------------------------------------------------------
    def _streams(self, stage: int) -> list[tdata.SegDataset]:
        """The datasets read together in ``stage``: labeled, and the unlabeled stream with its
        pseudo-labels (Stage I) or without targets (Stage II: with the mode's strong views and
        CutMix boxes, then the CutMix source: the same positions, augmented again)."""
        cfg, m = self.cfg, self.manifest
        weak = Augment(cfg.crop, cfg.scale_min, cfg.scale_max)
        streams = [tdata.SegDataset(m, self.labeled, "gt", weak, self.seed, tdata.STREAM_LABELED)]
        if stage == 1 and cfg.uses_pseudo:
            streams.append(
                tdata.SegDataset(
                    m,
                    self.unlabeled,
                    "pseudo",
                    weak,
                    self.seed,
                    tdata.STREAM_UNLABELED,
                    self.pseudo_dir,
                )
            )
        elif stage == 2 and cfg.uses_unlabeled:
            views = steps.STRONG_VIEWS[cfg.stage2_mode]
            aug = Augment(cfg.crop, cfg.scale_min, cfg.scale_max, views, cfg.cutmix_prob)
            for draw in range(2 if views else 1):
                streams.append(
                    tdata.SegDataset(
                        m, self.unlabeled, "none", aug, self.seed, tdata.STREAM_UNLABELED, draw=draw
                    )
                )
        return streams

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the host → normalised float32 on the device."""
        x = normalize(self._to_device(images), self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.device.type == "cuda")

    def _unlabeled(self, batch: Batch) -> steps.Unlabeled:
        """An unlabeled batch dict from the loader → :class:`train.steps.Unlabeled`."""
        strong, box = batch.get("strong"), batch.get("box")
        k = 0 if strong is None else strong.shape[1]
        return steps.Unlabeled(
            self._images(batch["image"]),
            self._to_device(batch["label"]),
            [self._images(strong[:, j]) for j in range(k)],  # type: ignore[index]
            [self._to_device(box[:, j]) for j in range(k)],  # type: ignore[index]
        )

    def _autocast(self) -> torch.autocast:
        enabled = self.device.type == "cuda" and self.cfg.amp
        return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)

    def _info(self, miou: float | None) -> dict[str, Any]:
        return checkpoint_info(
            self.cfg.arch,
            self.manifest.classes,
            self.manifest.palette,
            self.model.build_kwargs,
            iteration=self.iteration,
            miou=miou,
        )

    def _bar_on(self) -> bool:
        return self.show_progress and self.dist.main


class _EpochBar:
    """A progress bar with one task per epoch (loss, lr, rate and ETA)."""

    def __init__(self, iters_per_epoch: int, total: int, stage: int, enabled: bool) -> None:
        self.unit, self.total, self.stage = iters_per_epoch, total, stage
        self.bar = progress(disable=not enabled)
        self.task: Any = None
        self.t0, self.n = time.perf_counter(), 0

    def __enter__(self) -> _EpochBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def advance(self, it: int, record: dict[str, Any]) -> None:
        epoch = it // self.unit
        if self.task is None or it % self.unit == 0:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                f"stage {self.stage} epoch {epoch + 1}/{-(-self.total // self.unit)}",
                rate="",
                total=min(self.unit, self.total - epoch * self.unit),
                completed=it - epoch * self.unit,
            )
        self.n += 1
        rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
        text = f"loss {record['loss']:.3f} lr {record['lr']:.2e} {rate:.2f} it/s"
        self.bar.update(self.task, advance=1, rate=text)


def fit(
    cfg: TrainConfig,
    *,
    manifest: Manifest,
    out: Path,
    pseudo_dir: Path,
    seed: int,
    resume: bool = True,
    resolved: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final summary (also written to ``out/final.json``).

    ``resume`` continues from ``out/latest.pt`` when it exists (the run must have the same
    configuration, seed, manifest, pseudo-labels and process count); otherwise any earlier run
    in ``out`` is replaced.
    """
    trainer = Trainer(
        cfg,
        manifest,
        out=out,
        pseudo_dir=pseudo_dir,
        seed=seed,
        resolved=resolved,
        show_progress=show_progress,
    )
    try:
        return trainer.fit(resume)
    finally:
        teardown_distributed(trainer.dist)
