"""CUDA calls made observable on a CPU-only build of torch.

SEEM's code decides where things go through a handful of calls: ``torch.cuda.set_device`` and
``current_device``, ``Tensor.cuda()`` (the current device), ``Tensor.to``/``Module.to``,
``torch.load(map_location=...)`` and tensor factories given a CUDA ``device=`` (``torch.ones(...,
device=torch.cuda.current_device())`` in ``seem_model_v1.py``). :class:`FakeCuda` replaces them
while a test runs: it
reports ``count`` CUDA devices, keeps a current device, records every placement on a CUDA
device in :attr:`FakeCuda.events` (in call order) and leaves the tensors where they are, so
that the order and the targets of those calls can be checked without a GPU. The same tests
run against real CUDA in ``tests/test_annotate_seem.py::test_seem_double_on_real_cuda``.
:func:`install_in_process` installs it for a whole process (a ``sitecustomize`` module in the
upstream tests: ``python -m annotate run`` with SEEM's real code on a CPU).
"""

from __future__ import annotations

from typing import Any

import torch

PLACEMENTS = ("tensor.cuda", "tensor.to", "module.to", "load", "factory")
FACTORIES = ("ones", "zeros", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn")


class FakeCuda:
    """Events: ("set_device", i), ("current_device", i), ("tensor.cuda", i),
    ("tensor.to", i), ("module.to", i, class name), ("load", i), ("factory", i, name)."""

    def __init__(self, count: int = 2):
        self.count = count
        self.current = 0
        self.events: list[tuple] = []

    def index(self, device: Any) -> int | None:
        """The CUDA index ``device`` names (the current one for "cuda"), None if not CUDA."""
        if device is None or isinstance(device, bool):
            return None
        if isinstance(device, int):
            return device
        d = torch.device(device)
        if d.type != "cuda":
            return None
        return self.current if d.index is None else d.index

    def placements(self) -> list[tuple]:
        return [e for e in self.events if e[0] in PLACEMENTS]

    def first(self, kind: str) -> int:
        """Position of the first event of ``kind`` (len(events) if none)."""
        return next((i for i, e in enumerate(self.events) if e[0] == kind), len(self.events))

    def install(self, monkeypatch: Any) -> FakeCuda:
        tensor_to, module_to, load = torch.Tensor.to, torch.nn.Module.to, torch.load

        def set_device(device: Any) -> None:
            i = self.index(device)
            assert i is not None and 0 <= i < self.count, f"set_device({device!r})"
            self.current = i
            self.events.append(("set_device", i))

        def current_device() -> int:
            self.events.append(("current_device", self.current))
            return self.current

        def parse(args: tuple, kwargs: dict) -> tuple[Any, Any]:
            if args and isinstance(args[0], int) and not isinstance(args[0], bool):
                return args[0], None
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            return device, dtype

        def t_cuda(t: torch.Tensor, device: Any = None, *args: Any, **kwargs: Any):
            i = self.index("cuda" if device is None else device)
            self.events.append(("tensor.cuda", i))
            return t

        def t_to(t: torch.Tensor, *args: Any, **kwargs: Any):
            device, dtype = parse(args, kwargs)
            i = self.index(device)
            if i is None:
                return tensor_to(t, *args, **kwargs)
            self.events.append(("tensor.to", i))
            return t if dtype is None else tensor_to(t, dtype)

        def m_to(m: torch.nn.Module, *args: Any, **kwargs: Any):
            device, dtype = parse(args, kwargs)
            i = self.index(device)
            if i is None:
                return module_to(m, *args, **kwargs)
            self.events.append(("module.to", i, type(m).__name__))
            return m if dtype is None else module_to(m, dtype)

        def fake_load(f: Any, map_location: Any = None, **kwargs: Any):
            i = None
            if not (callable(map_location) or isinstance(map_location, dict)):
                i = self.index(map_location)
            if i is not None:
                self.events.append(("load", i))
                map_location = "cpu"
            return load(f, map_location=map_location, **kwargs)

        def factory(name: str, make: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
                i = self.index(kwargs.get("device"))
                if i is not None:
                    self.events.append(("factory", i, name))
                    kwargs["device"] = "cpu"
                return make(*args, **kwargs)

            return wrapped

        for name in FACTORIES:
            monkeypatch.setattr(torch, name, factory(name, getattr(torch, name)))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "current_device", current_device)
        monkeypatch.setattr(torch.Tensor, "cuda", t_cuda)
        monkeypatch.setattr(torch.Tensor, "to", t_to)
        monkeypatch.setattr(torch.nn.Module, "to", m_to)
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda m, d=None: m_to(m, d or "cuda"))
        monkeypatch.setattr(torch, "load", fake_load)
        return self


def install_in_process(count: int = 1) -> FakeCuda:
    """Install a :class:`FakeCuda` for the rest of this process (no undo)."""
    import types

    return FakeCuda(count).install(types.SimpleNamespace(setattr=setattr))
