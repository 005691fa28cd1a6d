"""Distributed set-up: the backend choice, collectives on CPU tensors, and (on a GPU machine)
NCCL beside gloo."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig

from train import distributed as tdist
from train.distributed import (
    all_reduce_sum,
    backend_for,
    broadcast_object,
    setup_distributed,
    wrap_model,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(monkeypatch, world: int = 1, rank: int = 0) -> None:
    for key, value in {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": _free_port(),
    }.items():
        monkeypatch.setenv(key, str(value))


def _device_map(backend: str) -> dict[str, str]:
    """How torch reads a backend string: device type -> backend (distributed_c10d.py)."""
    return {k: str(v) for k, v in BackendConfig(Backend(backend)).get_device_backend_map().items()}


def test_the_backend_serves_the_tensors_the_run_reduces():
    # CUDA runs all-reduce CUDA gradients and CPU tensors (confusion matrix, broadcast objects)
    assert _device_map(backend_for("cuda")) == {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" in _device_map(backend_for("cpu"))
    assert "cpu" not in _device_map("nccl")  # what a CUDA run used to join: no CPU tensors


def test_setup_joins_with_the_device_aware_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(f"device {i}"))
    assert setup_distributed("cuda") == tdist.Dist()  # not under torchrun: no group
    _torchrun_env(monkeypatch, world=2, rank=1)
    d = setup_distributed("cuda")
    assert calls == ["device 1", "cpu:gloo,cuda:nccl"]
    assert (d.rank, d.world, d.local_rank, d.joined, d.main) == (1, 2, 1, True, False)
    setup_distributed("cpu")
    assert calls[-1] == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(Exception, match="local rank 1 but 1 CUDA device"):
        setup_distributed("cuda")


def _collectives(device: torch.device, d: tdist.Dist) -> None:
    sums = torch.tensor([1.5, 2.0, 0.25], dtype=torch.float64, device=device)
    assert all_reduce_sum(sums, d).tolist() == [1.5, 2.0, 0.25]  # one process
    conf = torch.arange(9, dtype=torch.int64).view(3, 3)  # the confusion matrix: always CPU
    assert torch.equal(all_reduce_sum(conf.clone(), d), conf)
    assert broadcast_object({"iter": 4, "miou": 0.5}, d) == {"iter": 4, "miou": 0.5}


def test_a_one_process_group_runs_the_multi_process_code_path(monkeypatch):
    """torchrun with one process joins a group (DDP, collectives) like a larger run."""
    _torchrun_env(monkeypatch)
    d = setup_distributed("cpu")
    try:
        assert d.joined and dist.get_backend() == "gloo"
        _collectives(torch.device("cpu"), d)
        net, model = wrap_model(torch.nn.Conv2d(3, 2, 1), d, torch.device("cpu"))
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel) and net.module is model
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_and_gloo_collectives_on_a_gpu(monkeypatch):
    _torchrun_env(monkeypatch)
    d = setup_distributed("cuda")
    try:
        assert _device_map(dist.get_backend()) == {"cpu": "gloo", "cuda": "nccl"}
        _collectives(torch.device("cuda", 0), d)
        net, model = wrap_model(
            torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2)).cuda(),
            d,
            torch.device("cuda", 0),
        )
        assert isinstance(model[1], torch.nn.SyncBatchNorm)
        net(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()  # NCCL all-reduce
    finally:
        dist.destroy_process_group()
