"""The logit cache: a Zarr v3 group of per-class annotator scores, one subgroup per image.

This module is the cache's reader *and* writer; it imports no model code (no torch), so the
calibrate stage and notebooks can use it cheaply::

    >>> import annotate
    >>> cache = annotate.open_cache("runs/demo/cache.zarr")
    >>> cache.ids[:3], cache.classes
    >>> p = cache.probs(cache.ids[0])      # float32 (K, H, W), sums to 1 over K
    >>> cache.argmax(cache.ids[0])         # uint8 (H, W)

Layout (schema 2; schema 1 has the same layout and is read the same way)::

    cache.zarr/zarr.json                root group; attributes below
    cache.zarr/images/im-<quoted id>/   one group per image, attributes {id, height, width, mode}
        scores      float16 (K, h, w)   mode "scores": raw scores, see `normalization`;
                                        mode "probs": probabilities (resolution = "image")
        topk_index  uint8   (k, h, w)   mode "topk": indices of the k most probable classes
        topk_prob   float16 (k, h, w)   mode "topk": their probabilities

Root attributes: ``schema``, ``classes``, ``annotator`` (name), ``model_sha256``,
``manifest_fingerprint``, ``normalization`` (how ``scores`` become probabilities: "softmax",
"sum" or "probs"), ``resolution`` ("native" or "image"), ``topk`` (k for unlabeled images, 0 =
off) and ``extra`` (free-form annotator details).

An image's group is written under a temporary name and renamed into place, so an image is
present exactly when all its data is. The root metadata is created once, atomically, and never
changed afterwards; writers only add image groups, each image by exactly one writer.

Schema 2 has schema 1's layout; its probabilities may differ in the last bits: a run on a GPU
computes them there with torch (:mod:`annotate.postprocess`), whose ``exp`` differs from
numpy's, and a run on a CPU with numpy on contiguous blocks of rows (:func:`encode_image`),
which sums over classes in another order than schema 1 did for channels-last scores. Both
schemas are read; images are added to schema-2 caches only, so that a resumed cache never
mixes two computations.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

import cv2
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.storage import MemoryStore

from data_manifest.errors import UserError

SCHEMA = 2
READ_SCHEMAS = (1, 2)
NORMALIZATIONS = ("softmax", "sum", "probs")
_PREFIX = "im-"
_TMP = ".tmp-"
# zstd's frame checksum (xxhash64 of the content, checked by every decoder) makes a changed
# bit in a chunk an error instead of wrong scores
_COMPRESSORS = (ZstdCodec(level=3, checksum=True),)
_ZSTD = Zstd(level=3, checksum=True)  # the same encoder as _COMPRESSORS


@dataclass(frozen=True)
class CacheMeta:
    """Root metadata of a cache. Two runs may share a cache only when these are equal."""

    classes: tuple[str, ...]
    annotator: str
    model_sha256: str
    manifest_fingerprint: str
    normalization: Literal["softmax", "sum", "probs"]
    resolution: Literal["native", "image"] = "native"
    topk: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    schema: int = SCHEMA

    def to_attrs(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> CacheMeta:
        if attrs.get("schema") not in READ_SCHEMAS:
            raise UserError(
                f"{where}: cache schema is {attrs.get('schema')!r}; this version "
                f"reads schemas {', '.join(map(str, READ_SCHEMAS))}"
            )
        try:
            d = {k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs}
            d["classes"] = tuple(d["classes"])
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{where}: cache metadata is incomplete ({exc})") from None


def image_key(image_id: str) -> str:
    """Group name for an image id (ids may contain '/', e.g. Cityscapes' city folders)."""
    return _PREFIX + quote(image_id, safe="")


def _key_to_id(key: str) -> str:
    return unquote(key[len(_PREFIX) :])


def to_probs(scores: np.ndarray, normalization: str) -> np.ndarray:
    """Turn scores (K, ...) into float32 probabilities over axis 0.

    softmax: logits; sum: non-negative scores divided by their per-pixel sum (a pixel whose
    scores are all zero gets a uniform distribution); probs: renormalised against rounding.
    """
    s = scores.astype(np.float32, copy=False)
    if normalization == "softmax":
        e = np.subtract(s, s.max(axis=0, keepdims=True))
        np.exp(e, out=e)
        e /= e.sum(axis=0, keepdims=True)
        return e
    if normalization in ("sum", "probs"):
        s = np.maximum(s, 0.0)
        total = s.sum(axis=0, keepdims=True)
        k = s.shape[0]
        return np.where(total > 0, s / np.where(total > 0, total, 1.0), np.float32(1.0 / k))
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")


def resize_chw(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (C, h, w) float array to (C, height, width) (align_corners=False)."""
    if a.shape[1:] == (height, width):
        return a
    hwc = np.ascontiguousarray(np.moveaxis(a, 0, -1))
    chunks = [
        cv2.resize(hwc[..., i : i + 256], (width, height), interpolation=cv2.INTER_LINEAR)
        for i in range(0, hwc.shape[-1], 256)
    ]
    out = np.concatenate([c[..., None] if c.ndim == 2 else c for c in chunks], axis=-1)
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def topk_encode(probs: np.ndarray, k: int, block: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable classes per pixel, most probable first; among equal probabilities
    the lowest class index first (the order of a stable descending sort).

    k passes over ``block`` pixels at a time (a block's rows stay in the CPU cache): the
    largest probability m, the first class j holding it (the largest K - j over the classes
    equal to m, in uint8), then that class set below every probability. The stored values are
    the maxima themselves, so they are exact.

    Args:
        probs: float32 (K, h, w) probabilities, K <= 255.
    Returns:
        (index uint8 (k, h, w), prob float16 (k, h, w)); a pixel with NaN probabilities gets
        NaN and indices in range.
    """
    num = probs.shape[0]
    k = min(k, num)
    if num > 255:
        raise ValueError(f"top-k stores class indices as uint8; {num} classes is more than 255")
    flat = probs.reshape(num, -1)
    n = flat.shape[1]
    index = np.empty((k, n), np.uint8)
    prob = np.empty((k, n), np.float16)
    down = np.arange(num, 0, -1, dtype=np.uint8)[:, None]  # K - j
    for a in range(0, n, block):
        b = min(a + block, n)
        work = np.array(flat[:, a:b], dtype=np.float32)  # a copy, overwritten below
        equal = np.empty(work.shape, bool)
        first = np.empty(work.shape, np.uint8)
        cols = np.arange(b - a)
        for r in range(k):
            best = work.max(axis=0)
            np.multiply(np.equal(work, best, out=equal), down, out=first)
            j = np.minimum(num - first.max(axis=0), num - 1)
            index[r, a:b], prob[r, a:b] = j, best
            if r + 1 < k:
                work[j, cols] = -1.0
    return index.reshape(k, *probs.shape[1:]), prob.reshape(k, *probs.shape[1:])


def topk_decode(index: np.ndarray, prob: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse of :func:`topk_encode`: the remaining mass is spread evenly over other classes.

    Returns:
        float32 (K, h, w).
    """
    p = prob.astype(np.float32)
    k = p.shape[0]
    for r in range(1, k):  # keep the stored order when float16 rounding made a tie: each rank
        p[r] = np.minimum(p[r], np.nextafter(p[r - 1], np.float32(0)))  # 1 ulp below the last
    rest = np.clip(1.0 - p.sum(axis=0), 0.0, None)
    fill = rest / max(num_classes - k, 1) if num_classes > k else np.zeros_like(rest)
    out = np.broadcast_to(fill, (num_classes, *p.shape[1:])).copy()
    np.put_along_axis(out, index.astype(np.int64), p, axis=0)
    if num_classes == k:
        out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-12)
    return out


@dataclass(frozen=True)
class Storage:
    """How an image is stored.

    Attributes:
        mode: "scores" (float16 raw scores at the model's resolution), "probs" (float16
            probabilities at image resolution) or "topk" (uint8 indices + float16
            probabilities of the k most probable classes).
        classes: K, the dataset's classes.
        k: k of "topk" (0 otherwise).
        normalization: how the scores become probabilities ("softmax", "sum", "probs").
        resize: probabilities are resized to the image's resolution before they are stored.
    """

    mode: Literal["scores", "probs", "topk"]
    classes: int
    k: int
    normalization: str
    resize: bool


def storage_for(meta: CacheMeta, topk: bool) -> Storage:
    """The storage of an image in a cache with ``meta``; ``topk``: the image may use top-k
    (unlabeled images). Top-k applies when ``0 < meta.topk < K``."""
    num = len(meta.classes)
    use_topk = topk and 0 < meta.topk < num
    resize = meta.resolution == "image"
    mode = "topk" if use_topk else ("probs" if resize else "scores")
    return Storage(mode, num, meta.topk if use_topk else 0, meta.normalization, resize)


def encode_image(scores: np.ndarray, st: Storage, height: int, width: int) -> dict[str, np.ndarray]:
    """The arrays stored for one image, computed on the host with numpy (a run on a CPU).

    Probabilities are computed on contiguous blocks of rows (up to 32768 pixels), which keeps
    a block in the CPU cache whatever the memory layout of the scores (convolutions on a CPU
    often leave them channels-last), and makes the result independent of that layout.

    Args:
        scores: float32 (K, h, w) scores in the dataset's classes at the model's resolution.
        st: how the image is stored.
        height, width: the image's own resolution.
    Returns:
        {"scores": float16 (K, h, w)}, {"scores": float16 (K, height, width)} (mode "probs"),
        or {"topk_index": uint8 (k, ., .), "topk_prob": float16 (k, ., .)}.
    """
    if st.mode == "scores":
        return {"scores": scores.astype(np.float16)}
    num, h, w = scores.shape
    step = max(1, 32768 // w)
    blocks = [slice(r, min(r + step, h)) for r in range(0, h, step)]
    if st.resize:
        p = np.empty((num, h, w), np.float32)
        for rows in blocks:
            p[:, rows] = to_probs(np.ascontiguousarray(scores[:, rows]), st.normalization)
        return finish_image({"probs": p}, st, height, width)
    index = np.empty((st.k, h, w), np.uint8)
    prob = np.empty((st.k, h, w), np.float16)
    for rows in blocks:
        block = to_probs(np.ascontiguousarray(scores[:, rows]), st.normalization)
        index[:, rows], prob[:, rows] = topk_encode(block, st.k)
    return {"topk_index": index, "topk_prob": prob}


def finish_image(
    arrays: dict[str, np.ndarray], st: Storage, height: int, width: int
) -> dict[str, np.ndarray]:
    """The arrays stored for one image from its float32 (K, h, w) ``probs`` (resized to the
    image's resolution first when ``st.resize``), or its stored arrays unchanged."""
    if "probs" not in arrays:
        return arrays
    p = arrays["probs"]
    if st.resize:
        p = resize_chw(p, height, width)
    if st.mode == "topk":
        index, prob = topk_encode(p, st.k)
        return {"topk_index": index, "topk_prob": prob}
    return {"scores": p.astype(np.float16)}


_ARRAY_META: dict[tuple[tuple[int, ...], str], bytes] = {}
_ARRAY_META_LOCK = threading.Lock()


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """zarr.json of a one-chunk array of this shape and dtype, made once by zarr itself."""
    key = (tuple(shape), dtype.str)
    with _ARRAY_META_LOCK:
        if key not in _ARRAY_META:
            files: dict[str, Any] = {}
            g = zarr.open_group(MemoryStore(store_dict=files), mode="w")
            g.create_array("a", shape=shape, dtype=dtype, chunks=shape, compressors=_COMPRESSORS)
            _ARRAY_META[key] = files["a/zarr.json"].to_bytes()
        return _ARRAY_META[key]


def encode_group(arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> dict[str, bytes]:
    """The files of a Zarr v3 group holding ``arrays`` (one chunk each), by relative key.

    The bytes are those zarr writes (metadata made by zarr, chunks encoded with the same
    bytes + zstd codecs), produced without zarr's asynchronous store machinery, which costs
    several times more than the encoding itself for small groups. The group's attributes are
    ``attrs`` plus ``chunk_bytes``: the size of each array's chunk file, by array name, so that
    a missing, emptied or truncated chunk is found without reading it (:meth:`Cache.damaged`).
    """
    files: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        files[f"{name}/zarr.json"] = _array_metadata(a.shape, a.dtype)
        chunk = _ZSTD.encode(a)  # releases the GIL
        files[f"{name}/c/" + "/".join("0" * a.ndim)] = chunk
        sizes[name] = len(chunk)
    meta = GroupMetadata(attributes={**attrs, "chunk_bytes": sizes})
    return {
        "zarr.json": meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    } | files


_ARRAY_NAMES = ("scores", "topk_index", "topk_prob")


def image_attrs(image_id: str, height: int, width: int, mode: str) -> dict[str, Any]:
    """The attributes of an image's group."""
    return {"id": image_id, "height": int(height), "width": int(width), "mode": mode}


class _NotSimple(Exception):
    """An array stored in a layout other than one zstd-compressed chunk."""


class _Damaged(Exception):
    """A file of an image group is missing or unreadable: ``args`` = (file, reason)."""


_MODE_ARRAYS = {"scores": ("scores",), "probs": ("scores",), "topk": ("topk_index", "topk_prob")}


def _chunk_key(ndim: int) -> str:
    return "c/" + "/".join("0" * ndim)


def _read_single_chunk(folder: Path, strict: bool) -> np.ndarray:
    """Read a one-chunk Zarr v3 array (bytes [+ zstd] codecs) from its files.

    ``strict``: the group recorded its chunk sizes (:func:`encode_group`, which always writes
    every chunk), so a missing chunk is damage; in a group without the record (written by an
    earlier version, or by zarr itself) a missing chunk reads as zarr reads it, all fill value.

    Raises:
        _Damaged: the chunk is missing (``strict``), or does not decode to the array's size
            (truncated, emptied or changed: zstd checks its checksum).
        _NotSimple: another layout (read it through zarr).
    """
    meta = _read_json(folder / "zarr.json")
    shape = tuple(meta["shape"])
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    codecs = [c["name"] for c in meta.get("codecs", [])]
    sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    endian = next(
        (
            c.get("configuration", {}).get("endian", "little")
            for c in meta.get("codecs", [])
            if c["name"] == "bytes"
        ),
        "little",
    )
    if (
        tuple(grid or ()) != shape
        or codecs not in (["bytes", "zstd"], ["bytes"])
        or meta.get("chunk_key_encoding", {}).get("name") != "default"
        or sep != "/"
        or endian != "little"
        or meta.get("storage_transformers")
    ):
        raise _NotSimple
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    chunk = folder.joinpath("c", *("0" * len(shape)))
    if not chunk.is_file():
        if strict:
            raise _Damaged(chunk, "chunk file missing")
        return np.full(shape, meta.get("fill_value", 0), dtype=dtype.newbyteorder("="))
    raw = chunk.read_bytes()
    if codecs[-1] == "zstd":
        try:
            raw = _ZSTD.decode(raw)
        except RuntimeError as exc:  # numcodecs' message: "Zstd decompression error: ..."
            raise _Damaged(chunk, str(exc).removeprefix("Zstd decompression error: ")) from None
    want = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != want:
        raise _Damaged(chunk, f"holds {len(raw)} bytes of data, expected {want}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _Damaged(path, "file missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Damaged(path, f"not valid JSON ({exc})") from None


def _check_sizes(d: Path) -> None:
    """The cheap check of one image group ``d`` (see :meth:`Cache.damaged`).

    Raises:
        _Damaged: the first file missing, unreadable or of the wrong size.
    """
    attrs = _read_json(d / "zarr.json").get("attributes")
    if not isinstance(attrs, dict) or attrs.get("mode") not in _MODE_ARRAYS:
        raise _Damaged(d / "zarr.json", "no image attributes (mode)")
    sizes = attrs.get("chunk_bytes")
    for name in _MODE_ARRAYS[attrs["mode"]]:
        shape = _read_json(d / name / "zarr.json").get("shape")
        if not isinstance(shape, list):
            raise _Damaged(d / name / "zarr.json", "no shape")
        chunk = d / name / _chunk_key(len(shape))
        try:
            size = chunk.stat().st_size
        except FileNotFoundError:
            if sizes is None:  # no record: maybe a chunk zarr never wrote (all fill value)
                continue
            raise _Damaged(chunk, "chunk file missing") from None
        want = sizes.get(name) if isinstance(sizes, dict) else None
        if (want is not None and size != want) or size == 0:
            expected = f"{want} bytes" if want is not None else "data"
            raise _Damaged(chunk, f"chunk file holds {size} bytes, expected {expected}")


class Cache:
    """Read access to a cache. Cheap to create; safe to use from several threads or processes.

    Attributes:
        path: the cache folder.
        meta: its :class:`CacheMeta`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(
                f"{self.path}: not a cache (no zarr.json); run `python -m annotate run` first"
            )
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:
            raise UserError(f"{self.path}: cannot open cache ({exc})") from None
        self.meta = CacheMeta.from_attrs(dict(group.attrs), str(self.path))

    # -- listing ---------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    @property
    def ids(self) -> list[str]:
        """Ids of the complete images, sorted."""
        d = self.path / "images"
        if not d.is_dir():
            return []
        return sorted(_key_to_id(n) for n in os.listdir(d) if n.startswith(_PREFIX))

    def __contains__(self, image_id: object) -> bool:
        return (
            isinstance(image_id, str)
            and (self.path / "images" / image_key(image_id) / "zarr.json").is_file()
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    # -- per image -------------------------------------------------------------------------
    def _group(self, image_id: str) -> zarr.Group:
        if image_id not in self:
            raise UserError(f"{self.path}: image {image_id!r} is not in the cache")
        return zarr.open_group(str(self.path / "images" / image_key(image_id)), mode="r")

    def info(self, image_id: str) -> dict[str, Any]:
        """Per-image attributes: id, height, width (image resolution), mode.

        mode is "scores" (raw scores), "probs" (probabilities) or "topk" (top-k probabilities).
        """
        return self._read(image_id, arrays=False)[0]

    def stored(self, image_id: str) -> dict[str, np.ndarray]:
        """The raw stored arrays of one image, by name (float16 / uint8, stored resolution)."""
        return self._read(image_id, arrays=True)[1]

    def _read(self, image_id: str, arrays: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(attributes, arrays) of one image group.

        Groups in the layout this module writes (one chunk per array, bytes + zstd codecs) are
        read directly from their files, several times faster than through zarr's store
        machinery; anything else is read through zarr.
        """
        if image_id not in self:
            raise UserError(f"{self.path}: image {image_id!r} is not in the cache")
        try:
            return self._load(image_id, arrays)
        except _Damaged as exc:
            path, reason = exc.args
            raise UserError(
                f"{path}: {reason}; image {image_id!r} of the cache {self.path} is damaged; "
                "expected complete image data (python -m annotate run --verify finds damaged "
                "images and annotates them again)"
            ) from None

    def _load(self, image_id: str, arrays: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """:meth:`_read` of a present image; raises _Damaged for missing or unreadable data."""
        d = self.path / "images" / image_key(image_id)
        try:
            attrs = _read_json(d / "zarr.json")["attributes"]
            out = {}
            if arrays:
                for name in _MODE_ARRAYS.get(attrs.get("mode"), _ARRAY_NAMES):
                    if not (d / name / "zarr.json").is_file():
                        raise _Damaged(d / name / "zarr.json", "array metadata missing")
                    out[name] = _read_single_chunk(d / name, "chunk_bytes" in attrs)
            return attrs, out
        except _NotSimple:
            try:
                g = self._group(image_id)
                return dict(g.attrs), {n: a[...] for n, a in g.arrays()} if arrays else {}
            except Exception as exc:  # zarr and its codecs raise many unrelated types
                raise _Damaged(d, f"{type(exc).__name__}: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise _Damaged(d / "zarr.json", f"no {exc} field") from None

    def damaged(self, ids: Sequence[str], full: bool = False) -> list[tuple[str, str, str]]:
        """The images of ``ids`` present in the cache whose data is incomplete.

        Without ``full`` only sizes are checked (a few small reads per image): the group and
        array metadata must parse, every array of the image's mode and its chunk file must be
        there, and each chunk must have the size recorded when it was written. With ``full``
        every chunk is also decoded (zstd checks its checksum), which finds any changed byte
        but reads all data. Images written before sizes and checksums were recorded (earlier
        versions) are checked as far as zarr's own format allows: their chunks must be
        non-empty and (``full``) decodable, and a missing chunk reads as zarr reads it (all
        fill value: zarr itself leaves such chunks unwritten).

        Returns:
            ``(id, file, reason)`` per damaged image, in the order of ``ids``.
        """
        out = []
        for image_id in ids:
            if image_id not in self:
                continue
            try:
                if full:
                    self._load(image_id, arrays=True)
                else:
                    _check_sizes(self.path / "images" / image_key(image_id))
            except _Damaged as exc:
                path, reason = exc.args
                out.append((image_id, str(path), reason))
        return out

    def scores(self, image_id: str) -> np.ndarray:
        """float32 (K, H, W) scores at image resolution.

        Images stored as probabilities ("probs" or "topk" mode) return :meth:`probs`.
        """
        info, data = self.info(image_id), self.stored(image_id)
        if info["mode"] != "scores":
            return self.probs(image_id)
        s = data["scores"].astype(np.float32)
        return resize_chw(s, info["height"], info["width"])

    def probs(self, image_id: str) -> np.ndarray:
        """float32 (K, H, W) class probabilities at image resolution (sum to 1 over K).

        Probabilities are computed at the stored resolution, then resized bilinearly (a convex
        combination, so they still sum to 1).
        """
        info, data = self.info(image_id), self.stored(image_id)
        if info["mode"] == "topk":
            p = topk_decode(data["topk_index"], data["topk_prob"], self.num_classes)
        elif info["mode"] == "probs":
            p = to_probs(data["scores"], "probs")
        else:
            p = to_probs(data["scores"], self.meta.normalization)
        return resize_chw(p, info["height"], info["width"])

    def argmax(self, image_id: str) -> np.ndarray:
        """uint8 (H, W): the annotator's most probable class per pixel."""
        return self.probs(image_id).argmax(axis=0).astype(np.uint8)

    def dask_scores(self, image_id: str) -> Any:
        """A lazy dask array over the stored scores (``scores`` or ``topk_prob``), stored res."""
        import dask.array as da

        g = self._group(image_id)
        name = "scores" if "scores" in g else "topk_prob"
        return da.from_zarr(g[name])

    def nbytes_on_disk(self, image_id: str | None = None) -> int:
        """Bytes on disk of one image's group, or of the whole cache."""
        root = self.path if image_id is None else self.path / "images" / image_key(image_id)
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache for reading. Raises UserError if ``path`` is not a cache."""
    return Cache(path)


class CacheWriter(Cache):
    """Adds images to a cache. Create it with :func:`create_or_open`."""

    def write(
        self, image_id: str, scores: np.ndarray, height: int, width: int, topk: bool = False
    ) -> None:
        """Store one image atomically from its scores (a no-op if it is already present).

        Args:
            scores: float32 (K, h, w) raw annotator scores at its native resolution.
            height, width: the image's own resolution.
            topk: store the top-``meta.topk`` probabilities instead of all scores.
        """
        if image_id in self:
            return
        if scores.ndim != 3 or scores.shape[0] != self.num_classes:
            raise ValueError(
                f"scores for {image_id!r} have shape {scores.shape}; expected "
                f"({self.num_classes}, h, w)"
            )
        st = storage_for(self.meta, topk)
        arrays = encode_image(scores, st, height, width)
        self.write_files(
            image_id, encode_group(arrays, image_attrs(image_id, height, width, st.mode))
        )

    def write_files(self, image_id: str, files: dict[str, bytes]) -> None:
        """Store one image's group files (from :func:`encode_group`) atomically: under a
        temporary name, then renamed into place. A no-op if the image is already present."""
        if image_id in self:
            return
        images = self.path / "images"
        final = images / image_key(image_id)
        tmp = images / f"{_TMP}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        folders = {"/".join(k.split("/")[:i]) for k in files for i in range(1, k.count("/") + 1)}
        try:
            os.mkdir(tmp)
            for folder in sorted(folders, key=lambda f: f.count("/")):  # parents first
                os.mkdir(tmp / folder)
            for key, data in files.items():
                with open(tmp / key, "wb") as f:
                    f.write(data)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "zarr.json").is_file():  # someone else won a benign race
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, ids: Sequence[str]) -> None:
        """Remove images (damaged ones, before they are written again): each group is renamed
        to a temporary name first, so that it stops counting as present at once."""
        images = self.path / "images"
        for image_id in ids:
            tmp = images / f"{_TMP}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                os.rename(images / image_key(image_id), tmp)
            except FileNotFoundError:
                continue
            shutil.rmtree(tmp, ignore_errors=True)

    def clean_temporaries(self, dead_only: bool = False) -> int:
        """Remove groups left half-written by killed writers. Returns how many were removed.

        With ``dead_only=False`` only call this when no other writer is running on the cache.
        With ``dead_only=True`` it removes only temporaries of processes on this host that no
        longer run, so it is safe while other shards are writing.
        """
        images = self.path / "images"
        stale = [
            p
            for p in images.iterdir()
            if p.name.startswith(_TMP) and (not dead_only or _writer_is_dead(p.name))
        ]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)


def _writer_is_dead(name: str) -> bool:
    """True when a temporary group's writer (``.tmp-<host>-<pid>-<hex>``) is gone."""
    host, _, rest = name[len(_TMP) :].rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def create_or_open(path: str | os.PathLike, meta: CacheMeta) -> CacheWriter:
    """Open ``path`` for writing, creating it with ``meta`` if absent.

    Creation is atomic (the group is built under a temporary name and renamed), so several
    shard processes may call this at once. An existing cache must have equal metadata.

    Raises:
        UserError: the existing cache was made by another model, class list, manifest or
            storage setting.
    """
    if meta.normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}")
    path = Path(path)
    if not (path / "zarr.json").is_file():
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path}: exists and is not a cache; choose another cache path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
        try:
            zarr.open_group(str(tmp), mode="w", attributes=meta.to_attrs())
            (tmp / "images").mkdir()
            (tmp / "images" / ".keep").touch()
            try:
                if path.exists():
                    path.rmdir()  # an empty folder left by the user
                os.rename(tmp, path)
            except OSError:
                if not (path / "zarr.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    writer = CacheWriter(path)
    check_writable_by(writer.meta, meta, str(path))
    return writer


def check_writable_by(have: CacheMeta, want: CacheMeta, where: str) -> None:
    """Refuse adding images made with ``want`` to a cache with metadata ``have``.

    Raises:
        UserError: an older schema, or the first metadata field that differs.
    """
    if have.schema != SCHEMA:
        raise UserError(
            f"{where}: cache schema is {have.schema}, written by an earlier version; "
            f"this version reads it but adds images only to schema-{SCHEMA} caches (its "
            "probabilities differ in the last bits); use a new cache path, or finish this "
            "one with the earlier version"
        )
    check_compatible(have, want, where)


def holds_nothing(path: str | os.PathLike) -> bool:
    """True for a cache without images or temporaries (only its metadata)."""
    images = Path(path) / "images"
    return (
        (Path(path) / "zarr.json").is_file()
        and images.is_dir()
        and all(n == ".keep" for n in os.listdir(images))
    )


def reset_if_empty(path: str | os.PathLike, meta: CacheMeta) -> CacheWriter | None:
    """Give a cache that holds no image yet the metadata ``meta`` (atomically); None when it
    holds images or temporaries. A run stopped before its first image (bad settings) must not
    keep a corrected run from using the same path. Call only while no other process writes to
    the cache (under its lock)."""
    path = Path(path)
    if not holds_nothing(path):
        return None
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        zarr.open_group(str(tmp), mode="w", attributes=meta.to_attrs())
        os.replace(tmp / "zarr.json", path / "zarr.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CacheWriter(path)


def writer_lock(path: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> Any:
    """The lock of a cache's writer (a context manager): ``.<cache name>.lock`` beside it
    (the cache itself is created by one atomic rename, under the lock). Shard ``i/n`` of
    ``n > 1`` holds it shared and its own part exclusively: shards of one count run together;
    a run of the whole cache excludes every other writer (see :mod:`data_manifest.ownership`).
    """
    from data_manifest.ownership import writer_lock as lock

    path = Path(path)
    i, n = shard
    return lock(
        path, lock=path.parent / f".{path.name}.lock", part=None if n == 1 else f"{i}-of-{n}"
    )


def check_compatible(have: CacheMeta, want: CacheMeta, where: str) -> None:
    """Raise UserError naming the first metadata field that differs."""
    for name in (
        "classes",
        "annotator",
        "model_sha256",
        "manifest_fingerprint",
        "normalization",
        "resolution",
        "topk",
    ):
        a, b = getattr(have, name), getattr(want, name)
        if a != b:
            raise UserError(
                f"{where}: cache was made with {name} = {_short(a)}, this run has "
                f"{_short(b)}; use a new cache path (or delete this one) instead of "
                "mixing results"
            )


def _short(v: Any) -> str:
    s = repr(list(v) if isinstance(v, tuple) else v)
    return s if len(s) < 60 else s[:57] + "..."


def missing(cache: Cache, ids: Sequence[str]) -> list[str]:
    """The ids of ``ids`` that are not (completely) in the cache, in the given order."""
    present = set(cache.ids)
    return [i for i in ids if i not in present]
