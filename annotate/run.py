"""The annotation run: images in, per-class scores out to the Zarr cache.

The work is cut into fixed batches: each split's rows in manifest order, ``batch_size`` at a
time. Batch boundaries depend only on the manifest, the splits and the batch size, never on
what is already cached, so a resumed or sharded run feeds the model exactly the same batches as
an uninterrupted one and writes the same bytes. Shard ``i/n`` takes the batches whose index
is ``i`` modulo ``n``.

Three stages overlap. Loader threads read, check, resize and stack images (into pinned memory
on CUDA). The main thread runs the forward pass (AMP on CUDA) and the vocabulary. On CUDA it
also post-processes there (probabilities, top-k, float16: :mod:`annotate.postprocess`) and
starts non-blocking copies of only the stored arrays into pinned host memory, followed by a
CUDA event, without waiting for the device. A pool of writer threads takes each image: on CUDA
it waits for the group's event; on a CPU it post-processes the image with numpy (the device is
the host, and the writers spread that work over its cores while the next batch runs); then it
compresses and atomically writes the image's group. At most ``2 * batch_size`` images wait for
a writer, so memory stays flat however large the data set.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from annotate.annotators import Annotator, build_annotator
from annotate.cache import (
    CacheMeta,
    CacheWriter,
    Storage,
    check_writable_by,
    create_or_open,
    encode_group,
    encode_image,
    finish_image,
    holds_nothing,
    image_attrs,
    open_cache,
    reset_if_empty,
    storage_for,
    writer_lock,
)
from annotate.config import AnnotateConfig, auto_topk
from annotate.vocab import Vocabulary, build_vocabulary
from data_manifest.errors import UserError
from data_manifest.manifest import Manifest, Row


@dataclass(frozen=True)
class Batch:
    """One fixed batch: its global index, split and rows (in manifest order)."""

    index: int
    split: str
    rows: tuple[Row, ...]


def plan_batches(manifest: Manifest, splits: tuple[str, ...], batch_size: int) -> list[Batch]:
    """Cut each split (in the order given) into consecutive batches of ``batch_size`` rows."""
    out: list[Batch] = []
    for split in splits:
        rows = manifest.split(split)
        for start in range(0, len(rows), batch_size):
            out.append(Batch(len(out), split, tuple(rows[start : start + batch_size])))
    return out


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    parts = text.split("/")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        i, n = int(parts[0]), int(parts[1])
        if n >= 1 and 0 <= i < n:
            return i, n
    raise UserError(f"--shard = {text!r}: expected i/n with 0 <= i < n, e.g. 0/2 and 1/2")


def select_device(name: str) -> Any:
    """ "auto" -> cuda if available, else cpu; anything else as given (checked)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"[annotate] device = {name!r}: CUDA is not available on this machine; "
            'expected "auto" or "cpu"'
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            f"[annotate] device = {name!r}: MPS (Apple GPUs) is not available on this "
            'machine; expected "auto", "cpu" or "cuda"'
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or (name.startswith("cuda:") and device.index is None):
        raise UserError(f'[annotate] device = {name!r}: expected "auto", "cpu", "cuda" or "cuda:N"')
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"[annotate] device = {name!r}: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s); expected cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


PHASES = ("decode", "h2d", "forward", "post", "d2h", "encode", "write")


