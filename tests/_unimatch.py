"""UniMatch's own code for the comparison tests: ``../shared/upstream/unimatch`` beside the
project (LiheYoung/UniMatch 0324f3d, unmodified), imported with the shims a CPU machine needs.

* ``model/`` and ``dataset/transform.py`` are imported as they are; ``torchvision`` (which
  ``transform.py`` imports for functions these tests do not call) is a stub when it is not
  installed, and ``resnet._resnet`` is called with ``pretrained=False`` (upstream reads
  ``pretrained/<arch>.pth``, an ImageNet file not shipped).
* The training step of ``fixmatch.py`` / ``unimatch.py`` is their own source: the body of
  ``main()``'s ``for ... in enumerate(loader)`` loop up to ``optimizer.step()`` (plus the mask
  ratio), parsed with ``ast`` and executed on given batches, with ``.cuda()`` calls removed
  (kept on a GPU machine) and ``torch.distributed.barrier()`` left out; the optimizer and the
  criteria are ``main()``'s own statements.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "unimatch"
ABSENT = f"UniMatch's source is not at {UPSTREAM} (../shared/upstream/unimatch)"
_PACKAGES = ("model", "dataset", "util", "torchvision")


def load() -> types.SimpleNamespace:
    """UniMatch's ``model.backbone.resnet``, ``DeepLabV3Plus`` and ``dataset.transform``.

    Their top-level names (``model``, ``dataset``) are generic: they are imported from the
    upstream folder and taken out of ``sys.modules`` again, so nothing else sees them.
    """
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] in _PACKAGES}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module("torchvision")
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.SimpleNamespace()  # type: ignore[attr-defined]
        sys.modules["torchvision"] = stub
    sys.path.insert(0, str(UPSTREAM))
    try:
        resnet = importlib.import_module("model.backbone.resnet")
        deeplab = importlib.import_module("model.semseg.deeplabv3plus")
        transform = importlib.import_module("dataset.transform")
    finally:
        sys.path.remove(str(UPSTREAM))
        for k in [k for k in sys.modules if k.split(".")[0] in _PACKAGES]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(
        resnet=resnet, DeepLabV3Plus=deeplab.DeepLabV3Plus, transform=transform
    )


def config(name: str = "pascal", **overrides: Any) -> dict[str, Any]:
    """UniMatch's ``configs/<name>.yaml`` with ``overrides``."""
    cfg = yaml.safe_load((UPSTREAM / "configs" / f"{name}.yaml").read_text())
    return {**cfg, **overrides}


def build_deeplab(up: types.SimpleNamespace, backbone: str, nclass: int) -> nn.Module:
    """UniMatch's ``DeepLabV3Plus(cfg)`` (``configs/pascal.yaml``'s dilations), random weights."""
    original = up.resnet._resnet

    def no_imagenet_file(arch, block, layers, pretrained, **kwargs):  # noqa: ANN001, ANN202
        return original(arch, block, layers, False, **kwargs)

    up.resnet._resnet = no_imagenet_file
    try:
        return up.DeepLabV3Plus(config(backbone=backbone, nclass=nclass))
    finally:
        up.resnet._resnet = original


# UniMatch's module names → this project's (the backbone keys are the same).
_RENAME = [
    ("head.b0.", "aspp.branches.0."),
    ("head.b1.", "aspp.branches.1."),
    ("head.b2.", "aspp.branches.2."),
    ("head.b3.", "aspp.branches.3."),
    ("head.b4.gap.", "aspp.pool."),
    ("head.project.", "aspp.project."),
    ("fuse.0.", "fuse.0.0."),
    ("fuse.1.", "fuse.0.1."),
    ("fuse.3.", "fuse.1.0."),
    ("fuse.4.", "fuse.1.1."),
]


def our_name(key: str) -> str:
    for old, new in _RENAME:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def map_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UniMatch DeepLabV3+ state dict under this project's module names."""
    return {our_name(k): v.clone() for k, v in state.items()}


def randomize_batch_norms(model: nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


class _NoCuda(ast.NodeTransformer):
    """``x.cuda(...)`` → ``x``: the tensors and modules stay on the CPU."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            return node.func.value
        return node


def _is_call(stmt: ast.stmt, dotted: str) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and ast.unparse(stmt.value.func) == dotted
    )


def _assignment(main: ast.FunctionDef, name: str) -> ast.stmt:
    """The first statement of ``main`` (at any depth) that assigns ``name``."""
    for node in ast.walk(main):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node
    raise LookupError(f"no assignment to {name} in main()")


class Script:
    """One of UniMatch's training scripts (``fixmatch.py``, ``unimatch.py``), parsed."""

    def __init__(self, name: str) -> None:
        self.path = UPSTREAM / name
        tree = ast.parse(self.path.read_text())
        self.main = next(
            n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"
        )

    def _run(
        self, statements: list[ast.stmt], namespace: dict[str, Any], cuda: bool = False
    ) -> dict[str, Any]:
        if not cuda:
            statements = [_NoCuda().visit(s) for s in statements]
        module = ast.Module(body=statements, type_ignores=[])
        exec(compile(ast.fix_missing_locations(module), str(self.path), "exec"), namespace)
        return namespace

    def optimizer(self, model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
        """``main()``'s SGD with its two parameter groups."""
        ns = {"SGD": torch.optim.SGD, "model": model, "cfg": cfg}
        return self._run([_assignment(self.main, "optimizer")], ns)["optimizer"]

    def criteria(self, cfg: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        """``main()``'s ``criterion_l`` (the CELoss branch) and ``criterion_u``."""
        ns = self._run(
            [_assignment(self.main, "criterion_l"), _assignment(self.main, "criterion_u")],
            {"nn": nn, "cfg": cfg, "local_rank": 0},
        )
        return ns["criterion_l"], ns["criterion_u"]

    def step(self, namespace: dict[str, Any], cuda: bool = False) -> dict[str, Any]:
        """Run one iteration of the training loop on ``namespace["loader"]`` (a list holding one
        tuple of batches as the script's ``zip`` of loaders yields it); returns the loop's
        variables (targets, losses, mask ratio) after ``optimizer.step()``. ``cuda`` keeps the
        loop's ``.cuda()`` calls (a GPU machine runs it as upstream does)."""
        loop = next(
            n
            for n in ast.walk(self.main)
            if isinstance(n, ast.For) and ast.unparse(n.iter) == "enumerate(loader)"
        )
        body: list[ast.stmt] = []
        for stmt in loop.body:
            if _is_call(stmt, "torch.distributed.barrier"):
                continue
            body.append(stmt)
            if _is_call(stmt, "optimizer.step"):
                break
        body.append(_assignment(self.main, "mask_ratio"))
        one = ast.For(target=loop.target, iter=loop.iter, body=body, orelse=[])
        return self._run([one], {"torch": torch, **namespace}, cuda)
