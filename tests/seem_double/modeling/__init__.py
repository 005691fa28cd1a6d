"""Test double of SEEM's ``modeling`` package (``modeling/__init__.py``)."""

from .architectures import build_model

__all__ = ["build_model"]