class Phases:
    """Seconds spent per phase of a run, summed over the threads that do it (thread-safe).

    decode: reading, checking, resizing and stacking images (loader threads); h2d, forward,
    d2h: copies and the model (on CUDA the device's own time, from CUDA events); post:
    probabilities, top-k, float16 (on CUDA the device's time plus, at image resolution, the
    resize on the host; on a CPU the writer threads' time); encode: compression; write:
    files and rename (writer threads).
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds


@dataclass
class Group:
    """Images of one size from a batch, in batch order: uint8 (b, H, W, 3), stacked."""

    rows: list[Row]
    images: Any  # torch.Tensor, in pinned memory when the model is on CUDA


@dataclass
class Loaded:
    """A batch after decoding: its images in groups of equal size, and the rows that failed."""

    batch: Batch
    groups: list[Group] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)


def load_batch(
    manifest: Manifest,
    batch: Batch,
    input_size: tuple[int, ...],
    pin: bool = False,
    phases: Phases | None = None,
) -> Loaded:
    """Read, check, resize and stack the images of a batch (runs in a worker thread).

    Images are uint8 (h, w, 3) RGB, resized bilinearly to ``input_size`` (height, width) when
    given, then stacked per size into uint8 tensors (b, h, w, 3), in page-locked memory when
    ``pin`` (so that the copy to the GPU is asynchronous). An image that is missing,
    unreadable, or not the size the manifest says is recorded in ``bad`` with its error.
    """
    import torch

    t0 = time.perf_counter()
    out = Loaded(batch)
    sizes: dict[tuple[int, ...], list[tuple[Row, np.ndarray]]] = {}
    for row in batch.rows:
        try:
            img = manifest.read_image(row)
            if img.shape[:2] != (row.height, row.width):
                raise UserError(
                    f"{manifest.image_path(row)}: image is {img.shape[0]}x"
                    f"{img.shape[1]}; the manifest row says {row.height}x{row.width}"
                )
        except UserError as exc:
            out.bad.append(
                {"id": row.id, "split": row.split, "image": row.image, "error": str(exc)}
            )
            continue
        if input_size and img.shape[:2] != tuple(input_size):
            img = cv2.resize(img, (input_size[1], input_size[0]), interpolation=cv2.INTER_LINEAR)
        sizes.setdefault(img.shape, []).append((row, img))
    for shape, members in sizes.items():
        stack = torch.empty((len(members), *shape), dtype=torch.uint8, pin_memory=pin)
        np.stack([img for _, img in members], out=stack.numpy())
        out.groups.append(Group([r for r, _ in members], stack))
    if phases is not None:
        phases.add("decode", time.perf_counter() - t0)
    return out


@dataclass
class RunResult:
    """What a run did; ``report()`` gives the JSON written as ``annotate.json``."""

    cache: Path
    shard: tuple[int, int]
    planned: dict[str, int]
    present_before: dict[str, int]
    annotated: dict[str, int]
    skipped: list[dict[str, str]]
    wall_s: float
    forward_s: float
    device: str
    meta: CacheMeta | None = None
    phases: dict[str, float] = field(default_factory=dict)
    repaired: list[dict[str, str]] = field(default_factory=list)  # damaged images re-done

    def report(self) -> dict[str, Any]:
        n = sum(self.annotated.values())
        return {
            "cache": str(self.cache),
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "annotator": self.meta.annotator if self.meta else None,
            "model_sha256": self.meta.model_sha256 if self.meta else None,
            "manifest_fingerprint": self.meta.manifest_fingerprint if self.meta else None,
            "normalization": self.meta.normalization if self.meta else None,
            "topk": self.meta.topk if self.meta else None,
            "device": self.device,
            "planned": self.planned,
            "present_before": self.present_before,
            "annotated": self.annotated,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "wall_s": round(self.wall_s, 4),
            "forward_s": round(self.forward_s, 4),
            "images_per_s": round(n / self.wall_s, 3) if self.wall_s > 0 else None,
            "wall_over_forward": round(self.wall_s / self.forward_s, 4)
            if self.forward_s > 0
            else None,
            "phases_s": {k: round(v, 4) for k, v in self.phases.items()},
        }


def cache_meta(
    cfg: AnnotateConfig, manifest: Manifest, annotator: Annotator, vocab: Vocabulary
) -> CacheMeta:
    """The cache metadata of a run (equal metadata = results that may share a cache)."""
    k = auto_topk(len(manifest.classes)) if cfg.topk == -1 else cfg.topk
    settings = {"input_size": list(cfg.input_size), "vocabulary": vocab.describe()}
    if annotator.extra.get("preprocessing"):  # resizing and scaling done inside the annotator
        settings["preprocessing"] = annotator.extra["preprocessing"]
    return CacheMeta(
        classes=tuple(manifest.classes),
        annotator=annotator.name,
        model_sha256=annotator.model_sha256,
        manifest_fingerprint=manifest.fingerprint,
        normalization=vocab.output_normalization(annotator.normalization),  # type: ignore[arg-type]
        resolution=cfg.resolution,
        topk=k,
        # no manifest path: the fingerprint identifies it, and a path would make two caches
        # of the same images differ by where they were made
        extra={"settings": settings, "model": annotator.extra},
    )


def _check_settings(path: Path, have: CacheMeta, want: CacheMeta) -> None:
    """Refuse a cache made with other input settings (input size, vocabulary, ...)."""
    old, new = have.extra.get("settings"), want.extra["settings"]
    if old is None or old == new:
        return
    for key in new:
        if old.get(key) != new[key]:
            raise UserError(
                f"{path}: cache was made with {key} = {old.get(key)!r}, this run "
                f"has {new[key]!r}; use a new cache path (or delete this one) instead of "
                "mixing results"
            )


def check_cache(path: Path, meta: CacheMeta, reset: bool = False) -> None:
    """The refusals of :func:`open_for_run` made before the cache is locked, reading only:
    a folder that is not a cache, or a cache made with other settings (unless ``reset`` may
    give it this run's, see there)."""
    if not (path / "zarr.json").is_file():
        if path.is_dir() and any(path.iterdir()):
            raise UserError(f"{path}: exists and is not a cache; choose another cache path")
        return
    try:
        have = open_cache(path).meta
        check_writable_by(have, meta, str(path))
        _check_settings(path, have, meta)
    except UserError:
        if not (reset and holds_nothing(path)):
            raise


def open_for_run(path: Path, meta: CacheMeta, reset: bool = False) -> CacheWriter:
    """Open or create the cache; also refuse a cache made with other input settings.

    ``reset``: the caller holds the cache's whole lock, so a cache that holds no image yet
    may take this run's metadata instead (see :func:`annotate.cache.reset_if_empty`).
    """
    try:
        writer = create_or_open(path, meta)
        _check_settings(path, writer.meta, meta)
    except UserError:
        writer = reset_if_empty(path, meta) if reset else None
        if writer is None:
            raise
    return writer


def _prepare(
    cfg: AnnotateConfig, manifest: Manifest, annotator: Annotator | None
) -> tuple[Annotator, Vocabulary, CacheMeta]:
    """Build the annotator (unless given), its vocabulary and the cache metadata of the run
    (before the cache is locked, created or opened: bad settings change nothing on disk)."""
    annotator = annotator or build_annotator(cfg, manifest)
    vocab = build_vocabulary(
        annotator.classes,
        manifest.classes,
        cfg.vocabulary or annotator.groups,
        cfg.unmapped,
        manifest.meta.background_index,
    )
    return annotator, vocab, cache_meta(cfg, manifest, annotator, vocab)


def run_annotation(
    cfg: AnnotateConfig,
    manifest: Manifest,
    cache_path: str | os.PathLike,
    shard: tuple[int, int] = (0, 1),
    annotator: Annotator | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    verify: bool = False,
    lock: bool = True,
) -> RunResult:
    """Annotate the images of ``cfg.splits`` that are not in the cache yet, or are damaged.

    Args:
        cfg: the ``[annotate]`` settings.
        manifest: the dataset.
        cache_path: the Zarr cache folder (created if absent).
        shard: (i, n): take only batches whose index is i modulo n.
        annotator: a ready annotator (default: built from ``cfg``).
        on_progress: called as ``on_progress(done_images, total_images, batches_left)``.
        verify: decode every cached image of the run's batches to find damaged ones (default:
            check their files' sizes only, see :meth:`annotate.cache.Cache.damaged`).
        lock: hold the cache's writer lock (False: a task of a run whose driver holds it).
    Raises:
        UserError: bad settings, a mismatched cache, another run writing the same cache or
            shard, or an unreadable image (unless ``cfg.skip_bad``; then it is skipped and
            listed in ``RunResult.skipped``).
    """
    cache_path = Path(cache_path)
    device = select_device(cfg.device)
    annotator, vocab, meta = _prepare(cfg, manifest, annotator)
    check_cache(cache_path, meta, reset=lock and shard[1] == 1)
    with writer_lock(cache_path, shard) if lock else contextlib.nullcontext():
        writer = open_for_run(cache_path, meta, reset=lock and shard[1] == 1)
        return _run_annotation(
            cfg, manifest, writer, shard, annotator, vocab, on_progress, verify, device
        )


def _run_annotation(
    cfg: AnnotateConfig,
    manifest: Manifest,
    writer: CacheWriter,
    shard: tuple[int, int],
    annotator: Annotator,
    vocab: Vocabulary,
    on_progress: Callable[[int, int, int], None] | None,
    verify: bool,
    device: Any,
) -> RunResult:
    """:func:`run_annotation` once the cache is open (under its lock)."""
    i, n = shard
    cache_path, meta = writer.path, writer.meta
    t0 = time.perf_counter()  # after building the model (the demo's may train it first)
    writer.clean_temporaries(dead_only=True)
    present = set(writer.ids)
    mine = [b for b in plan_batches(manifest, cfg.splits, cfg.batch_size) if b.index % n == i]
    damaged = writer.damaged([r.id for b in mine for r in b.rows if r.id in present], verify)
    writer.remove([d[0] for d in damaged])
    present -= {d[0] for d in damaged}
    planned = {s: sum(len(b.rows) for b in mine if b.split == s) for s in cfg.splits}
    before = {
        s: sum(r.id in present for b in mine if b.split == s for r in b.rows) for s in cfg.splits
    }
    todo = [b for b in mine if any(r.id not in present for r in b.rows)]
    total = sum(r.id not in present for b in todo for r in b.rows)
    annotated = dict.fromkeys(cfg.splits, 0)
    skipped: list[dict[str, str]] = []
    result = RunResult(
        cache_path, shard, planned, before, annotated, skipped, 0.0, 0.0, str(device), meta
    )
    result.repaired = [{"id": d[0], "file": d[1], "reason": d[2]} for d in damaged]
    if not todo:
        result.wall_s = time.perf_counter() - t0
        return result

    annotator.to(device)
    pipe = _Pipeline(annotator, vocab, device, cfg.amp and device.type == "cuda")
    loader = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="annotate-load")
    saver = ThreadPoolExecutor(writer_threads(), thread_name_prefix="annotate-write")
    loads: deque[Future[Loaded]] = deque()
    writes: deque[Future[None]] = deque()
    queue = deque(todo)
    depth = max(2, 2 * cfg.workers)
    pin = pipe.cuda
    done = 0

    def fill() -> None:
        while queue and len(loads) < depth:
            loads.append(
                loader.submit(
                    load_batch, manifest, queue.popleft(), cfg.input_size, pin, pipe.phases
                )
            )

    try:
        fill()
        if on_progress:
            on_progress(0, total, len(loads))
        while loads:
            item = loads.popleft().result()
            fill()
            for bad in item.bad:
                if not cfg.skip_bad:
                    raise UserError(
                        f"{bad['error']} (image {bad['id']!r}, split "
                        f"{bad['split']}); fix it, or pass --skip-bad to skip and "
                        "report such images"
                    )
                if bad["id"] not in present:
                    skipped.append(bad)
                    done += 1  # counted as handled for the progress bar
            storage = storage_for(meta, topk=item.batch.split == "unlabeled")
            for group in item.groups:
                flight = pipe.step(group, storage)
                for j, row in enumerate(group.rows):
                    if row.id in present:
                        continue
                    writes.append(saver.submit(_store, writer, flight, j, pipe.phases))
                    present.add(row.id)
                    annotated[row.split] += 1
                    done += 1
            while len(writes) > 2 * cfg.batch_size:
                writes.popleft().result()
            pipe.collect_device_times(wait=False)
            if on_progress:
                on_progress(done, total, len(loads))
        while writes:
            writes.popleft().result()
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        saver.shutdown(wait=True)
    pipe.collect_device_times()
    result.forward_s = pipe.forward_s
    result.phases = dict(pipe.phases.seconds)
    result.wall_s = time.perf_counter() - t0
    return result


