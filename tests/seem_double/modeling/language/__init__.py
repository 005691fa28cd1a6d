"""Test double of SEEM's ``modeling/language`` package."""

from .vlpencoder import LanguageEncoder, build_tokenizer

__all__ = ["LanguageEncoder", "build_tokenizer"]
