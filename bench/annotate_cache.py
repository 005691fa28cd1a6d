"""Cache size and fidelity: bytes on disk per unlabeled image against float32 full-resolution
logits, and how many pseudo-label pixels come out identical to the full-precision path.

One run of the annotator over the demo target's labeled and unlabeled images writes the cache
(float16 scores for labeled images, top-k float16 probabilities for unlabeled ones); the same
forward passes also give the full-precision probabilities (float32, in memory). q̂ is computed
once, exactly, from the labeled images' full-precision probabilities (LAC score 1 − p_y,
α = 0.05) and then held fixed; pseudo-labels are made from both paths with the LAC rule
(prediction set {j : 1 − p_j ≤ q̂}, empty → ignore, most probable class in the set, foreground
preferred over background) and with the plain argmax. Targets: size ratio ≤ 1/8, identical
pixels ≥ 99.9 %. It measures top-k storage (k = 2 by default, as `--topk 2`); annotate's own
default at the demo's K = 7 is full scores (``annotate.config.auto_topk``), whose size is
reported too (``size_ratio_labeled_full_scores``: the labeled images' bytes, stored that way).

    python bench/annotate_cache.py [--images 100] [--topk 2] [--alpha 0.05]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _annotate_common import annotator_checkpoint, demo_manifest  # noqa: E402

SIZE_TARGET = 1 / 8
IDENTICAL_TARGET = 0.999


def lac_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ⌈(n+1)(1−α)⌉-th smallest score (1.0 when that rank exceeds n), exactly."""
    n = scores.size
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return 1.0
    return float(np.partition(scores, rank - 1)[rank - 1])


def lac_labels(p: np.ndarray, qhat: float, background: int | None) -> np.ndarray:
    """Pseudo-labels uint8 (H, W) from probabilities (K, H, W) by the LAC rule."""
    in_set = (1.0 - p) <= qhat
    masked = np.where(in_set, p, -1.0)
    label = masked.argmax(axis=0).astype(np.uint8)
    if background is not None:
        fg = np.delete(masked, background, axis=0)
        fg_idx = np.delete(np.arange(p.shape[0]), background)[fg.argmax(axis=0)]
        has_fg = fg.max(axis=0) >= 0
        label = np.where((label == background) & has_fg, fg_idx, label).astype(np.uint8)
    label[~in_set.any(axis=0)] = 255
    return label


def measure(
    images: int = 100,
    topk: int = 2,
    alpha: float = 0.05,
    batch_size: int = 8,
    device: str = "auto",
) -> dict:
    """Run the benchmark; returns its figures as a dict."""
    import torch

    from annotate import open_cache
    from annotate.annotators import build_annotator
    from annotate.cache import resize_chw
    from annotate.config import AnnotateConfig
    from annotate.run import run_annotation, select_device
    from data_manifest.manifest import Manifest

    full = demo_manifest()
    rows = full.split("labeled") + full.split("unlabeled")[:images]
    m = Manifest(meta=full.meta, rows=rows, path=full.path)
    bg = m.meta.background_index
    k_classes = len(m.classes)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, desc = annotator_checkpoint(m.classes, m.palette, Path(tmp))
        cfg = AnnotateConfig(
            annotator="torch",
            model=str(ckpt),
            batch_size=batch_size,
            device=device,
            splits=("labeled", "unlabeled"),
            topk=topk,
        )
        ann = build_annotator(cfg, m)
        run_annotation(cfg, m, Path(tmp) / "cache.zarr", annotator=ann)
        cache = open_cache(Path(tmp) / "cache.zarr")
        dev = select_device(device)

        def full_probs(row) -> np.ndarray:
            x = torch.from_numpy(m.read_image(row)).permute(2, 0, 1)[None].to(dev)
            with torch.inference_mode():
                logits = ann.predict(x).float()
            p = torch.softmax(logits, dim=1)[0].cpu().numpy()
            return resize_chw(p, row.height, row.width)

        cal = []
        for row in m.split("labeled"):
            y = m.read_label(row)
            p = full_probs(row)
            keep = y != 255
            cal.append(1.0 - np.take_along_axis(p, np.where(keep, y, 0)[None], 0)[0][keep])
        qhat = lac_quantile(np.concatenate(cal), alpha)
        same_lac = same_arg = pixels = 0
        cache_bytes = logit_bytes = 0
        kept_full = kept_cache = 0
        for row in m.split("unlabeled"):
            pf, pc = full_probs(row), cache.probs(row.id)
            lf, lc = lac_labels(pf, qhat, bg), lac_labels(pc, qhat, bg)
            same_lac += int((lf == lc).sum())
            same_arg += int((pf.argmax(0) == pc.argmax(0)).sum())
            kept_full += int((lf != 255).sum())
            kept_cache += int((lc != 255).sum())
            pixels += lf.size
            cache_bytes += cache.nbytes_on_disk(row.id)
            logit_bytes += 4 * k_classes * row.height * row.width
        labeled_bytes = sum(cache.nbytes_on_disk(r.id) for r in m.split("labeled"))
        labeled_logits = sum(4 * k_classes * r.height * r.width for r in m.split("labeled"))
        n_unl = len(m.split("unlabeled"))
        result = {
            "bench": "annotate_cache",
            "model": desc,
            "images_unlabeled": n_unl,
            "images_labeled": len(m.split("labeled")),
            "classes": k_classes,
            "topk": cache.meta.topk,
            "resolution": cache.meta.resolution,
            "alpha": alpha,
            "qhat": qhat,
            "bytes_per_image": cache_bytes / n_unl,
            "float32_logit_bytes_per_image": logit_bytes / n_unl,
            "size_ratio": cache_bytes / logit_bytes,
            "size_ratio_labeled_full_scores": labeled_bytes / labeled_logits,
            "identical_lac": same_lac / pixels,
            "identical_argmax": same_arg / pixels,
            "kept_fraction_full": kept_full / pixels,
            "kept_fraction_cache": kept_cache / pixels,
        }
    result["ok"] = (
        result["size_ratio"] <= SIZE_TARGET and result["identical_lac"] >= IDENTICAL_TARGET
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument(
        "--topk",
        type=int,
        default=2,
        help="k of the top-k storage measured (-1: annotate's auto, 0: full scores)",
    )
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    r = measure(a.images, a.topk, a.alpha, device=a.device)
    print(json.dumps(r, indent=2))
    print(
        f"cache bytes / float32 logits = {r['size_ratio']:.4f} (target <= 1/8 = 0.125), "
        f"identical pseudo-labels: LAC {100 * r['identical_lac']:.3f} %, argmax "
        f"{100 * r['identical_argmax']:.3f} % (target >= 99.9 %), top-k k = {r['topk']}"
    )


if __name__ == "__main__":
    main()
