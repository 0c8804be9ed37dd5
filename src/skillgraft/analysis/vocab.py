"""Do the VLM and the expert share a tokenizer? Read from the checkpoints' tokenizer files, no model code.

A merged embedding row is only meaningful when the row's id means the same token in both models.
The vocabularies are read as the merge's own check reads them (``mapping.vocab``); this module
summarises them for ``inspect`` (sizes, ids shared, the first difference) instead of refusing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..mapping.vocab import parse_vocab, vocab_file


def read_vocab(checkpoint: str | Path) -> dict[int, str] | None:
    """id -> token of a checkpoint's tokenizer (``mapping.vocab``'s files), or None when it has none readable."""
    path = vocab_file(Path(checkpoint))
    if path is None:
        return None
    try:
        return parse_vocab(path, path.read_bytes()) or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def compare(vlm: dict[int, str] | None, expert: dict[int, str] | None) -> dict[str, Any]:
    """Sizes, ids that mean the same token in both, the first id that differs, and a verdict."""
    if vlm is None or expert is None:
        return {"verdict": "unknown: no readable tokenizer.json or vocab.json in "
                + ("the VLM" if vlm is None else "the expert"),
                "vlm_size": len(vlm) if vlm else None, "expert_size": len(expert) if expert else None}
    shared = sorted(set(vlm) & set(expert))
    same = [i for i in shared if vlm[i] == expert[i]]
    differ = [i for i in shared if vlm[i] != expert[i]]
    only_vlm = sorted(set(vlm) - set(expert))
    out: dict[str, Any] = {
        "vlm_size": len(vlm),
        "expert_size": len(expert),
        "shared_ids": len(shared),
        "same_token": len(same),
        "first_difference": ({"id": differ[0], "vlm": vlm[differ[0]], "expert": expert[differ[0]]} if differ else None),
        "vlm_only_ids": len(only_vlm),
        "vlm_only_examples": [vlm[i] for i in only_vlm[:5]],
    }
    if not differ and not only_vlm and len(expert) == len(vlm):
        out["verdict"] = "same vocabulary"
    elif not differ:
        out["verdict"] = (f"same tokens on the {len(shared)} shared ids; the VLM adds {len(only_vlm)} "
                          f"(e.g. {', '.join(out['vlm_only_examples'][:3]) or '-'})")
    else:
        out["verdict"] = (f"{len(differ)} of {len(shared)} shared ids name different tokens (first: id {differ[0]}); "
                          "merged embedding rows would mix unrelated tokens")
    return out
