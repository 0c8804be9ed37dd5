"""Data-free diagnostics of a VLM/expert pair (``skillgraft inspect``): task-vector norms, cosines,
sign conflicts and effective ranks per layer and module kind, plus lineage and tokenizer checks."""

from .inspect import Inspection, inspect_pair
from .render import plot, table, write_json

__all__ = ["Inspection", "inspect_pair", "plot", "table", "write_json"]
