"""Per-pixel post-processing in torch on the model's GPU, before anything is copied to the host.

Scores become what the cache stores while they are still on the device: float16 scores, or
for top-k images the k most probable classes (uint8) and their probabilities (float16), so
only those cross to the host. With ``resolution = "image"`` the probabilities cross as float32
and are resized and finished on the host (:func:`annotate.cache.finish_image`), with OpenCV's
resize, as the reader resizes.

On a CPU the runner does not use this module: its writer threads compute the same arrays with
numpy (:func:`annotate.cache.encode_image`). Torch's ``exp`` on CUDA differs from numpy's in
the last float32 bit (one reason for cache schema 2); the selection is the same.
"""

from __future__ import annotations

import torch

from annotate.cache import Storage
from annotate.vocab import probabilities


def topk(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable classes per pixel, most probable first; among equal
    probabilities the lowest class index first (the order of a stable descending sort): the
    selection of :func:`annotate.cache.topk_encode`, with torch.

    Each probability becomes a distinct int64 key (its float32 bits, shifted left by 8, over
    255 - class) and ``torch.topk`` takes the k largest; the probabilities are read back from
    the keys exactly.

    Args:
        p: float32 (B, K, ...) probabilities (>= 0), K <= 255.
    Returns:
        (index uint8 (B, k, ...), probability float16 (B, k, ...)) on ``p``'s device.
    """
    num = p.shape[1]
    if num > 255:
        raise ValueError(f"top-k stores class indices as uint8; {num} classes is more than 255")
    shape = (1, num) + (1,) * (p.ndim - 2)
    rank = 255 - torch.arange(num, dtype=torch.int64, device=p.device).view(shape)
    keys = (p.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0
    keys.bitwise_left_shift_(8).bitwise_or_(rank)
    best = torch.topk(keys, min(k, num), dim=1, largest=True, sorted=True).values
    index = (255 - best.bitwise_and(255)).to(torch.uint8)
    prob = best.bitwise_right_shift(8).to(torch.int32).view(torch.float32).to(torch.float16)
    return index, prob


def device_arrays(scores: torch.Tensor, st: Storage) -> dict[str, torch.Tensor]:
    """What leaves the device for a batch (on ``scores``' device, not yet copied), one image
    at a time so that memory stays at one image's probabilities.

    Args:
        scores: float32 (B, K, h, w) scores in the dataset's classes, any memory layout.
        st: how the images are stored.
    Returns:
        "scores" mode: {"scores": float16 (B, K, h, w)}; top-k at the model's resolution:
        {"topk_index": uint8 (B, k, h, w), "topk_prob": float16 (B, k, h, w)}; otherwise
        {"probs": float32 (B, K, h, w)}, finished on the host.
    """
    if st.mode == "scores":
        return {"scores": scores.to(torch.float16)}
    b, num, h, w = scores.shape
    if st.resize:
        return {
            "probs": torch.cat(
                [probabilities(scores[i : i + 1], st.normalization) for i in range(b)]
            )
        }
    dev = scores.device
    index = torch.empty((b, st.k, h, w), dtype=torch.uint8, device=dev)
    prob = torch.empty((b, st.k, h, w), dtype=torch.float16, device=dev)
    for i in range(b):
        index[i : i + 1], prob[i : i + 1] = topk(
            probabilities(scores[i : i + 1], st.normalization), st.k
        )
    return {"topk_index": index, "topk_prob": prob}
