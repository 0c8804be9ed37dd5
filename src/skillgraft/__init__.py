"""skillgraft: inject the skill of an expert LLM into a VLM by merging weights."""

__version__ = "0.1.0"
