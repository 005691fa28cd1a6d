"""Test double of SEEM's ``modeling/architectures/__init__.py``."""

from .build import build_model
from .seem_model_v1 import get_seem_model

__all__ = ["build_model", "get_seem_model"]
