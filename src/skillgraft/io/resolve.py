"""Turn a checkpoint reference (local directory, hub id, or ``org/name@revision``) into a local directory.

A hub reference resolves through huggingface_hub's cache: online it downloads what a merge needs
(configs, weights, tokenizer and processor files); with ``HF_HUB_OFFLINE=1`` it resolves from the
cache alone, as transformers does. Either way the commit hash of the snapshot is known, so a saved
recipe can pin every hub input (``org/name@<commit>``) and reproduce the merge after the repository
changes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SkillgraftError

_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w][\w./-]*))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "README.md"]
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Resolved:
    """Where a checkpoint reference points: a local directory, and for a hub input its id and commit."""

    ref: str
    path: Path
    repo_id: str | None = None      # the hub id (None: a local directory)
    revision: str | None = None     # the revision asked for (branch, tag or commit); None: the default branch
    commit: str | None = None       # the commit hash of the snapshot

    @property
    def pinned(self) -> str:
        """The reference that always means this exact checkpoint: ``org/name@<commit>`` or an absolute path."""
        if self.repo_id is None:
            return str(self.path.resolve())
        return f"{self.repo_id}@{self.commit}" if self.commit else self.ref


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``org/name@rev`` -> (``org/name``, ``rev``); ``org/name`` -> (``org/name``, None); else None."""
    if ref.startswith((".", "/", "~")):
        return None
    m = _HUB_REF.match(ref)
    if m is None or ".." in ref:
        return None
    return m.group("repo"), m.group("rev")


def display_name(ref: str) -> str:
    """A short name for reports: a directory's name, or a hub id's name without its revision."""
    hub = parse_hub_ref(ref) if not Path(ref).expanduser().is_dir() else None
    if hub is not None:
        return hub[0].split("/")[-1]
    return Path(ref.rstrip("/")).name or ref


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now rather than at import."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants  # deferred: huggingface_hub, needed only for hub ids
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    # read at call time: huggingface_hub reads HF_HUB_CACHE once, when it is imported
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or None


def resolve(ref: str, role: str = "checkpoint") -> Resolved:
    """Resolve ``ref``; ``role`` (vlm, base, expert) only serves the error message."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return Resolved(ref, p)
    if p.exists():
        raise SkillgraftError(f"{role} {ref}: expected a checkpoint directory, got a file")
    hub = parse_hub_ref(ref)
    if hub is None:
        raise SkillgraftError(f"{role} checkpoint not found: {ref}")
    repo_id, revision = hub
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download  # deferred: huggingface_hub, needed only for hub ids

        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES,
                                      cache_dir=_cache_dir(), local_files_only=offline))
    except Exception as e:  # network, auth, missing repo or revision: all are the user's to fix
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        at = f" at revision {revision}" if revision else ""
        if offline:
            raise SkillgraftError(
                f"{role} {ref}: not a local directory, and HF_HUB_OFFLINE is set but the hub cache holds no "
                f"snapshot of {repo_id}{at}; download it once online, or give a local path"
            ) from None
        raise SkillgraftError(
            f"{role} {ref}: not a local directory and could not be fetched from the hub ({reason})"
        ) from None
    commit = path.name if _COMMIT.match(path.name) else None
    return Resolved(ref, path, repo_id, revision, commit)


def resolve_checkpoint(ref: str, role: str = "checkpoint") -> Path:
    """A local directory for ``ref``: the directory itself, or a hub snapshot (online, or cached offline)."""
    return resolve(ref, role).path
