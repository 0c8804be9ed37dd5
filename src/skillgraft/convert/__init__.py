"""Recipes from other tools' merge configurations (mergekit YAML)."""

from .mergekit import convert_mergekit, is_mergekit_config

__all__ = ["convert_mergekit", "is_mergekit_config"]
