"""Conformal calibration of cached annotator scores, and filtered pseudo-label PNGs.

Command line: ``python -m calibrate run --config configs/demo.toml``. In Python::

    >>> from calibrate.quantile import exact_quantile, conformal_rank
    >>> from calibrate.sets import class_scores, prediction_sets, pseudo_label
    >>> report = calibrate.check_complete("runs/demo/pseudo/cp")  # refuses a half-written folder
"""

from calibrate.config import CalibrateConfig
from calibrate.folder import check_complete
from calibrate.quantile import conformal_rank, exact_quantile, small_quantile
from calibrate.sets import class_scores, prediction_sets, pseudo_label, true_class_scores

__all__ = [
    "CalibrateConfig",
    "check_complete",
    "class_scores",
    "conformal_rank",
    "exact_quantile",
    "prediction_sets",
    "pseudo_label",
    "small_quantile",
    "true_class_scores",
]
