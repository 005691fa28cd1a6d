"""The ``[data]`` section of the run config, and how every stage finds its manifest.

>>> from data_manifest import resolve_manifest
>>> from data_manifest.config import load_config
>>> path = resolve_manifest(load_config("configs/demo.toml"))  # makes the demo if needed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_manifest.config import parse_section
from data_manifest.errors import UserError


@dataclass
class DataConfig:
    """``[data]``: which manifest to use, and the embedded demo's parameters.

    ``manifest`` empty means ``{demo_root}/target/manifest.jsonl`` when ``demo`` is on.
    """

    manifest: str = ""
    demo: bool = False
    demo_root: str = "data/demo"
    demo_seed: int = 0
    demo_gap: float = 0.5
    demo_size: int = 128
    demo_source_labeled: int = 300
    demo_source_val: int = 60
    demo_target_labeled: int = 24
    demo_target_unlabeled: int = 300
    demo_target_val: int = 100

    def __post_init__(self) -> None:
        self.demo_params()  # range checks live in DemoParams

    def demo_params(self) -> Any:
        """The :class:`data_manifest.demo.DemoParams` these keys describe."""
        from data_manifest.demo import DemoParams

        return DemoParams(
            seed=self.demo_seed,
            gap=self.demo_gap,
            size=self.demo_size,
            source_labeled=self.demo_source_labeled,
            source_val=self.demo_source_val,
            target_labeled=self.demo_target_labeled,
            target_unlabeled=self.demo_target_unlabeled,
            target_val=self.demo_target_val,
        )

    def manifest_path(self) -> Path:
        if self.manifest:
            return Path(self.manifest)
        return Path(self.demo_root) / "target" / "manifest.jsonl"


def data_config(cfg: dict[str, Any], manifest: str | None = None) -> DataConfig:
    """Read ``[data]`` from a loaded run config; ``manifest`` overrides the file's value."""
    return parse_section(cfg, "data", DataConfig, overrides={"manifest": manifest})


def resolve_manifest(cfg: dict[str, Any], manifest: str | None = None, quiet: bool = True) -> Path:
    """The manifest path of a run config, generating the demo dataset first if configured.

    With ``demo = true`` the demo is generated under ``demo_root`` unless a complete one with
    the same parameters is there already (a few seconds). ``manifest`` (a ``--manifest``
    command-line option) overrides ``[data] manifest``. ``quiet=False`` shows a progress bar
    while the demo is generated.

    Raises:
        UserError: no manifest configured, or the configured file does not exist.
    """
    dc = data_config(cfg, manifest)
    source = cfg.get("_source", "<command line>")
    if not dc.manifest and not dc.demo:
        raise UserError(
            f"{source}: [data] manifest is not set; expected the path of a manifest.jsonl "
            "(python -m data_manifest build ...) or demo = true"
        )
    path = dc.manifest_path()
    if dc.demo:
        from data_manifest import demo

        params = dc.demo_params()
        option = f"{source}: [data] demo_root"
        if not demo.is_generated(dc.demo_root, params):
            demo.check_root(dc.demo_root, option)
            if quiet:
                demo.generate(dc.demo_root, params, option=option)
            else:
                from data_manifest.cli_support import progress

                with progress() as bar:
                    task = bar.add_task("demo dataset", total=demo.total_images(params), rate="")
                    demo.generate(
                        dc.demo_root, params, tick=lambda: bar.advance(task), option=option
                    )
    if path.is_dir():
        raise UserError(
            f"{source}: [data] manifest = {str(path)!r} is a folder; expected a manifest.jsonl "
            "made by python -m data_manifest build"
        )
    if not path.is_file():
        hint = f" (demo = true writes {dc.demo_root}/source and /target)" if dc.demo else ""
        if not path.is_absolute():
            hint += (
                f" (relative paths in a run config are read from the current folder, {Path.cwd()})"
            )
        raise UserError(
            f"{source}: [data] manifest = {str(path)!r} does not exist{hint}; expected a "
            "manifest.jsonl made by python -m data_manifest build"
        )
    return path
