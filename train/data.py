"""Input pipeline: label checks, augmentation in DataLoader workers, resumable sampling.

Sampling is a pure function of (seed, stream, position): sample number ``p`` of a stream comes
from epoch ``p // N`` of a per-epoch permutation seeded by (seed, stream, epoch), and its
augmentation RNG is seeded by (seed, stream, p) (and the draw number for a second draw of the
same samples, the CutMix source of Stage II). A run resumed at any iteration therefore draws
exactly the samples and augmentations of an uninterrupted run, whatever the number of
DataLoader workers; with DDP, rank r takes every world-th chunk of ``batch_size`` positions.
The augmentations themselves are in :mod:`train.augment`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from calibrate.folder import check_pseudo_folder
from data_manifest.errors import UserError
from data_manifest.io import read_label_png
from data_manifest.manifest import Manifest, Row
from train.augment import Augment, cutmix_box, strong, weak
from train.config import TrainConfig

STREAM_LABELED = 0
STREAM_UNLABELED = 1


def pseudo_path(pseudo_dir: str | os.PathLike, image_id: str) -> Path:
    """``<pseudo_dir>/<id>.png`` (an id is a plain file name, see data_manifest.check_id)."""
    return Path(pseudo_dir) / f"{image_id}.png"


def check_labels(
    manifest: Manifest,
    rows: Sequence[Row],
    pseudo_dir: str | os.PathLike | None,
    read_values: bool = True,
) -> None:
    """Check that every row has a readable label of the right size with values in range.

    ``pseudo_dir`` None checks the ground-truth labels of ``rows``; otherwise the pseudo-label
    PNG of each row in ``pseudo_dir``. ``read_values`` False checks presence and size only
    (reads PNG headers).

    Raises:
        UserError: the first missing file, size mismatch or out-of-range value.
    """
    k = manifest.num_classes
    for row in rows:
        if pseudo_dir is None:
            path = manifest.label_path(row)
            if path is None:
                raise UserError(
                    f"{manifest.path}: image {row.id!r} in split {row.split!r} has "
                    "no label; expected a label for every labeled/val image"
                )
            what = "label"
        else:
            path = pseudo_path(pseudo_dir, row.id)
            what = "pseudo-label"
            if not path.is_file():
                raise UserError(
                    f"{path}: pseudo-label for unlabeled image {row.id!r} not found; "
                    f"expected one PNG per unlabeled image in {pseudo_dir} (run "
                    "python -m calibrate first, or set [train] pseudo_dir)"
                )
        if read_values:
            lab = manifest.read_label(row) if pseudo_dir is None else read_label_png(path)
            shape = lab.shape
        else:
            if not Path(path).is_file():
                raise UserError(f"{path}: label file not found")
            try:
                with Image.open(path) as im:
                    shape = (im.height, im.width)
            except Exception as exc:  # Pillow raises several unrelated types
                raise UserError(f"{path}: cannot read {what} image ({exc})") from None
        if tuple(shape) != (row.height, row.width):
            raise UserError(
                f"{path}: {what} is {shape[0]}x{shape[1]} (HxW); expected "
                f"{row.height}x{row.width} like image {row.id!r} in the manifest"
            )
        if read_values:
            bad = (lab >= k) & (lab != 255)
            if bad.any():
                value = int(lab[bad][0])
                raise UserError(
                    f"{path}: {what} value {value} is out of range; expected class "
                    f"ids 0-{k - 1} or 255 (ignore) for {k} classes"
                )


def check_inputs(cfg: TrainConfig, manifest: Manifest, pseudo_dir: Path) -> None:
    """Check the splits and labels a run with ``cfg`` reads, before anything is built.

    Every DDP process runs it, so that none waits on a peer that stopped with an error.

    Raises:
        UserError: an empty split the run needs, or what :func:`check_labels` reports.
    """
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
    check_labels(manifest, labeled, None, cfg.check_labels)
    check_labels(manifest, manifest.split("val"), None, cfg.check_labels)
    if cfg.uses_pseudo:
        check_pseudo_folder(pseudo_dir, manifest, verify=cfg.check_labels)
        check_labels(manifest, unlabeled, pseudo_dir, cfg.check_labels)


class SegDataset(Dataset):
    """Training samples of one stream.

    ``source`` says where targets come from: "gt" (manifest labels), "pseudo" (PNGs in
    ``pseudo_dir``) or "none" (unlabeled: the target is 0 inside the image and 255 on padding,
    the trainer replaces it with the model's own predictions).

    Items are indexed by ``(index, position)`` pairs from :class:`StreamSampler` and are dicts:
    ``image`` uint8 (3, crop, crop) (the weak view), ``label`` int64 (crop, crop) with 255 =
    ignore, and with ``aug.strong_views`` = k > 0 also ``strong`` uint8 (k, 3, crop, crop)
    (strongly augmented copies of the weak view) and ``box`` bool (k, crop, crop) (one CutMix
    box per strong view). ``draw`` > 0 makes another, independent augmentation of the same
    positions: UniMatch's CutMix source (``fixmatch.py`` zips the unlabeled loader with itself,
    so the source batch holds the same images, augmented again).
    """

    def __init__(
        self,
        manifest: Manifest,
        rows: Sequence[Row],
        source: str,
        aug: Augment,
        seed: int,
        stream: int,
        pseudo_dir: str | os.PathLike | None = None,
        draw: int = 0,
    ) -> None:
        if source not in ("gt", "pseudo", "none"):
            raise ValueError(f"source = {source!r}: expected 'gt', 'pseudo' or 'none'")
        self.manifest, self.rows, self.source = manifest, list(rows), source
        self.aug, self.seed, self.stream, self.draw = aug, seed, stream, draw
        self.pseudo_dir = pseudo_dir

    def __len__(self) -> int:
        return len(self.rows)

    def _target(self, row: Row) -> np.ndarray:
        if self.source == "gt":
            return self.manifest.read_label(row)
        if self.source == "pseudo":
            return read_label_png(pseudo_path(self.pseudo_dir, row.id))
        return np.zeros((row.height, row.width), dtype=np.uint8)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, position = key
        row = self.rows[index]
        entropy = [self.seed, self.stream, position] + ([self.draw] if self.draw else [])
        rng = np.random.default_rng(entropy)
        image = self.manifest.read_image(row)
        label = self._target(row)
        if image.shape[:2] != label.shape:
            raise UserError(
                f"{self.manifest.image_path(row)}: image is "
                f"{image.shape[0]}x{image.shape[1]} (HxW) but its {self.source} label is "
                f"{label.shape[0]}x{label.shape[1]}; expected equal sizes"
            )
        image, label = weak(image, label, self.aug, rng)
        out = {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "label": torch.from_numpy(label.astype(np.int64)),
        }
        if self.aug.strong_views:
            views, boxes = [], []
            for _ in range(self.aug.strong_views):  # as semi.py: view 1 and its box, then 2
                views.append(strong(image, rng))
                boxes.append(cutmix_box(self.aug.crop, self.aug.cutmix_prob, rng))
            out["strong"] = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()
            out["box"] = torch.from_numpy(np.stack(boxes))
        return out


class StreamSampler(Sampler):
    """Batches of ``(index, position)`` for iterations ``[start, stop)`` of one rank.

    Iteration ``it``, accumulation step ``a``, rank ``r`` and slot ``b`` read position
    ``((it * accum + a) * world + r) * batch + b`` of the stream. (Nine parameters: each is a
    term of that formula or of the per-epoch permutation's seed.)
    """

    def __init__(
        self,
        n: int,
        batch: int,
        seed: int,
        stream: int,
        start: int,
        stop: int,
        accum: int = 1,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.n, self.batch, self.seed, self.stream = n, batch, seed, stream
        self.start, self.stop, self.accum, self.rank, self.world = start, stop, accum, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {
                epoch: np.random.default_rng([self.seed, self.stream, epoch, 7]).permutation(self.n)
            }
        return self._perms[epoch]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            for a in range(self.accum):
                first = ((it * self.accum + a) * self.world + self.rank) * self.batch
                batch = []
                for p in range(first, first + self.batch):
                    batch.append((int(self._perm(p // self.n)[p % self.n]), p))
                yield batch


class JointDataset(Dataset):
    """Several streams read together: item ``(key_0, key_1, ...)`` → (item_0, item_1, ...)."""

    def __init__(self, streams: Sequence[SegDataset]) -> None:
        self.streams = list(streams)

    def __len__(self) -> int:
        return len(self.streams[0])

    def __getitem__(self, keys: tuple) -> tuple[dict[str, torch.Tensor], ...]:
        return tuple(ds[key] for ds, key in zip(self.streams, keys, strict=True))


class JointSampler(Sampler):
    """Zips one :class:`StreamSampler` per stream into batches of key tuples."""

    def __init__(self, samplers: Sequence[StreamSampler]) -> None:
        self.samplers = list(samplers)

    def __len__(self) -> int:
        return len(self.samplers[0])

    def __iter__(self) -> Iterator[list[tuple]]:
        for batches in zip(*self.samplers, strict=True):
            yield list(zip(*batches, strict=True))


def make_joint_loader(
    streams: Sequence[SegDataset],
    batch: int,
    start: int,
    stop: int,
    accum: int,
    rank: int,
    world: int,
    workers: int,
) -> DataLoader:
    """One DataLoader over iterations ``[start, stop)`` (``accum`` micro-batches each) that
    yields a tuple with one batch dict per stream."""
    samplers = [
        StreamSampler(len(ds), batch, ds.seed, ds.stream, start, stop, accum, rank, world)
        for ds in streams
    ]
    return DataLoader(
        JointDataset(streams),
        batch_sampler=JointSampler(samplers),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
    )
