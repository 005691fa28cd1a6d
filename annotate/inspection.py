"""Look into a cache: a summary of what it holds, and a picture of one image's annotation."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from annotate.cache import Cache, open_cache
from data_manifest.config import load_config, run_dir
from data_manifest.errors import UserError
from data_manifest.io import atomic_path, colorize


def find_cache(path: str | os.PathLike) -> Cache:
    """Open a cache given the cache folder, a run folder holding ``cache.zarr``, or a run
    config (its ``[annotate] cache``, else ``{run_dir}/cache.zarr``)."""
    p = Path(path)
    if (p / "zarr.json").is_file():
        return open_cache(p)
    if (p / "cache.zarr" / "zarr.json").is_file():
        return open_cache(p / "cache.zarr")
    if p.is_file() and p.suffix == ".toml":
        cfg = load_config(p)
        cache = cfg.get("annotate", {}).get("cache") or run_dir(cfg) / "cache.zarr"
        return open_cache(cache)
    raise UserError(
        f"{p}: not a cache, a run folder with cache.zarr, or a run config; expected "
        "one of these (run `python -m annotate run` first)"
    )


def summarize(cache: Cache, limit: int | None = None) -> dict[str, Any]:
    """Figures about a cache.

    Returns:
        images, classes, modes (count per storage mode), bytes_on_disk, bytes_per_image,
        per_class: for each class the share of pixels where it is the annotator's argmax and
        the mean top probability over those pixels (over the first ``limit`` images if given),
        and damaged: ``{"id", "file", "reason"}`` per image whose data is incomplete (every
        image's file sizes are checked, and the images read are decoded in full).
    """
    ids = cache.ids
    k = cache.num_classes
    modes: Counter[str] = Counter()
    pix = np.zeros(k, dtype=np.int64)
    top_sum = np.zeros(k, dtype=np.float64)
    seen = ids if limit is None else ids[:limit]
    damaged = {d[0]: d for d in cache.damaged(ids)}
    for image_id in seen:
        if image_id in damaged:
            continue
        try:
            p = cache.probs(image_id)
        except UserError:  # a chunk that does not decode: name its file
            found = cache.damaged([image_id], full=True)
            if not found:
                raise
            damaged[image_id] = found[0]
            continue
        modes[cache.info(image_id)["mode"]] += 1
        arg = p.argmax(axis=0).ravel()
        top = p.max(axis=0).ravel()
        pix += np.bincount(arg, minlength=k)
        top_sum += np.bincount(arg, weights=top, minlength=k)
    size = cache.nbytes_on_disk()
    total = max(int(pix.sum()), 1)
    per_class = [
        {
            "class": c,
            "pixel_share": float(pix[j] / total),
            "mean_top_prob": float(top_sum[j] / pix[j]) if pix[j] else None,
        }
        for j, c in enumerate(cache.classes)
    ]
    return {
        "cache": str(cache.path),
        "images": len(ids),
        "images_read": sum(i not in damaged for i in seen),
        "classes": cache.classes,
        "annotator": cache.meta.annotator,
        "model_sha256": cache.meta.model_sha256,
        "normalization": cache.meta.normalization,
        "resolution": cache.meta.resolution,
        "topk": cache.meta.topk,
        "modes": dict(modes),
        "bytes_on_disk": size,
        "bytes_per_image": size / len(ids) if ids else 0.0,
        "per_class": per_class,
        "damaged": [{"id": i, "file": f, "reason": r} for i, f, r in sorted(damaged.values())],
    }


def report_prefix(cache_path: str | os.PathLike) -> str:
    """The name (without suffix) of the resolved config and report written beside a cache:
    ``annotate`` beside ``cache.zarr`` (a run folder's cache), ``<cache name>.annotate``
    beside any other, so that several caches in one folder keep their own reports."""
    name = Path(cache_path).name
    return "annotate" if name == "cache.zarr" else f"{name}.annotate"


def recorded_manifest(cache: Cache) -> str:
    """The manifest a cache was made from, as far as its folder tells: ``[data] manifest`` of
    the resolved config that ``annotate run`` writes beside the cache (:func:`report_prefix`),
    else the path older caches stored in their metadata ("" when neither is there)."""
    resolved = cache.path.parent / f"{report_prefix(cache.path)}.toml"
    if resolved.is_file():
        with contextlib.suppress(UserError):
            path = load_config(resolved).get("data", {}).get("manifest", "")
            if isinstance(path, str) and path:
                return path
    return str(cache.meta.extra.get("manifest") or "")


def _manifest_for(cache: Cache, manifest: str | os.PathLike | None) -> Any:
    import data_manifest

    path = manifest or recorded_manifest(cache)
    if not path or not Path(path).is_file():
        where = f"{str(path)!r} named beside the cache" if path else "it was made from"
        raise UserError(
            f"{cache.path}: the manifest {where} is not available; expected --manifest PATH"
        )
    m = data_manifest.load(path)
    if m.fingerprint != cache.meta.manifest_fingerprint:
        raise UserError(
            f"{path}: manifest fingerprint {m.fingerprint[:12]} differs from the "
            f"cache's {cache.meta.manifest_fingerprint[:12]}; expected the manifest "
            "the cache was made from"
        )
    return m


def render_show(
    cache: Cache, image_id: str, out: str | os.PathLike, manifest: str | os.PathLike | None = None
) -> Path:
    """Write a PNG: the image | the annotator's argmax in the dataset palette | its top
    probability as a heat map. Returns the written path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _manifest_for(cache, manifest)
    if image_id not in cache:
        raise UserError(
            f"{cache.path}: image {image_id!r} is not in the cache; expected one of "
            f"{', '.join(repr(i) for i in cache.ids[:5])}{', ...' if len(cache) > 5 else ''}"
        )
    image = m.read_image(m.row(image_id))
    p = cache.probs(image_id)
    arg = p.argmax(axis=0).astype(np.uint8)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), constrained_layout=True)
    axes[0].imshow(image)
    axes[0].set_title(f"image {image_id}")
    axes[1].imshow(colorize(arg, m.palette), interpolation="nearest")
    axes[1].set_title(f"argmax ({cache.meta.annotator})")
    present = [int(c) for c in np.unique(arg)]
    handles = [
        matplotlib.patches.Patch(color=np.asarray(m.palette[c]) / 255.0, label=m.classes[c])
        for c in present
    ]
    axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    hm = axes[2].imshow(p.max(axis=0), cmap="magma", vmin=0.0, vmax=1.0)
    axes[2].set_title("top probability")
    fig.colorbar(hm, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
