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

import hashlib
import json
import re
from pathlib import Path

from ..errors import SkillgraftError
from ..io.paths import checkpoint_file
from .layout import EMBED, HEAD
from .plan import Plan

VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
_PLACEHOLDER = re.compile(r"^(<unused\d+>|\[unused\d+\]|<\|reserved_special_token_\d+\|>|<extra_id_\d+>|<\|extra_\d+\|>)$")


def _ids_of(mapping: object) -> dict[int, str]:
    """id -> token from a {token: id} mapping, ignoring malformed pairs."""
    if not isinstance(mapping, dict):
        return {}
    return {i: t for t, i in mapping.items() if isinstance(t, str) and type(i) is int}


def vocab_file(root: Path) -> Path | None:
    """The checkpoint's vocabulary file (the first of VOCAB_FILES present inside it), or None."""
    for name in VOCAB_FILES:
        path = checkpoint_file(root, name)
        if path is not None and path.is_file():
            return path
    return None


def parse_vocab(path: Path, data: bytes) -> dict[int, str]:
    """id -> token from the contents ``data`` of vocabulary file ``path`` (ValueError when malformed)."""
    if path.name == "vocab.txt":
        return {i: t for i, t in enumerate(data.decode("utf-8").split("\n")) if t}
    doc = json.loads(data)
    if path.name == "vocab.json":
        ids = _ids_of(doc)
        added = checkpoint_file(path.parent, "added_tokens.json")
        if added is not None and added.is_file():
            ids.update(_ids_of(json.loads(added.read_bytes())))
        return ids
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise ValueError("no 'model' section")
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[token, score], ...], the id is the position
        ids = {i: e[0] for i, e in enumerate(vocab) if isinstance(e, list) and e and isinstance(e[0], str)}
    else:
        ids = _ids_of(vocab)
    for tok in doc.get("added_tokens") or []:
        if isinstance(tok, dict) and type(tok.get("id")) is int and isinstance(tok.get("content"), str):
            ids[tok["id"]] = tok["content"]
    return ids


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
    vocabs: dict[str, dict[int, str]] = {}
    parsed: dict[tuple[str, bytes], dict[int, str]] = {}  # identical files are parsed once
    missing, warnings = [], []
    for key, d in dirs.items():
        who = names.get(key, f"expert {key!r}")
        path = vocab_file(Path(d))
        if path is None:
            missing.append(who)
            continue
        try:
            data = path.read_bytes()
            digest = (path.name, hashlib.sha256(data).digest())
            if digest not in parsed:
                parsed[digest] = parse_vocab(path, data)
            vocabs[who] = parsed[digest]
        except (OSError, ValueError, UnicodeDecodeError) as e:
            warnings.append(f"cannot read {path} ({str(e).splitlines()[0][:80]}); token ids not compared")
    if missing:
        warnings.append(
            f"no tokenizer file ({', '.join(VOCAB_FILES)}) for {', '.join(missing)}; the token ids of the merged "
            f"vocabulary rows could not be compared"
        )
    if len(vocabs) < 2:
        return warnings
    (ref_name, ref), *others = vocabs.items()
    for name, ids in others:
        if ids is ref:  # the same file content
            continue
        diff = _differences(ref, ids, rows)
        if not diff:
            continue
        i = diff[0]
        more = f" ({len(diff)} differing ids in all)" if len(diff) > 1 else ""
        msg = (f"token ids differ between {ref_name} and {name} on the merged vocabulary rows: id {i} is "
               f"{ref[i]!r} in {ref_name} but {ids[i]!r} in {name}{more}")
        if not allow:
            why = f"{msg}; merging would add embedding rows to the wrong tokens. Use checkpoints with one tokenizer"
            raise SkillgraftError(
                f"{why}, exclude embed and lm_head, or set allow_vocab_mismatch=True in the recipe",
                cli=f"{why}, pass --exclude embed,lm_head, or --allow-vocab-mismatch",
            )
        warnings.append(msg + "; merged anyway (allow_vocab_mismatch)")
    return warnings
