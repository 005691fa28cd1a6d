"""The run folder (``[train] out``): what a run writes, and what a resumed run must share.

| file | written |
|---|---|
| ``config.toml`` | the resolved config, at the start |
| ``metrics.jsonl`` | one line per step and per evaluation, flushed as it goes |
| ``latest.pt`` | model + optimizer + counters (``train_state``), at the checkpoint cadence |
| ``best.pt`` | the model of the best val mIoU so far |
| ``final.json`` | the final figures, at the end |
| ``loss.png``, ``miou.png`` | the curves, after each evaluation |

Only the writing process (rank 0) changes files. Resuming reads ``latest.pt``, refuses a run
that would compute something else (:class:`RunIdentity`), and cuts ``metrics.jsonl`` back to
the checkpoint's iteration, so a run killed at any moment and re-run writes the same bytes as
an uninterrupted one.

The folder is the trainer's own (:mod:`data_manifest.ownership`): ``train fit`` writes only
into a new or empty folder, or one it marked (folders written before the mark are recognised
by their checkpoints and logs, :func:`written_by_train`), and a fresh run removes only the
files listed above. The command line holds the folder's lock for the whole run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from torch import nn

from data_manifest.config import write_resolved
from data_manifest.errors import UserError
from data_manifest.io import atomic_write_json, atomic_write_text
from data_manifest.ownership import check_claim, claim
from train.checkpoint import read_checkpoint, save_checkpoint
from train.plots import plot_curves

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
OUTPUTS = ("metrics.jsonl", "latest.pt", "best.pt", "final.json", "loss.png", "miou.png")
OWNER = "train fit"
LOSS_KEYS = ("loss", "loss_s", "loss_u")


def written_by_train(folder: Path) -> bool:
    """An unmarked folder a ``train fit`` of an earlier version wrote: it holds the trainer's
    checkpoints or log and none of calibrate's files."""
    names = {p.name for p in folder.iterdir()}
    return bool(names & {"latest.pt", "metrics.jsonl", "final.json"}) and not (
        names & {"calibration.json", "calibration.incomplete"}
    )


def check_out(out: Path, option: str) -> None:
    """Refuse, before any work, a run folder ``train fit`` may not write into."""
    check_claim(out, OWNER, option, legacy=written_by_train)


def pseudo_fingerprint(pseudo_dir: Path) -> str | None:
    """sha256 of ``calibration.json`` beside the pseudo-labels (None when there is none)."""
    path = pseudo_dir / "calibration.json"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """What a resumed run must share with the run it continues (stored in ``train_state``)."""

    config: dict[str, Any]
    seed: int
    manifest_fingerprint: str
    pseudo_fingerprint: str | None
    world_size: int


def _check_same_run(
    identity: RunIdentity,
    state: dict[str, Any],
    folder: RunFolder,
    manifest_path: Path,
    pseudo_dir: Path,
) -> None:
    """Raise a one-line UserError at the first way ``state`` (a stored ``train_state``) and
    ``identity`` differ."""
    latest = folder.latest
    old = state.get("config", {})
    for key in sorted(set(old) | set(identity.config)):
        if key not in RESUME_FREE_KEYS and old.get(key) != identity.config.get(key):
            raise UserError(
                f"{latest}: [train] {key} = {old.get(key)!r} in the run being resumed but "
                f"{identity.config.get(key)!r} now; expected the same value (or --restart, "
                "or another --out)"
            )
    if state.get("seed") != identity.seed:
        raise UserError(
            f"{latest}: seed = {state.get('seed')!r} in the run being resumed but "
            f"{identity.seed} now; expected the same seed (or --restart)"
        )
    if state.get("manifest_fingerprint") != identity.manifest_fingerprint:
        raise UserError(
            f"{latest}: the run was trained on another manifest (fingerprint differs from "
            f"{manifest_path}); expected the same dataset"
        )
    if state.get("pseudo_fingerprint") != identity.pseudo_fingerprint:
        raise UserError(
            f"{pseudo_dir / 'calibration.json'}: the pseudo-labels changed since the run in "
            f"{folder.path} began; expected the same ones (or --restart, or another --out)"
        )
    if state.get("world_size") != identity.world_size:
        raise UserError(
            f"{latest}: the run used {state.get('world_size')} processes, now "
            f"{identity.world_size}; expected the same number to resume exactly"
        )


