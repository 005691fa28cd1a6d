"""The training loop: Stage I (ground truth + filtered pseudo-labels), Stage II (self-reliance),
the labeled-only baseline, evaluation, checkpoints, resume and DDP.

Iteration ``it`` (0-based) of a run with ``S1`` Stage I and ``S2`` Stage II iterations:

* Stage I (``it < S1``): L = CE(f(x_l), y_l) + pseudo_weight · CE(f(x_u), ŷ_u), where ŷ_u is the
  calibrated pseudo-label PNG (255 ignored).
* Stage II (``S1 <= it < S1 + S2``): the PNGs are dropped. ŷ_u = argmax of the model's own
  prediction on the weak view (no gradient, eval mode), pixels below ``stage2_threshold``
  ignored; L = (1 − λ(t))·L_s + λ(t)·L_u with t = (it − S1) / S2 and
  λ(t) = lambda0 · exp(−lambda_decay · t). ``stage2_mode = "weak_strong"`` computes L_u on a
  strongly augmented (colour jitter, blur, CutMix) view instead (FixMatch/UniMatch style).
* Labeled-only: L = CE(f(x_l), y_l) for S1 + S2 iterations.

The learning rate follows poly decay over the whole run; the head gets ``head_lr_mult`` × lr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from calibrate.folder import check_complete
from data_manifest.cli_support import console, progress, table
from data_manifest.config import section_dict, write_resolved
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_json, atomic_write_text
from data_manifest.manifest import Manifest, Row
from train import data as tdata
from train.config import TrainConfig
from train.inference import (
    checkpoint_info,
    normalize,
    predict_logits,
    read_checkpoint,
    save_checkpoint,
)
from train.metrics import confusion, summarize
from train.models import NORMALIZATION, build_model

IGNORE = 255
# Keys that may change between a run and its resumption without changing what it computes.
RESUME_FREE_KEYS = {
    "workers",
    "device",
    "out",
    "check_labels",
    "eval_every",
    "eval_mode",
    "eval_crop",
    "eval_stride",
    "save_every",
}


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
        return 1 if it < self.stage1_iters else 2


def make_plan(cfg: TrainConfig, n_labeled: int, n_unlabeled: int, world: int = 1) -> Plan:
    """Turn the configured lengths into iterations.

    An epoch is one pass over the unlabeled split (UniMatch's convention), or over the labeled
    split when there is no unlabeled one, at ``batch_size × accum_steps × world`` images per
    iteration. The labeled-only baseline trains for S1 + S2 iterations, all supervised.
    """
    per_iter = cfg.batch_size * cfg.accum_steps * world
    n = n_unlabeled if n_unlabeled > 0 else n_labeled
    ipe = max(1, math.ceil(n / per_iter))
    unit = ipe if cfg.length_unit == "epochs" else 1
    s1 = cfg.stage1_length * unit
    s2 = cfg.stage2_length * unit if cfg.stage2 else 0
    if cfg.labeled_only:
        s1, s2 = s1 + s2, 0
    eval_every = cfg.eval_every or ipe
    return Plan(ipe, s1, s2, eval_every, cfg.save_every or eval_every)


def lambda_at(t: float, lambda0: float, decay: float) -> float:
    """Stage II weight of the unlabeled loss at progress t ∈ [0, 1]: lambda0 · exp(−decay · t)."""
    return lambda0 * math.exp(-decay * t)


def poly_factor(it: int, total: int, power: float) -> float:
    """Poly learning-rate factor (1 − it/total)^power."""
    return (1.0 - it / max(total, 1)) ** power


def masked_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels (0 when there are none).

    Args:
        logits: (B, K, H, W); target: int64 (B, H, W) with 255 = ignore.
        weight: optional float/bool (B, H, W) per-pixel weight (e.g. a confidence mask).
        denominator: pixel count to divide by (default: the non-ignored pixels).
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    if weight is not None:
        ce = ce * weight.float()
    den = (target != IGNORE).sum() if denominator is None else denominator
    return ce.sum() / den.clamp(min=1)


def cutmix(
    images: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix within a batch: each sample, with probability ``prob``, receives a random box
    (2-40 % of its area, aspect 0.3-3.3) from the next sample in the batch, targets alike.

    Shapes: images (B, 3, H, W); target int64 (B, H, W); weight (B, H, W).
    """
    b, _, h, w = images.shape
    src_images, src_target, src_weight = images, target, weight
    images, target, weight = images.clone(), target.clone(), weight.clone()
    src = torch.roll(torch.arange(b), 1)
    draws = torch.rand((b, 4), generator=gen).tolist()
    for i in range(b):
        use, area, ratio, pos = draws[i]
        if use >= prob or b < 2:
            continue
        area = 0.02 + area * 0.38
        ratio = math.exp(math.log(0.3) + ratio * (math.log(1 / 0.3) - math.log(0.3)))
        bh = min(h, max(1, round(math.sqrt(area * h * w / ratio))))
        bw = min(w, max(1, round(math.sqrt(area * h * w * ratio))))
        top = int(pos * (h - bh + 1)) % (h - bh + 1)
        left = int((pos * 7919) % 1 * (w - bw + 1)) % (w - bw + 1)
        j = int(src[i])
        box = (slice(top, top + bh), slice(left, left + bw))
        images[i, :, box[0], box[1]] = src_images[j, :, box[0], box[1]]
        target[i, box[0], box[1]] = src_target[j, box[0], box[1]]
        weight[i, box[0], box[1]] = src_weight[j, box[0], box[1]]
    return images, target, weight


# -- distributed ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(
                "[train] device = 'cuda': no CUDA device is available; expected 'auto' or 'cpu'"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


# -- evaluation -------------------------------------------------------------------------------
def evaluate_rows(
    model: nn.Module,
    manifest: Manifest,
    rows: list[Row],
    mean: Any,
    std: Any,
    mode: str,
    crop: int,
    stride: int,
    device: torch.device,
    d: Dist = Dist(),
) -> np.ndarray:
    """Confusion matrix int64 (K, K) of ``model`` on ``rows`` (sharded over DDP ranks)."""
    k = manifest.num_classes
    conf = np.zeros((k, k), dtype=np.int64)
    was_training = model.training
    model.eval()
    for row in rows[d.rank :: d.world]:
        image = manifest.read_image(row)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            pred = predict_logits(model, normalize(x, mean, std), mode, crop, stride).argmax(1)
        conf += confusion(pred[0].cpu().numpy(), manifest.read_label(row), k)
    model.train(was_training)
    total = _all_reduce(torch.from_numpy(conf), d)
    return total.numpy()


def print_iou_table(title: str, summary: dict) -> None:
    rows = [[name, "-" if v is None else round(100 * v, 2)] for name, v in summary["iou"].items()]
    rows.append(["mean", round(100 * summary["miou"], 2)])
    console.print(table(title, ["class", "IoU %"], rows))


# -- the run ----------------------------------------------------------------------------------
def _check_inputs(cfg: TrainConfig, manifest: Manifest, pseudo_dir: Path) -> None:
    """Every process checks (so that none waits on a peer that stopped with an error)."""
    labeled, unlabeled = manifest.split("labeled"), manifest.split("unlabeled")
    if not labeled:
        raise UserError(f"{manifest.path}: no images in split 'labeled'; expected at least one")
    if not manifest.split("val"):
        raise UserError(
            f"{manifest.path}: no images in split 'val'; expected at least one to evaluate on"
        )
    if (cfg.uses_pseudo or cfg.uses_unlabeled) and not unlabeled:
        raise UserError(
            f"{manifest.path}: no images in split 'unlabeled'; expected some, or "
            "[train] labeled_only = true"
        )
    tdata.check_labels(manifest, labeled, None, cfg.check_labels)
    tdata.check_labels(manifest, manifest.split("val"), None, cfg.check_labels)
    if cfg.uses_pseudo:
        check_complete(pseudo_dir, [r.id for r in unlabeled], verify=cfg.check_labels)
        tdata.check_labels(manifest, unlabeled, pseudo_dir, cfg.check_labels)


def _pseudo_fingerprint(pseudo_dir: Path) -> str | None:
    """sha256 of ``calibration.json`` beside the pseudo-labels (None when there is none)."""
    path = pseudo_dir / "calibration.json"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncate_metrics(path: Path, upto: int) -> None:
    """Keep the complete lines of ``metrics.jsonl`` with iter <= upto (resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("iter", 0) > upto:
            break
        keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _last_eval(path: Path, it: int, classes: list[str]) -> dict[str, Any] | None:
    """The evaluation logged at iteration ``it`` in ``metrics.jsonl``, if any (resume)."""
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["type"] == "eval" and rec["iter"] == it:
            return {
                "iter": it,
                "miou": rec["miou"],
                "acc": rec["acc"],
                "iou": dict(zip(classes, rec["iou"], strict=True)),
            }
    return None


def _plot(out: Path, metrics_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_manifest.io import atomic_path

    recs = [json.loads(x) for x in metrics_path.read_text(encoding="utf-8").splitlines() if x]
    tr = [r for r in recs if r["type"] == "train"]
    ev = [r for r in recs if r["type"] == "eval"]
    if tr:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        its = np.array([r["iter"] for r in tr])
        loss = np.array([r["loss"] for r in tr])
        win = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
        ax.plot(its, loss, color="0.75", lw=0.8, label="loss")
        if win > 1:
            ax.plot(its[win - 1 :], smooth, color="C0", lw=1.5, label=f"mean of {win}")
        for r in tr:
            if r["stage"] == 2:
                ax.axvline(r["iter"], color="C3", ls="--", lw=1, label="Stage II starts")
                break
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        with atomic_path(out / "loss.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
    if ev:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["iter"] for r in ev], [100 * r["miou"] for r in ev], "o-", color="C2")
        ax.set_xlabel("iteration")
        ax.set_ylabel("val mIoU %")
        fig.tight_layout()
        with atomic_path(out / "miou.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)


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
    configuration, seed and manifest); otherwise any earlier run in ``out`` is replaced.
    """
    d = setup_distributed(
        "cuda"
        if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    device = pick_device(cfg.device, d.local_rank)
    cuda = device.type == "cuda"
    _check_inputs(cfg, manifest, pseudo_dir)
    labeled, unlabeled, val = (manifest.split(s) for s in ("labeled", "unlabeled", "val"))
    plan = make_plan(cfg, len(labeled), len(unlabeled), d.world)
    k, classes = manifest.num_classes, manifest.classes
    mean, std = NORMALIZATION[cfg.arch]
    model_kwargs = dict(cfg.model_kwargs or {})
    cfg_dict = section_dict(cfg)
    latest, metrics_path = out / "latest.pt", out / "metrics.jsonl"

    torch.manual_seed(seed)
    try:
        model = build_model(
            cfg.arch, k, pretrained=cfg.pretrained, weights=cfg.backbone_weights, **model_kwargs
        )
    except (ValueError, OSError) as exc:
        raise UserError(f"[train] backbone_weights = {cfg.backbone_weights!r}: {exc}") from None
    except TypeError as exc:
        raise UserError(f"[train] model_kwargs = {model_kwargs!r}: {exc}") from None
    model.to(device)
    backbone_params = model.backbone_parameters()
    head_params = model.head_parameters()
    opt = torch.optim.SGD(
        [
            {"params": backbone_params, "lr": cfg.lr},
            {"params": head_params, "lr": cfg.lr * cfg.head_lr_mult},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp)

    pseudo_fp = _pseudo_fingerprint(pseudo_dir) if cfg.uses_pseudo else None
    start, best_miou, best_iter = 0, -1.0, -1
    last_eval: dict[str, Any] | None = None
    if resume and latest.is_file():
        ckpt = read_checkpoint(latest)
        state = ckpt.get("train_state")
        if not isinstance(state, dict):
            raise UserError(
                f"{latest}: has no training state; expected a latest.pt written by "
                "python -m train fit"
            )
        old = state.get("config", {})
        for key in sorted(set(old) | set(cfg_dict)):
            if key not in RESUME_FREE_KEYS and old.get(key) != cfg_dict.get(key):
                raise UserError(
                    f"{latest}: [train] {key} = {old.get(key)!r} in the run being "
                    f"resumed but {cfg_dict.get(key)!r} now; expected the same "
                    "value (or --restart, or another --out)"
                )
        if state.get("seed") != seed:
            raise UserError(
                f"{latest}: seed = {state.get('seed')!r} in the run being resumed but "
                f"{seed} now; expected the same seed (or --restart)"
            )
        if state.get("manifest_fingerprint") != manifest.fingerprint:
            raise UserError(
                f"{latest}: the run was trained on another manifest (fingerprint "
                f"differs from {manifest.path}); expected the same dataset"
            )
        if state.get("pseudo_fingerprint") != pseudo_fp:
            raise UserError(
                f"{pseudo_dir / 'calibration.json'}: the pseudo-labels changed since the run in "
                f"{out} began; expected the same ones (or --restart, or another --out)"
            )
        if state.get("world_size") != d.world:
            raise UserError(
                f"{latest}: the run used {state.get('world_size')} processes, now "
                f"{d.world}; expected the same number to resume exactly"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        best_miou, best_iter = float(state["best_miou"]), int(state["best_iter"])
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:
            for name in (
                "metrics.jsonl",
                "latest.pt",
                "best.pt",
                "final.json",
                "loss.png",
                "miou.png",
            ):
                (out / name).unlink(missing_ok=True)
        else:
            _truncate_metrics(metrics_path, start)
            last_eval = _last_eval(metrics_path, start, classes)
        if resolved is not None:
            write_resolved(out / "config.toml", resolved)

    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if d.world > 1:
        if cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if cuda else None
        )
    model.train()

    eval_crop = cfg.eval_crop or cfg.crop
    eval_stride = cfg.eval_stride or max(1, eval_crop * 2 // 3)
    info_base = dict(
        arch=cfg.arch, classes=classes, palette=manifest.palette, model_kwargs=model_kwargs
    )
    metrics_file = open(metrics_path, "a", encoding="utf-8") if d.main else None  # noqa: SIM115

    def log(rec: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec, sort_keys=True) + "\n")
            metrics_file.flush()

    def run_eval(it_done: int) -> None:
        nonlocal best_miou, best_iter, last_eval
        conf = evaluate_rows(
            model, manifest, val, mean, std, cfg.eval_mode, eval_crop, eval_stride, device, d
        )
        summary = summarize(conf, classes)
        last_eval = {"iter": it_done, **summary}
        improved = summary["miou"] > best_miou
        if improved:
            best_miou, best_iter = summary["miou"], it_done
        log(
            {
                "type": "eval",
                "iter": it_done,
                "stage": plan.stage(it_done - 1),
                "miou": summary["miou"],
                "acc": summary["acc"],
                "iou": [summary["iou"][c] for c in classes],
            }
        )
        if d.main:
            if improved:
                save_checkpoint(
                    out / "best.pt",
                    model,
                    checkpoint_info(**info_base, iteration=it_done, miou=summary["miou"]),
                )
            console.print(
                table(
                    f"evaluation at iteration {it_done}/{plan.total}",
                    ["iter", "stage", "mIoU %", "pixel acc %", "best mIoU %"],
                    [
                        [
                            it_done,
                            plan.stage(it_done - 1),
                            round(100 * summary["miou"], 2),
                            round(100 * summary["acc"], 2),
                            round(100 * best_miou, 2),
                        ]
                    ],
                )
            )
            _plot(out, metrics_path)

    def save_latest(it_done: int) -> None:
        if not d.main:
            return
        state = {
            "iteration": it_done,
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "best_miou": best_miou,
            "best_iter": best_iter,
            "config": cfg_dict,
            "seed": seed,
            "manifest_fingerprint": manifest.fingerprint,
            "pseudo_fingerprint": pseudo_fp,
            "world_size": d.world,
        }
        save_checkpoint(
            latest,
            model,
            checkpoint_info(
                **info_base,
                iteration=it_done,
                miou=None if last_eval is None else last_eval["miou"],
            ),
            state,
        )

    try:
        for stage, lo, hi in ((1, 0, plan.stage1_iters), (2, plan.stage1_iters, plan.total)):
            if start >= hi or lo >= hi:
                continue
            _run_stage(
                stage,
                max(lo, start),
                hi,
                cfg,
                plan,
                manifest,
                labeled,
                unlabeled,
                pseudo_dir,
                seed,
                net,
                model,
                opt,
                scaler,
                device,
                d,
                mean,
                std,
                log,
                run_eval,
                save_latest,
                show_progress,
            )
    finally:
        if metrics_file is not None:
            metrics_file.close()

    if last_eval is None or last_eval["iter"] != plan.total:
        run_eval(plan.total)
    last_eval = last_eval or {}
    final = {
        "iterations": plan.total,
        "stage1_iters": plan.stage1_iters,
        "stage2_iters": plan.stage2_iters,
        "miou": last_eval["miou"],
        "acc": last_eval["acc"],
        "iou": last_eval["iou"],
        "best_miou": best_miou,
        "best_iter": best_iter,
        "classes": classes,
        "labeled_only": cfg.labeled_only,
        "eval_mode": cfg.eval_mode,
    }
    if d.main:
        if start < plan.total or not latest.is_file():
            save_latest(plan.total)
        atomic_write_json(out / "final.json", final)
        print_iou_table(f"final per-class IoU on val ({len(val)} images)", last_eval)
    return final


def _run_stage(
    stage: int,
    begin: int,
    end: int,
    cfg: TrainConfig,
    plan: Plan,
    manifest: Manifest,
    labeled: list[Row],
    unlabeled: list[Row],
    pseudo_dir: Path,
    seed: int,
    net: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    d: Dist,
    mean: Any,
    std: Any,
    log: Any,
    run_eval: Any,
    save_latest: Any,
    show_progress: bool,
) -> None:
    weak = tdata.Augment(cfg.crop, cfg.scale_min, cfg.scale_max)
    streams = [tdata.SegDataset(manifest, labeled, "gt", weak, seed, tdata.STREAM_LABELED)]
    if stage == 1 and cfg.uses_pseudo:
        streams.append(
            tdata.SegDataset(
                manifest, unlabeled, "pseudo", weak, seed, tdata.STREAM_UNLABELED, pseudo_dir
            )
        )
    elif stage == 2 and cfg.uses_unlabeled:
        aug = tdata.Augment(
            cfg.crop, cfg.scale_min, cfg.scale_max, strong=cfg.stage2_mode == "weak_strong"
        )
        streams.append(
            tdata.SegDataset(manifest, unlabeled, "none", aug, seed, tdata.STREAM_UNLABELED)
        )
    loader = tdata.make_joint_loader(
        streams, cfg.batch_size, begin, end, cfg.accum_steps, d.rank, d.world, cfg.workers
    )
    batches = iter(loader)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=cuda and cfg.amp)
    mem = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
    base_lrs = [cfg.lr, cfg.lr * cfg.head_lr_mult]
    unit = plan.iters_per_epoch
    bar = progress(disable=not (show_progress and d.main))
    task = None
    t0, n0 = time.perf_counter(), begin
    with bar:
        for it in range(begin, end):
            epoch = it // unit
            if task is None or it % unit == 0:
                if task is not None:
                    bar.remove_task(task)
                n_ep = math.ceil(plan.total / unit)
                task = bar.add_task(
                    f"stage {stage} epoch {epoch + 1}/{n_ep}",
                    rate="",
                    total=min(unit, plan.total - epoch * unit),
                    completed=it - epoch * unit,
                )
            factor = poly_factor(it, plan.total, cfg.poly_power)
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            lam = (
                lambda_at(
                    (it - plan.stage1_iters) / max(plan.stage2_iters, 1),
                    cfg.lambda0,
                    cfg.lambda_decay,
                )
                if stage == 2
                else 0.0
            )
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(3, dtype=torch.float64)
            for a in range(cfg.accum_steps):
                batch = next(batches)
                lb = batch[0]
                ub = batch[1] if len(batch) > 1 else None
                gen = torch.Generator().manual_seed(
                    (seed * 1_000_003 + it * cfg.accum_steps + a) % (2**63)
                )
                sync = a == cfg.accum_steps - 1 or d.world == 1
                ctx = (
                    net.no_sync()
                    if not sync and hasattr(net, "no_sync")
                    else contextlib.nullcontext()
                )
                with ctx:
                    loss, l_s, l_u = _step_loss(
                        stage, net, model, lb, ub, cfg, lam, device, mean, std, mem, amp, gen
                    )
                    scaler.scale(loss / cfg.accum_steps).backward()
                sums += torch.tensor([loss.item(), l_s.item(), l_u.item()], dtype=torch.float64)
            scaler.step(opt)
            scaler.update()
            sums = _all_reduce(sums / cfg.accum_steps, d) / d.world
            it_done = it + 1
            log(
                {
                    "type": "train",
                    "iter": it_done,
                    "stage": stage,
                    "epoch": epoch + 1,
                    "loss": float(sums[0]),
                    "loss_s": float(sums[1]),
                    "loss_u": float(sums[2]),
                    "lr": base_lrs[0] * factor,
                    "lambda": lam,
                }
            )
            rate = (it_done - n0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(
                task,
                advance=1,
                rate=f"loss {float(sums[0]):.3f} lr {base_lrs[0] * factor:.2e} {rate:.2f} it/s",
            )
            evaluated = it_done % plan.eval_every == 0 or it_done == end
            if evaluated:
                run_eval(it_done)
            if evaluated or it_done % plan.save_every == 0:
                save_latest(it_done)
    del loader, batches


def _step_loss(
    stage: int,
    net: nn.Module,
    model: nn.Module,
    lb: dict,
    ub: dict | None,
    cfg: TrainConfig,
    lam: float,
    device: torch.device,
    mean: Any,
    std: Any,
    mem: torch.memory_format,
    amp: Any,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, supervised loss, unlabeled loss) of one micro-batch."""
    nb = device.type == "cuda"
    x_l = normalize(lb["image"].to(device, non_blocking=nb), mean, std)
    y_l = lb["label"].to(device, non_blocking=nb)
    zero = torch.zeros((), device=device)
    if ub is None:
        with amp:
            logits = net(x_l.contiguous(memory_format=mem))
        l_s = masked_ce(logits, y_l)
        return l_s, l_s, zero
    x_u = normalize(ub["image"].to(device, non_blocking=nb), mean, std)
    y_u = ub["label"].to(device, non_blocking=nb)
    n = x_l.shape[0]
    if stage == 1:
        with amp:
            logits = net(torch.cat([x_l, x_u]).contiguous(memory_format=mem))
        l_s, l_u = masked_ce(logits[:n], y_l), masked_ce(logits[n:], y_u)
        return l_s + cfg.pseudo_weight * l_u, l_s, l_u
    # Stage II: the model's own predictions are the targets.
    valid = y_u != IGNORE
    model.eval()
    with torch.no_grad(), amp:
        probs = model(x_u.contiguous(memory_format=mem)).float().softmax(1)
    model.train()
    conf, target = probs.max(1)
    weight = (conf >= cfg.stage2_threshold) & valid
    target = torch.where(valid, target, torch.full_like(target, IGNORE))
    x_in = x_u
    if cfg.stage2_mode == "weak_strong":
        x_in = normalize(ub["strong"].to(device, non_blocking=nb), mean, std)
        x_in, target, weight = cutmix(x_in, target, weight, cfg.cutmix_prob, gen)
    with amp:
        logits = net(torch.cat([x_l, x_in]).contiguous(memory_format=mem))
    l_s = masked_ce(logits[:n], y_l)
    l_u = masked_ce(logits[n:], target, weight, denominator=(target != IGNORE).sum())
    return (1 - lam) * l_s + lam * l_u, l_s, l_u
