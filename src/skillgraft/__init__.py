"""skillgraft: inject the skill of an expert LLM into a VLM by merging weights."""

from .version import __version__

__all__ = ["__version__"]
