"""Run map-reduce passes over images on a Dask scheduler, with a progress bar.

A pass maps a module-level function over batches of images and merges the (small) results
with :func:`calibrate.merge.merge` in a tree, so neither the driver nor the cluster holds one
result per batch at once. Schedulers:
"threads" (Dask's local threaded scheduler, the default), "synchronous" (one thread, for
debugging), "processes" (a :class:`distributed.LocalCluster` started for the run) or an address
``tcp://HOST:PORT`` of a running Dask scheduler (dask-jobqueue, dask-kubernetes, ...).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from calibrate.merge import merge_many
from data_manifest.cli_support import progress, rate_text
from data_manifest.errors import UserError

_FAN_IN = 8


class Runner:
    """A scheduler for the run; use as a context manager (starts/stops a cluster if needed).

    ``imports``: modules that hold the pass functions; a cluster's workers import them when
    the runner starts (see :meth:`_warm`).
    """

    def __init__(
        self,
        scheduler: str = "threads",
        workers: int = 0,
        show_progress: bool = True,
        imports: tuple[str, ...] = (),
    ):
        self.scheduler = scheduler
        self.workers = workers or os.cpu_count() or 1
        self.show_progress = show_progress
        self.imports = imports
        self.client: Any = None
        self._cluster: Any = None

    def __enter__(self) -> Runner:
        if self.scheduler == "processes":
            from distributed import Client, LocalCluster

            self._cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.client = Client(self._cluster)
            self._warm()
        elif self.scheduler.startswith("tcp://"):
            from distributed import Client

            try:
                self.client = Client(self.scheduler, timeout="20s")
            except OSError as exc:
                raise UserError(
                    f"scheduler = {self.scheduler!r}: cannot connect ({exc}); "
                    "expected the address of a running Dask scheduler"
                ) from None
            self._warm()
        return self

    def _warm(self) -> None:
        """Import the task code on every worker now: the first pass does not pay for it, and
        a worker without this project installed is reported before any work is sent."""
        try:
            self.client.run(_import_modules, self.imports)
        except Exception as exc:  # whatever the worker raised, re-raised here
            self.__exit__()
            raise UserError(
                f"scheduler = {self.scheduler!r}: a worker cannot import the calibrate code "
                f"({type(exc).__name__}: {exc}); expected workers with this project installed"
            ) from None

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.client = self._cluster = None

    @property
    def n_workers(self) -> int:
        if self.client is not None:
            return max(len(self.client.scheduler_info().get("workers", {})), 1)
        return 1 if self.scheduler == "synchronous" else self.workers

    def map_reduce(
        self,
        fn: Callable[..., Any],
        batches: Sequence[Any],
        desc: str,
        unit_per_batch: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``merge`` of ``fn(batch, **kwargs)`` over all batches (None when there are none).

        ``unit_per_batch`` gives the images in each batch, for the progress bar's rate.
        """
        if not batches:
            return None
        units = list(unit_per_batch) if unit_per_batch is not None else [1] * len(batches)
        with progress(transient=True, disable=not self.show_progress) as bar:
            task = bar.add_task(desc, total=sum(units), rate="")
            t0 = time.perf_counter()
            state = {"done": 0}

            def advance(i: int) -> None:
                state["done"] += units[i]
                bar.update(
                    task,
                    completed=state["done"],
                    rate=rate_text(state["done"], time.perf_counter() - t0, "img"),
                )

            if self.client is not None:
                return self._distributed(fn, batches, advance, kwargs)
            return self._local(fn, batches, advance, kwargs)

    def _local(
        self,
        fn: Callable[..., Any],
        batches: Sequence[Any],
        advance: Callable[[int], None],
        kwargs: dict[str, Any],
    ) -> Any:
        import dask
        from dask.callbacks import Callback

        name = f"calib-{fn.__name__}"
        task = dask.delayed(functools.partial(fn, **kwargs), pure=True)  # kwargs scanned once
        leaves = [task(b, dask_key_name=f"{name}-leaf-{i}") for i, b in enumerate(batches)]
        root = _tree(
            leaves,
            lambda parts, lvl, j: dask.delayed(merge_many)(
                *parts, dask_key_name=f"{name}-merge-{lvl}-{j}"
            ),
        )

        class _Progress(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
                if isinstance(key, str) and key.startswith(f"{name}-leaf-"):
                    advance(int(key.rsplit("-", 1)[1]))

        with _Progress():
            (out,) = dask.compute(root, scheduler=self.scheduler, num_workers=self.workers)
        return out

    def _distributed(
        self,
        fn: Callable[..., Any],
        batches: Sequence[Any],
        advance: Callable[[int], None],
        kwargs: dict[str, Any],
    ) -> Any:
        """Results are merged on the workers as they complete, ``_FAN_IN`` at a time, and the
        driver drops its reference to each future once it is merged: the cluster holds about
        ``_FAN_IN`` finished results per merge level, not one per batch."""
        from distributed import as_completed

        client = self.client
        pending = as_completed()
        leaf_index: dict[str, int] = {}
        for i, b in enumerate(batches):
            f = client.submit(fn, b, **kwargs, pure=False)
            leaf_index[f.key] = i
            pending.add(f)
        ready: list[Any] = []
        for f in pending:
            if f.status == "error":
                f.result()  # raises the task's exception here
            i = leaf_index.pop(f.key, None)
            if i is not None:
                advance(i)
            ready.append(f)
            if len(ready) == _FAN_IN or (len(ready) > 1 and pending.is_empty()):
                pending.add(client.submit(merge_many, *ready, pure=False))
                ready = []
        return ready[0].result()


def _import_modules(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


def _tree(items: list[Any], combine: Callable[[list[Any], int, int], Any]) -> Any:
    level = 0
    while len(items) > 1:
        items = [
            combine(items[j : j + _FAN_IN], level, j // _FAN_IN)
            for j in range(0, len(items), _FAN_IN)
        ]
        level += 1
    return items[0] if len(items) == 1 else combine(items, level, 0)
