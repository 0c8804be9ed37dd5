"""Paths inside a checkpoint directory: never follow a name or a link out of it.

A checkpoint's index names its shards and its directory holds side files; both come from whoever
published the checkpoint. A name with ``..``, an absolute path or a symbolic link could make a merge
read (and copy into its output) any file on the machine, so every such path must resolve inside the
checkpoint. The one exception is the Hugging Face hub cache, whose snapshot directories hold links
into the repository's own ``blobs/`` store (``snapshots/<rev>/x -> ../../blobs/<hash>``).
"""

from __future__ import annotations

import os
from pathlib import Path


def _roots(root: Path) -> list[Path]:
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # a hub cache snapshot: its files link into ../../blobs
        roots.append(real.parent.parent / "blobs")
    return roots


def inside_checkpoint(path: Path, root: Path) -> bool:
    """Whether ``path`` (links followed) lies inside checkpoint directory ``root`` (or its hub blob store)."""
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in _roots(root))


def checkpoint_file(root: Path, name: str) -> Path | None:
    """``root / name`` when ``name`` is a plain relative name that resolves inside the checkpoint, else None."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\0" in name:
        return None
    path = root / name
    return path if inside_checkpoint(path, root) else None
