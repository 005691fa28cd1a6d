"""Every run config shipped under configs/ parses with every stage's section dataclass."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotate.config import AnnotateConfig
from calibrate.config import CalibrateConfig
from data_manifest import DataConfig
from data_manifest.config import load_config, parse_section
from train.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
SECTIONS = {
    "data": DataConfig,
    "annotate": AnnotateConfig,
    "calibrate": CalibrateConfig,
    "train": TrainConfig,
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    for name, cls in SECTIONS.items():
        parse_section(cfg, name, cls)


def test_there_are_configs():
    assert {"demo.toml", "demo_annotator.toml", "voc_1_16_seem.toml", "ade20k_1_128_seem.toml"} <= {
        p.name for p in CONFIGS
    }
