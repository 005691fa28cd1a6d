"""Test double of SEEM's ``utils/distributed.py``: like upstream it imports ``mpi4py`` at the
top, so every module that imports it (``utils/model.py``, hence ``modeling/BaseModel.py``)
needs mpi4py installed."""

import os

import torch
from mpi4py import MPI  # noqa: F401  (upstream imports it here, for apply_distributed)


def init_distributed(opt):
    """The single-process branch of upstream's ``init_distributed`` (upstream then also runs
    ``hostname -I`` in a shell and broadcasts over MPI; left out here)."""
    opt["CUDA"] = opt.get("CUDA", True) and torch.cuda.is_available()
    opt.update(world_size=1, local_size=1, rank=0, local_rank=0)
    if not opt["CUDA"]:
        opt["device"] = torch.device("cpu")
    else:
        torch.cuda.set_device(opt["local_rank"])
        opt["device"] = torch.device("cuda", opt["local_rank"])
    return opt


def is_main_process():
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", 0)) == 0
