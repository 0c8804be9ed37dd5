"""Upload a finished output directory to the Hugging Face hub (``--push-to-hub``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SkillgraftError
from .resolve import hub_offline, parse_hub_ref


def check_pushable(repo_id: str) -> None:
    """Refuse a push that cannot work before any merge is done: a malformed id, or offline mode."""
    hub = parse_hub_ref(repo_id)
    if hub is None or hub[1] is not None:
        raise SkillgraftError(f"cannot push to {repo_id!r}: expected a hub repository id, org/name")
    if hub_offline():
        raise SkillgraftError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it, or upload the output later")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (a model repository) if needed and upload ``folder``; returns the commit URL.

    Credentials are huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``).
    """
    check_pushable(repo_id)
    from huggingface_hub import HfApi  # deferred: huggingface_hub, needed only to push

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload a skillgraft merge")
    except Exception as e:  # network, auth, permissions: the user's to fix; the local output is complete
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SkillgraftError(f"{folder} is complete, but uploading it to {repo_id} failed ({reason})") from None
    return str(getattr(info, "commit_url", info))
