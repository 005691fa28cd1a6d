"""Training speed: the trainer's real loop over a bare PyTorch loop on tensors in memory.

The real loop is :meth:`train.trainer.Trainer.train_stage`, exactly what ``python -m train fit``
runs for Stage I: the DataLoader reading JPEGs and pseudo-label PNGs from disk and augmenting
them with OpenCV in worker processes, the step (poly learning rate, λ, per-iteration seeding,
forward on labeled + unlabeled images, the two masked cross-entropies, backward, optimizer step,
losses summed for logging), one ``metrics.jsonl`` line per step and ``latest.pt`` every
``--save-every`` iterations. The bare loop runs the same model (same initial weights), the same
batches (the same sample positions, normalised and already on the device) and the same crop:
forward, the two cross-entropies, backward, SGD step, nothing else. Target: real / bare <= 1.10.
Each figure is the best of ``--repeats`` alternating measurements, so a busy machine hurts both
alike; CUDA timings are synchronised at both ends. On a CPU-only machine the loader's workers
compete with the model for the cores; ``--threads 1`` on 2 cores leaves the worker a core, as
the host has beside a GPU.

    python bench/train_step.py [--iters 20] [--batch-size 8] [--crop 128] [--workers 1]
    python bench/train_step.py --device cuda --amp --channels-last --arch deeplabv3plus_r101 \\
        --crop 321 --workers 4 --save-every 50       # a GPU machine (UniMatch's VOC setting)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.10
WARM = 3  # iterations before timing: loader start, allocator, cuDNN autotuning


@dataclass(frozen=True)
class Settings:
    """One measurement: model, batch (per stream), crop, loader workers, checkpoint cadence,
    synthetic data (``images`` per split of ``size`` px), device options."""

    iters: int = 20
    batch_size: int = 8
    crop: int = 128
    workers: int = 1
    repeats: int = 3
    save_every: int = 10
    images: int = 64
    size: int = 160
    arch: str = "deeplabv3plus_effl0"
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    threads: int = 0  # torch threads on the CPU; 0 = torch's default (all cores)


def _synthetic_dataset(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """A VOC-layout dataset of ``n`` labeled + ``n`` unlabeled JPEGs with pseudo-label PNGs."""
    import numpy as np
    from PIL import Image

    from data_manifest.io import encode_label_png
    from data_manifest.manifest import Manifest, Meta, Row

    rng = np.random.default_rng(0)
    palette = [[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200]]
    rows, pseudo = [], root / "pseudo"
    for split in ("labeled", "unlabeled", "val"):
        for i in range(n if split != "val" else 1):
            iid = f"{split}_{i:04d}"
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            lab = rng.integers(0, 4, (size // 8, size // 8)).astype(np.uint8)
            lab = np.kron(lab, np.ones((8, 8), np.uint8))
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "img" / f"{iid}.jpg", quality=90)
            label = None
            if split == "unlabeled":
                pseudo.mkdir(parents=True, exist_ok=True)
                (pseudo / f"{iid}.png").write_bytes(encode_label_png(lab, palette))
            else:
                (root / "lab").mkdir(parents=True, exist_ok=True)
                (root / "lab" / f"{iid}.png").write_bytes(encode_label_png(lab, palette))
                label = f"lab/{iid}.png"
            rows.append(Row(iid, f"img/{iid}.jpg", label, split, size, size))
    meta = Meta(dataset="bench", classes=["bg", "a", "b", "c"], palette=palette, background_index=0)
    path = root / "manifest.jsonl"
    Manifest(meta=meta, rows=rows).save(path)
    return path, pseudo


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_real_loop(s: Settings, make_trainer) -> float:
    """Seconds per iteration of ``Trainer.train_stage`` over iterations [WARM, WARM + iters)."""
    trainer = make_trainer()
    trainer.restore(resume=False)
    trainer.train_stage(1, 0, WARM)
    _sync(s.device)
    t0 = time.perf_counter()
    trainer.train_stage(1, WARM, WARM + s.iters)
    _sync(s.device)
    seconds = time.perf_counter() - t0
    trainer.folder.close()
    return seconds / s.iters


def _bare_batches(trainer, s: Settings) -> list[tuple]:
    """The batches of iterations [0, WARM + iters), normalised, on the device: (x, y_l, y_u)."""
    import torch

    from train.inference import normalize

    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    out = []
    for lb, ub in trainer.loader(1, 0, WARM + s.iters):
        x = torch.cat([lb["image"], ub["image"]]).to(trainer.device)
        x = normalize(x, trainer.mean, trainer.std).contiguous(memory_format=fmt)
        out.append((x, lb["label"].to(trainer.device), ub["label"].to(trainer.device)))
    return out


def _time_bare_loop(s: Settings, model0, batches: list[tuple], cfg) -> float:
    """Seconds per iteration of forward + two cross-entropies + backward + SGD step."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(model0).train()
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        [
            {"params": model.backbone_parameters(), "lr": cfg.lr},
            {"params": model.head_parameters(), "lr": cfg.lr * cfg.head_lr_mult},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    cuda = s.device == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and s.amp)
    t0 = 0.0
    for i, (x, y_l, y_u) in enumerate(batches):
        if i == WARM:
            _sync(s.device)
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and s.amp):
            logits = model(x)
        n = y_l.shape[0]
        l_s = F.cross_entropy(logits[:n].float(), y_l, ignore_index=255)
        l_u = F.cross_entropy(logits[n:].float(), y_u, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(0.5 * (l_s + l_u)).backward()
        scaler.step(opt)
        scaler.update()
    _sync(s.device)
    return (time.perf_counter() - t0) / s.iters


def measure(**settings) -> dict:
    """Run the benchmark with :class:`Settings` ``settings``; returns its figures as a dict
    (``ratio`` = real loop / bare loop)."""
    import torch

    from data_manifest.manifest import load
    from train.config import TrainConfig
    from train.trainer import Trainer

    s = Settings(**settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory() as tmp:
        mpath, pseudo = _synthetic_dataset(Path(tmp), s.images, s.size)
        m = load(mpath)
        cfg = TrainConfig(
            arch=s.arch,
            pretrained=False,
            crop=s.crop,
            batch_size=s.batch_size,
            workers=s.workers,
            device=s.device,
            amp=s.amp,
            channels_last=s.channels_last,
            length_unit="iters",
            stage1_length=100 * (WARM + s.iters),  # no stage end (evaluation) while timing
            stage2=False,
            eval_every=10**9,
            save_every=s.save_every,
        )
        runs = iter(range(10**6))

        def make_trainer() -> Trainer:
            out = Path(tmp) / f"run{next(runs)}"
            return Trainer(cfg, m, out=out, pseudo_dir=pseudo, seed=0, show_progress=False)

        first = make_trainer()
        model0 = copy.deepcopy(first.model)
        batches = _bare_batches(first, s)
        del first
        bare_s, real_s = [], []
        for _ in range(s.repeats):  # alternating: a busy machine slows both alike
            bare_s.append(_time_bare_loop(s, model0, batches, cfg))
            real_s.append(_time_real_loop(s, make_trainer))
    ratio = min(real_s) / min(bare_s)
    return {
        "bench": "train_step",
        **asdict(s),
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if s.device == "cuda" else "cpu",
        "real_s_per_step": min(real_s),
        "bare_s_per_step": min(bare_s),
        "real_all": real_s,
        "bare_all": bare_s,
        "ratio": ratio,
        "target": TARGET,
        "ok": ratio <= TARGET,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    names = ("iters", "batch_size", "crop", "workers", "repeats", "save_every", "images", "threads")
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="float16 autocast + grad scaling (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels_last (CUDA)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    a = p.parse_args()
    fields = {k: v for k, v in vars(a).items() if k != "json"}
    r = measure(**fields)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"Stage I step, {r['arch']}, batch {r['batch_size']}+{r['batch_size']}, crop "
        f"{r['crop']}, {r['workers']} worker(s), latest.pt every {r['save_every']} steps, "
        f"{r['device_name']}{', AMP' if r['amp'] else ''}"
        f"{', channels_last' if r['channels_last'] else ''}, {r['threads']} threads"
    )
    print(f"  bare loop (tensors in memory): {r['bare_s_per_step'] * 1000:8.1f} ms/step")
    print(f"  real training loop:            {r['real_s_per_step'] * 1000:8.1f} ms/step")
    print(
        f"  ratio {r['ratio']:.3f} (target <= {TARGET:.2f}): {'OK' if r['ok'] else 'ABOVE TARGET'}"
    )


if __name__ == "__main__":
    main()
