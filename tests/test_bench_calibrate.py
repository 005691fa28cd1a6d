"""bench/calibrate_bench.py's before/after figures: the vectorised rules equal the loops they
replaced (the benchmark asserts it; this runs that part on its own)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "calibrate_bench", Path(__file__).resolve().parents[1] / "bench" / "calibrate_bench.py"
)
B = importlib.util.module_from_spec(_spec)
sys.modules["calibrate_bench"] = B
_spec.loader.exec_module(B)


def test_vectorised_rules_equal_the_per_class_loops() -> None:
    fig = B.argmax_figures(repeats=1)  # raises AssertionError where they differ
    assert set(fig) == {"K21", "K150"}
    for per_k in fig.values():
        assert per_k["cp_rule_pixel_speedup"] > 0 and per_k["cp_rule_class_speedup"] > 0