def writer_threads() -> int:
    """Writer threads: half the CPU cores, 2 to 8 (compression releases the GIL)."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class InFlight:
    """A group on its way to the writers.

    On CUDA ``arrays`` are the stored arrays (b, ...) (or float32 probabilities, for image
    resolution) in pinned host memory, complete once ``ready`` (a CUDA event recorded after
    their copies) has passed. On a CPU they are the dataset scores {"scores": (b, K, h, w)},
    post-processed image by image in the writer threads.
    """

    rows: list[Row]
    arrays: dict[str, Any]
    storage: Storage
    ready: Any = None


class _Pipeline:
    """The model's side of a run: copy in, forward, vocabulary, and on CUDA post-processing
    and the copies out."""

    def __init__(self, annotator: Annotator, vocab: Vocabulary, device: Any, amp: bool):
        import torch

        self.annotator, self.vocab, self.device, self.amp = annotator, vocab, device, amp
        # the GPU path (pinned memory, events, post-processing there) once the annotator is on
        # the GPU; a device named cuda whose tensors stay on the host (a test double) takes
        # the host path
        self.cuda = device.type == "cuda" and torch.cuda.is_initialized()
        self.phases = Phases()
        self.forward_s = 0.0
        self._events: list[list[Any]] = []  # CUDA: per group, events around its 4 phases

    def step(self, group: Group, storage: Storage) -> InFlight:
        """Start one group; on CUDA this returns before the device is done with it.

        On CUDA the copy in reads pinned memory and the copies out write into freshly
        allocated pinned memory, both ``non_blocking``: they queue on the current stream
        around the forward pass and the post-processing, and the host goes on with the next
        batch. PyTorch's pinned allocator keeps a block in use until the copies queued on it
        have run; a writer reads an image only after the group's event has passed.
        """
        import torch

        with torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext():
            return self._step(group, storage)

    def _step(self, group: Group, storage: Storage) -> InFlight:
        import torch

        marks = [self._mark()]
        x = group.images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        marks.append(self._mark())
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                s = self.annotator.predict(x)
            marks.append(self._mark())
            s = self.vocab.apply(s.float(), self.annotator.normalization)
            if not self.cuda:
                self.phases.add("h2d", marks[1] - marks[0])
                self.phases.add("forward", marks[2] - marks[1])
                self.forward_s += marks[2] - marks[1]
                return InFlight(group.rows, {"scores": s.cpu()}, storage)
            from annotate.postprocess import device_arrays

            out = device_arrays(s, storage)
            marks.append(self._mark())
            host = {n: torch.empty(a.shape, dtype=a.dtype, pin_memory=True) for n, a in out.items()}
            for n, a in out.items():
                host[n].copy_(a, non_blocking=True)
            marks.append(self._mark())
        self._events.append(marks)
        return InFlight(group.rows, host, storage, ready=marks[-1])

    def _mark(self) -> Any:
        """A CUDA event recorded now on the device's current stream, or the host clock."""
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def collect_device_times(self, wait: bool = True) -> None:
        """Add the CUDA event times of the groups the device has finished (``wait``: of all,
        waiting for them), oldest first."""
        while self._events and (wait or self._events[0][-1].query()):
            marks = self._events.pop(0)
            marks[-1].synchronize()
            pairs = zip(("h2d", "forward", "post", "d2h"), marks[:-1], marks[1:], strict=True)
            for name, a, b in pairs:
                self.phases.add(name, a.elapsed_time(b) / 1000.0)
            self.forward_s += marks[1].elapsed_time(marks[2]) / 1000.0


