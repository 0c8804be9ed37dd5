"""Tokenizer compatibility: the embedding rows a merge adds up must stand for the same tokens.

A task vector's row i is added to the VLM's row i. If the expert's tokenizer gives id i to another
token than the VLM's (a re-trained or re-ordered vocabulary of the same size), the merge silently
moves every such token's embedding onto another. Before any weight is read, the vocabularies of the
VLM, the experts and the base are compared on the ids of the merged vocabulary rows, from
``tokenizer.json`` (the ``tokenizers`` library's file: its model vocabulary plus added tokens),
``vocab.json`` (+ ``added_tokens.json``) or ``vocab.txt``. Reserved placeholder tokens
(``<unused12>``, ``<|reserved_special_token_3|>``, ...) that a VLM may have renamed for its own use
are not counted as differences. A checkpoint without any of these files is reported, not refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import SkillgraftError
from ..io.paths import checkpoint_file
from .layout import EMBED, HEAD
from .plan import Plan

VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
_PLACEHOLDER = re.compile(r"^(<unused\d+>|\[unused\d+\]|<\|reserved_special_token_\d+\|>|<extra_id_\d+>|<\|extra_\d+\|>)$")


def _load_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _ids_of(mapping: object) -> dict[int, str]:
    """id -> token from a {token: id} mapping, ignoring malformed pairs."""
    if not isinstance(mapping, dict):
        return {}
    return {i: t for t, i in mapping.items() if isinstance(t, str) and type(i) is int}


def read_vocab(root: Path) -> tuple[dict[int, str], str] | None:
    """(id -> token, the file it came from) for a checkpoint directory; None when it has no vocabulary file.

    Raises ValueError (or OSError) for a file that exists but cannot be read as a vocabulary.
    """
    found = {name: checkpoint_file(root, name) for name in VOCAB_FILES}
    found = {k: v for k, v in found.items() if v is not None and v.is_file()}
    if "tokenizer.json" in found:
        data = _load_json(found["tokenizer.json"])
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise ValueError("no 'model' section")
        vocab = model.get("vocab")
        if isinstance(vocab, list):  # Unigram: [[token, score], ...], the id is the position
            ids = {i: e[0] for i, e in enumerate(vocab) if isinstance(e, list) and e and isinstance(e[0], str)}
        else:
            ids = _ids_of(vocab)
        for tok in data.get("added_tokens") or []:
            if isinstance(tok, dict) and type(tok.get("id")) is int and isinstance(tok.get("content"), str):
                ids[tok["id"]] = tok["content"]
        return ids, "tokenizer.json"
    if "vocab.json" in found:
        ids = _ids_of(_load_json(found["vocab.json"]))
        added = checkpoint_file(root, "added_tokens.json")
        if added is not None and added.is_file():
            ids.update(_ids_of(_load_json(added)))
        return ids, "vocab.json"
    if "vocab.txt" in found:
        lines = found["vocab.txt"].read_text(encoding="utf-8").split("\n")
        return {i: t for i, t in enumerate(lines) if t}, "vocab.txt"
    return None


def merged_vocab_rows(plan: Plan) -> int:
    """How many leading vocabulary rows the plan merges (0 when embeddings and head are all kept)."""
    rows = [e.rows if e.rows is not None else e.shape[0]
            for e in plan.entries if e.action == "merge" and e.lm_name in (EMBED, HEAD)]
    return max(rows, default=0)


def _differences(a: dict[int, str], b: dict[int, str], rows: int) -> list[int]:
    return [i for i in range(rows) if i in a and i in b and a[i] != b[i]
            and not (_PLACEHOLDER.match(a[i]) or _PLACEHOLDER.match(b[i]))]


def check_vocabularies(plan: Plan, dirs: dict[str, Path], *, allow: bool = False) -> list[str]:
    """Warnings about the tokenizers of the checkpoints in ``dirs`` (keys: vlm, expert labels, base);
    a SkillgraftError when two of them give one merged row different tokens, unless ``allow``."""
    rows = merged_vocab_rows(plan)
    if rows == 0:
        return []
    names = {"vlm": "the VLM", "base": "the base"}  # experts: by label
    vocabs: dict[str, tuple[dict[int, str], str]] = {}
    missing, warnings = [], []
    for key, d in dirs.items():
        who = names.get(key, f"expert {key!r}")
        try:
            got = read_vocab(Path(d))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            warnings.append(f"cannot read the tokenizer of {who} ({str(e).splitlines()[0][:80]}); token ids not compared")
            continue
        if got is None:
            missing.append(who)
        else:
            vocabs[who] = got
    if missing:
        warnings.append(
            f"no tokenizer file ({', '.join(VOCAB_FILES)}) for {', '.join(missing)}; the token ids of the merged "
            f"vocabulary rows could not be compared"
        )
    if len(vocabs) < 2:
        return warnings
    (ref_name, (ref, _)), *others = vocabs.items()
    for name, (ids, _) in others:
        diff = _differences(ref, ids, rows)
        if not diff:
            continue
        i = diff[0]
        more = f" ({len(diff)} differing ids in all)" if len(diff) > 1 else ""
        msg = (f"token ids differ between {ref_name} and {name} on the merged vocabulary rows: id {i} is "
               f"{ref[i]!r} in {ref_name} but {ids[i]!r} in {name}{more}")
        if not allow:
            raise SkillgraftError(
                f"{msg}; merging would add embedding rows to the wrong tokens. Use checkpoints with one tokenizer, "
                f"keep embed,lm_head from the VLM, or allow it (--allow-vocab-mismatch)"
            )
        warnings.append(msg + "; merged anyway (allow_vocab_mismatch)")
    return warnings
