"""Turn a checkpoint reference (local directory or hub id) into a local directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SkillgraftError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]


def resolve_checkpoint(ref: str, role: str = "checkpoint") -> Path:
    """A local directory for ``ref``: the directory itself, or a hub snapshot when online.

    ``role`` (vlm, base, expert) only serves the error message.
    """
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise SkillgraftError(f"{role} {ref}: expected a checkpoint directory, got a file")
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise SkillgraftError(f"{role} checkpoint not found: {ref}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise SkillgraftError(
            f"{role} {ref}: not a local directory and HF_HUB_OFFLINE is set; download it first or pass a local path"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=_HUB_FILES))
    except Exception as e:  # network, auth, missing repo: all are the user's to fix
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SkillgraftError(
            f"{role} {ref}: not a local directory and could not be fetched from the hub ({reason})"
        ) from None