def _store(writer: CacheWriter, flight: InFlight, j: int, phases: Phases) -> None:
    """Write image ``j`` of a group (in a writer thread): on CUDA wait for its copies and
    finish it (image resolution only), on a CPU post-process it; then compress and write
    it atomically."""
    row, st = flight.rows[j], flight.storage
    if flight.ready is not None:
        flight.ready.synchronize()
        t0 = time.perf_counter()
        mine = {n: a[j].numpy() for n, a in flight.arrays.items()}
        arrays = finish_image(mine, st, row.height, row.width)
    else:
        t0 = time.perf_counter()
        arrays = encode_image(flight.arrays["scores"][j].numpy(), st, row.height, row.width)
    t1 = time.perf_counter()
    files = encode_group(arrays, image_attrs(row.id, row.height, row.width, st.mode))
    t2 = time.perf_counter()
    writer.write_files(row.id, files)
    phases.add("post", t1 - t0)
    phases.add("encode", t2 - t1)
    phases.add("write", time.perf_counter() - t2)


def _shard_task(
    cfg: AnnotateConfig, manifest: Manifest, cache_path: str, i: int, n: int, verify: bool
) -> RunResult:
    """One shard on a Dask worker (builds its own annotator there; the driver holds the
    cache's lock)."""
    return run_annotation(cfg, manifest, cache_path, (i, n), verify=verify, lock=False)


