"""Distributed set-up and collectives (DDP under ``torchrun``).

On CUDA the process group is ``"cpu:gloo,cuda:nccl"``: NCCL carries the gradients and the
synchronised batch norms (CUDA tensors), gloo the small CPU tensors (the evaluation's confusion
matrix) and the objects broadcast from rank 0. NCCL alone has no CPU support, and gloo alone
would carry the gradients slowly. On CPU the group is gloo.

Every process runs the same command; rank *r* of *world* takes every world-th chunk of the
sample sequence (``train.data``), evaluates every world-th val image, and only rank 0 writes
files. Under ``torchrun`` the group is joined even with one process, so that a one-GPU machine
runs the multi-GPU code path (DDP, NCCL, gloo for CPU tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_manifest.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; ``joined`` is True once in a process group, ``created``
    when :func:`setup_distributed` created that group (and :func:`teardown_distributed` ends it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False
    created: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """The process-group backend for a run on ``device_type`` ("cpu" or "cuda").

    Collectives see CPU tensors on every device type (the confusion matrix, broadcast objects),
    so the CUDA backend pairs NCCL with gloo.
    """
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """True when ``torchrun`` (or another launcher) describes a process group in the environment."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def setup_distributed(device_type: str) -> Dist:
    """Join the process group that ``torchrun`` describes, if any (CUDA: select the local GPU).

    Raises:
        UserError: CUDA requested but more processes on this machine than GPUs.
    """
    if not under_torchrun():
        return Dist()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"torchrun: local rank {local_rank} but {count} CUDA device(s); expected "
                "--nproc_per_node <= the number of GPUs (NCCL needs one GPU per process)"
            )
        torch.cuda.set_device(local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend=backend_for(device_type))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, joined=True, created=created)


def teardown_distributed(d: Dist) -> None:
    """Destroy the process group that :func:`setup_distributed` created, once the run is over
    (NCCL otherwise warns at exit that its resources were not released; a group the caller
    created is left alone)."""
    if d.created and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` for "cuda" (or "auto" with a GPU), else the CPU.

    Raises:
        UserError: "cuda" without a CUDA device.
    """
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(
                "[train] device = 'cuda': no CUDA device is available; expected 'auto' or 'cpu'"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_type(kind: str) -> str:
    """ "cuda" or "cpu" for a ``[train] device`` value ("auto", "cpu", "cuda")."""
    return "cuda" if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()) else "cpu"


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` over all processes in place (CPU or CUDA tensor) and return it."""
    if d.joined:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every process (a picklable value; sent through gloo on the CPU)."""
    if not d.joined:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics), so that all ranks
    evaluate the model that rank 0 saves. Without SyncBatchNorm (CPU runs) each rank's last
    forward pass has updated its own statistics."""
    if d.joined:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def wrap_model(model: nn.Module, d: Dist, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(net, model)``: the network to train through and the bare model it wraps.

    In a process group, batch norms are synchronised on CUDA (``SyncBatchNorm``, as UniMatch)
    and ``net`` is ``DistributedDataParallel``; otherwise ``net`` is ``model``. Checkpoints,
    evaluation and the Stage II targets use the bare ``model``.
    """
    if not d.joined:
        return model, model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [d.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids), model
