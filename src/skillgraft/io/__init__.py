"""Checkpoint I/O: lazy per-tensor reading, hub resolution, streaming shard writing, atomic output."""

from .reader import CheckpointReader
from .resolve import resolve_checkpoint
from .writer import ShardedWriter, TensorSpec

__all__ = ["CheckpointReader", "ShardedWriter", "TensorSpec", "resolve_checkpoint"]
