"""Merge methods as pure tensor functions, and the registry that names them.

Adding a method: write a small module with its function and a ``Method`` record, and list the
record in ``_ALL`` below. Nothing registers itself at import time.
"""

from __future__ import annotations

from . import dare, ta, ties
from .base import Method, Param

_ALL: tuple[Method, ...] = (
    ta.METHOD,
    ties.METHOD,
    dare.METHOD_LINEAR,
    dare.METHOD_TIES,
)

METHODS: dict[str, Method] = {m.name: m for m in _ALL}

__all__ = ["METHODS", "Method", "Param", "get_method"]


def get_method(name: str) -> Method:
    """The registered method called ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
