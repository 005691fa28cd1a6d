"""The run config loader shared by every stage (data_manifest/config.py)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from data_manifest.config import dump_toml, load_config, parse_section, write_resolved
from data_manifest.errors import UserError


@dataclass
class Section:
    alpha: float = 0.05
    mode: Literal["pixel", "class"] = "pixel"
    splits: tuple[str, ...] = ("labeled",)
    steps: int = 10
    out: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha = {self.alpha}: expected a number in (0, 1)")


def write(tmp_path, text: str):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_overrides_and_types(tmp_path):
    p = write(tmp_path, 'run_dir = "r"\n[calibrate]\nalpha = 0.1\nsplits = ["a", "b"]\n')
    cfg = load_config(p)
    s = parse_section(cfg, "calibrate", Section, {"steps": 3, "mode": None})
    assert (s.alpha, s.splits, s.steps, s.mode) == (0.1, ("a", "b"), 3, "pixel")
    assert parse_section({}, "calibrate", Section) == Section()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[calibrate]\nalpah = 0.1\n", "[calibrate] unknown key 'alpah'; expected one of alpha"),
        ("[calibrate]\nalpha = '0.1'\n", "[calibrate] alpha = '0.1'; expected a number"),
        ("[calibrate]\nalpha = 1.5\n", "[calibrate] alpha = 1.5: expected a number in (0, 1)"),
        ("[calibrate]\nmode = 'image'\n", "expected one of 'pixel', 'class'"),
        ("[calibrate]\nsteps = true\n", "steps = True; expected an integer"),
        ("[calibrate]\nsplits = [1]\n", "expected a list of a string"),
    ],
)
def test_section_errors_name_file_key_and_expectation(tmp_path, body, message):
    p = write(tmp_path, body)
    with pytest.raises(UserError) as err:
        parse_section(load_config(p), "calibrate", Section)
    assert str(p) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[calibrat]\n", "unknown key 'calibrat'"),
        ("seed = 'x'\n", "seed = 'x'; expected int"),
        ("[data\n", "invalid TOML"),
        ("calibrate = 3\n", "[calibrate] must be a table"),
    ],
)
def test_file_level_errors(tmp_path, body, message):
    p = write(tmp_path, body)
    with pytest.raises(UserError, match=None) as err:
        load_config(p)
    assert message in str(err.value) and str(p) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips(tmp_path):
    resolved = {
        "run_dir": "runs/x",
        "seed": 3,
        "empty": None,
        "calibrate": {
            "alpha": 0.05,
            "splits": ["a", "b"],
            "out": None,
            "ok": True,
            "name": 'q"uote\\',
            "extra": {"k": "v"},
        },
    }
    path = write_resolved(tmp_path / "sub" / "config.toml", resolved)
    back = tomllib.loads(path.read_text())
    expected = {k: v for k, v in resolved.items() if v is not None}
    expected["calibrate"] = {k: v for k, v in resolved["calibrate"].items() if v is not None}
    assert back == expected
    assert "# out is not set" in dump_toml(resolved)