class RunFolder:
    """One run's output folder. ``writer`` False (DDP ranks > 0): reads only, writes nothing."""

    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self._metrics: IO[str] | None = None

    @property
    def latest(self) -> Path:
        return self.path / "latest.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def resume_checkpoint(
        self, identity: RunIdentity, manifest_path: Path, pseudo_dir: Path
    ) -> dict[str, Any] | None:
        """``latest.pt`` as a dict when it exists and continues this run, else None.

        Raises:
            UserError: no ``train_state`` in it, or a run that would compute something else
                (names the key, the seed, the manifest, the pseudo-labels or the process count).
        """
        if not self.latest.is_file():
            return None
        ckpt = read_checkpoint(self.latest)
        state = ckpt.get("train_state")
        if not isinstance(state, dict):
            raise UserError(
                f"{self.latest}: has no training state; expected a latest.pt written by "
                "python -m train fit"
            )
        _check_same_run(identity, state, self, manifest_path, pseudo_dir)
        return ckpt

    def prepare(self, start: int, resolved: dict[str, Any] | None) -> None:
        """Before training: a fresh run (``start`` 0) removes an earlier run's outputs; a
        resumed one cuts ``metrics.jsonl`` back to ``start``. Writes the resolved config."""
        if not self.writer:
            return
        claim(self.path, OWNER, "[train] out", legacy=written_by_train)
        if start == 0:
            for name in OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
        elif self.metrics.is_file():
            keep = []
            for line in self.metrics.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a kill
                if rec.get("iter", 0) > start:
                    break
                keep.append(line)
            atomic_write_text(self.metrics, "".join(x + "\n" for x in keep))
        if resolved is not None:
            write_resolved(self.path / "config.toml", resolved)

    def last_eval(self, it: int, classes: list[str]) -> dict[str, Any] | None:
        """The evaluation logged at iteration ``it`` in ``metrics.jsonl``, if any (resume)."""
        if not self.metrics.is_file():
            return None
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["type"] == "eval" and rec["iter"] == it:
                return {
                    "iter": it,
                    "miou": rec["miou"],
                    "acc": rec["acc"],
                    "iou": dict(zip(classes, rec["iou"], strict=True)),
                }
        return None

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` and flush it (a kill loses at most this line).

        Raises:
            UserError: a training loss that is nan or inf: the run diverged, and every later
                step, checkpoint and evaluation would be meaningless.
        """
        if not self.writer:
            return
        bad = [
            k
            for k in LOSS_KEYS
            if isinstance(record.get(k), float) and not math.isfinite(record[k])
        ]
        if record.get("type") == "train" and bad:
            raise UserError(
                f"{self.metrics}: {bad[0]} = {record[bad[0]]} at iteration {record.get('iter')}; "
                "expected finite losses: the run diverged (try a lower [train] lr); the "
                "checkpoints hold the last state saved before"
            )
        if self._metrics is None:
            self._metrics = open(self.metrics, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def save(
        self,
        name: str,
        model: nn.Module,
        info: dict[str, Any],
        train_state: dict[str, Any] | None = None,
    ) -> None:
        """Write checkpoint ``name`` (``latest.pt`` or ``best.pt``) atomically."""
        if self.writer:
            save_checkpoint(self.path / name, model, info, train_state)

    def write_final(self, final: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / "final.json", final)

    def plot(self) -> None:
        if self.writer:
            plot_curves(self.metrics, self.path)


def train_state(identity: RunIdentity, counters: dict[str, Any]) -> dict[str, Any]:
    """The ``train_state`` of ``latest.pt``: ``counters`` (iteration, optimizer, scaler,
    best_miou, best_iter) and the run's identity, as plain values."""
    identity_fields = asdict(identity)
    return {**counters, **identity_fields}
