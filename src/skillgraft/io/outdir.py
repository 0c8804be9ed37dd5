"""Atomic output directories: a failed or interrupted run leaves nothing that looks finished."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SkillgraftError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SKIP_FILES = {"README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``force``; fail before any work is done."""
    if out.exists():
        if not out.is_dir():
            raise SkillgraftError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            what = f"output directory {out} exists and is not empty"
            raise SkillgraftError(f"{what}; pass force=True to replace it", cli=f"{what}; pass --force to replace it")


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; move it to ``out`` only on success."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.skillgraft-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.skillgraft-old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy every non-weight file of a checkpoint (config, tokenizer, processor, chat template, ...)."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _SKIP_FILES:
            continue
        if f.suffix in _WEIGHT_SUFFIXES or f.name.startswith("skillgraft_"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
