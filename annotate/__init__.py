"""Run a foundation segmentation model over a manifest and cache its per-class scores in Zarr.

Reading a cache needs no model code::

    >>> import annotate
    >>> cache = annotate.open_cache("runs/demo/cache.zarr")
    >>> cache.probs(cache.ids[0]).shape   # (K, H, W) float32
"""

from annotate.cache import Cache, CacheMeta, open_cache

__all__ = ["Cache", "CacheMeta", "open_cache"]