def run_on_dask(
    cfg: AnnotateConfig,
    manifest: Manifest,
    cache_path: str | os.PathLike,
    annotator: Annotator | None = None,
    verify: bool = False,
) -> RunResult:
    """Run the shards of the annotation as tasks on a Dask cluster.

    ``cfg.scheduler`` is ``"local:N"`` (a LocalCluster of N single-threaded worker processes)
    or the address of a running scheduler; ``cfg.shards`` shards (default: one per worker),
    each one task that builds the annotator on its worker and writes its own images. The
    workers must see the manifest, the images, the model and the cache at the same paths.
    The cache metadata is created here first, so workers only add images; this process
    holds the cache's lock for the whole run.

    Returns:
        The shards' results merged (counts summed, forward time summed over workers).
    """
    t0 = time.perf_counter()
    _, _, meta = _prepare(cfg, manifest, annotator)
    check_cache(Path(cache_path), meta, reset=True)
    with writer_lock(cache_path):
        open_for_run(Path(cache_path), meta, reset=True)
        return _run_on_dask(cfg, manifest, Path(cache_path), meta, verify, t0)


def _run_on_dask(
    cfg: AnnotateConfig,
    manifest: Manifest,
    cache_path: Path,
    meta: CacheMeta,
    verify: bool,
    t0: float,
) -> RunResult:
    from distributed import Client, LocalCluster

    from annotate.config import _local_workers

    local = _local_workers(cfg.scheduler)
    cluster = (
        LocalCluster(n_workers=local, threads_per_worker=1, processes=True, dashboard_address=None)
        if local
        else None
    )
    try:
        with Client(cluster if cluster is not None else cfg.scheduler) as client:
            n = cfg.shards or max(1, len(client.scheduler_info()["workers"]))
            futures = [
                client.submit(_shard_task, cfg, manifest, str(cache_path), i, n, verify, pure=False)
                for i in range(n)
            ]
            parts: list[RunResult] = client.gather(futures)
    except UserError:
        raise
    except OSError as exc:
        raise UserError(
            f"[annotate] scheduler = {cfg.scheduler!r}: cannot reach the Dask scheduler ({exc})"
        ) from None
    finally:
        if cluster is not None:
            cluster.close()
    merged = RunResult(
        Path(cache_path),
        (0, 1),
        {s: sum(p.planned[s] for p in parts) for s in cfg.splits},
        {s: sum(p.present_before[s] for p in parts) for s in cfg.splits},
        {s: sum(p.annotated[s] for p in parts) for s in cfg.splits},
        [b for p in parts for b in p.skipped],
        time.perf_counter() - t0,
        sum(p.forward_s for p in parts),
        ", ".join(sorted({p.device for p in parts})),
        meta,
        repaired=[r for p in parts for r in p.repaired],
    )
    return merged
