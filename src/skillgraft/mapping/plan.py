"""The merge plan: for every VLM tensor, merge it (from which expert/base tensors, which rows) or copy it.

The plan is built from names, shapes and dtypes only, before any weight is read, and it refuses
structural mismatches (layer counts, hidden sizes, missing LM tensors) with one-line messages.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import SkillgraftError
from ..io.reader import CheckpointReader, holds_deltas
from .layout import EMBED, HEAD, LMLayout, detect_layout, layer_count, reference_shapes

_VOCAB_TENSORS = (EMBED, HEAD)
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)
# model_type of a VLM's language model (after dropping a "_text" / "_text_model" suffix) -> the LLM's
LM_MODEL_TYPES = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe",
                  "mllama": "llama"}


@dataclass(frozen=True)
class Entry:
    """What happens to one VLM tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    action: Literal["merge", "copy"]
    reason: str
    lm_name: str | None = None
    expert_names: tuple[str, ...] = ()
    base_name: str | None = None
    rows: int | None = None

    @property
    def row_sliced(self) -> bool:
        return self.action == "merge" and self.rows is not None and self.rows < self.shape[0]


@dataclass
class Checkpoint:
    """A checkpoint opened for planning: its reader, LM layout and LM-relative names."""

    label: str
    reader: CheckpointReader
    layout: LMLayout
    rel: dict[str, str] = field(default_factory=dict)

    def source_for(self, rel: str) -> str | None:
        """Tensor holding LM-relative ``rel``; a tied head falls back to the input embedding."""
        if rel in self.rel:
            return self.rel[rel]
        if rel == HEAD and self.layout.tied:
            return self.rel.get(EMBED)
        return None


@dataclass
class Plan:
    entries: list[Entry]
    vlm: Checkpoint
    base: Checkpoint | None
    experts: list[Checkpoint]
    n_layers: int
    unmatched_vlm: list[str]
    unused: dict[str, list[str]]
    warnings: list[str]

    def counts(self) -> dict[str, int]:
        merged = [e for e in self.entries if e.action == "merge"]
        return {
            "merged": len(merged),
            "row_sliced": sum(e.row_sliced for e in merged),
            "copied": len(self.entries) - len(merged),
            "total": len(self.entries),
        }

    def copy_reasons(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.entries if e.action == "copy"))


def open_checkpoint(label: str, reader: CheckpointReader, reference: dict[str, tuple[int, ...]] | None) -> Checkpoint:
    # a task-vector reader (skill, LoRA adapter) knows its own layout: plain causal-LM names
    layout = getattr(reader, "lm_layout", None) or detect_layout(reader, label, reference)
    return Checkpoint(label, reader, layout, layout.lm_names(reader))


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config.get("llm_config") or config


def build_plan(
    vlm_reader: CheckpointReader,
    expert_readers: list[tuple[str, CheckpointReader]],
    base_reader: CheckpointReader | None,
    *,
    excluded: Callable[[str], str | None] = lambda rel: None,
    allow_unmatched: bool = False,
    allow_arch_mismatch: bool = False,
) -> Plan:
    """Map every VLM tensor to its sources and validate the pair(s) structurally.

    ``excluded(rel)`` returns a reason string for LM-relative names to keep from the VLM. A source
    whose model type differs from the VLM's language model is refused unless ``allow_arch_mismatch``;
    then every tensor of it that the merge does not use is listed in a warning.
    """
    warnings: list[str] = []
    first_label, first_reader = expert_readers[0]
    first = open_checkpoint(first_label, first_reader, None)
    reference = reference_shapes(first_reader, first.layout)
    vlm = open_checkpoint("vlm", vlm_reader, reference)
    experts = [first] + [open_checkpoint(lbl, r, reference) for lbl, r in expert_readers[1:]]
    base = open_checkpoint("base", base_reader, reference) if base_reader is not None else None
    sources = experts + ([base] if base else [])

    vlm_layers = layer_count(vlm.rel)
    for ck in sources:
        n = layer_count(ck.rel)
        if holds_deltas(ck.reader):  # a task vector may leave layers untouched; a skill records its base's depth
            n = getattr(ck.reader, "n_layers", None) or (vlm_layers if n <= vlm_layers else n)
        if n != vlm_layers:
            raise SkillgraftError(
                f"layer count mismatch: the VLM's language model has {vlm_layers} decoder layers, "
                f"{ck.label} has {n}; they cannot derive from the same base LLM"
            )
    _check_hidden(vlm, sources)
    foreign = _check_model_types(vlm, sources, allow_arch_mismatch, warnings)

    lm_roots = {r.split(".")[0] for ck in sources for r in ck.rel} | {"lm_head"}
    entries: list[Entry] = []
    unmatched: list[str] = []
    used: dict[str, set[str]] = {ck.label: set() for ck in sources}
    for name in vlm_reader.names:
        shape, dtype = vlm_reader.shape(name), vlm_reader.dtype(name)
        rel = vlm.layout.lm_name(name)
        if rel is None or rel.split(".")[0] not in lm_roots:
            reason = "VLM-only decoder layer (cross-attention)" if vlm.layout.is_skipped_layer(name) else "non-LM (vision / projector)"
            entries.append(Entry(name, shape, dtype, "copy", reason))
            continue
        if not dtype.is_floating_point:
            entries.append(Entry(name, shape, dtype, "copy", "non-floating buffer", rel))
            continue
        src = {ck.label: ck.source_for(rel) for ck in sources}
        missing = [lbl for lbl, s in src.items() if s is None]
        if missing and all(holds_deltas(ck.reader) for ck in sources if ck.label in missing):
            if len(missing) == len(sources):
                entries.append(Entry(name, shape, dtype, "copy", "no expert changes it (task vectors leave it as is)", rel))
                continue
            for ck in sources:  # a task vector that does not touch this tensor adds zero to it
                if ck.label in missing:
                    src[ck.label] = ck.reader.zero_name(rel, shape)
            missing = []
        if missing:
            if rel.endswith(_BUFFER_SUFFIXES):
                entries.append(Entry(name, shape, dtype, "copy", "rotary buffer", rel))
                continue
            unmatched.append(name)
            entries.append(Entry(name, shape, dtype, "copy", f"unmatched: no {rel} in {missing[0]}", rel))
            continue
        why = excluded(rel)
        if why:
            entries.append(Entry(name, shape, dtype, "copy", why, rel))
            continue
        rows = _overlap_rows(name, shape, rel, {ck.label: ck.reader.shape(src[ck.label]) for ck in sources})
        for lbl, s in src.items():
            used[lbl].add(s)
        entries.append(
            Entry(
                name, shape, dtype, "merge", "language model", rel,
                expert_names=tuple(src[e.label] for e in experts),
                base_name=src[base.label] if base else None,
                rows=rows,
            )
        )
    if unmatched and not allow_unmatched:
        what = (f"{len(unmatched)} language-model tensor(s) of the VLM have no counterpart, e.g. {unmatched[0]}; "
                f"check that the expert shares the VLM's LM architecture, or")
        raise SkillgraftError(f"{what} set allow_unmatched=True to copy them from the VLM",
                              cli=f"{what} pass --allow-unmatched to copy them from the VLM")
    unused = {
        ck.label: sorted(set(ck.rel.values()) - used[ck.label])
        for ck in sources
        if set(ck.rel.values()) - used[ck.label]
    }
    for label in foreign:
        if unused.get(label):
            warnings.append(f"{len(unused[label])} tensor(s) of {label} are not used by the merge: {', '.join(unused[label])}")
    return Plan(entries, vlm, base, experts, vlm_layers, unmatched, unused, warnings)


def _overlap_rows(name: str, shape: tuple[int, ...], rel: str, others: dict[str, tuple[int, ...]]) -> int | None:
    """Rows shared by all checkpoints for a vocabulary tensor; None when every shape is equal."""
    if all(s == shape for s in others.values()):
        return None
    for label, s in others.items():
        if s[1:] != shape[1:] or (s != shape and rel.replace(".bias", ".weight") not in _VOCAB_TENSORS):
            raise SkillgraftError(
                f"shape mismatch: VLM {name} is {list(shape)} but {label}'s is {list(s)}; "
                f"the {label} does not share the VLM's language-model architecture"
            )
    return min([shape[0], *(s[0] for s in others.values())])


def _check_hidden(vlm: Checkpoint, sources: list[Checkpoint]) -> None:
    v = vlm.rel.get(EMBED)
    if v is None:
        return
    hv = vlm.reader.shape(v)[-1]
    for ck in sources:
        e = ck.rel.get(EMBED)
        if e is not None and ck.reader.shape(e)[-1] != hv:
            raise SkillgraftError(
                f"hidden size mismatch: the VLM's language model has width {hv}, {ck.label} has "
                f"{ck.reader.shape(e)[-1]}; the {ck.label} is not derived from the VLM's base LLM"
            )


def lm_model_type(config: dict) -> str | None:
    """The LLM model_type a config's language model is (``qwen2_5_vl_text`` -> ``qwen2``), or None."""
    t = _text_config(config).get("model_type")
    if not isinstance(t, str) or not t:
        return None
    t = re.sub(r"_text(_model)?$", "", t)
    return LM_MODEL_TYPES.get(t, t)


def _check_model_types(vlm: Checkpoint, sources: list[Checkpoint], allow: bool, warnings: list[str]) -> list[str]:
    """Labels of sources whose model type differs from the VLM's LM (refused unless ``allow``)."""
    vt = lm_model_type(vlm.reader.config)
    foreign = []
    for ck in sources:
        t = lm_model_type(ck.reader.config)
        if vt is None or t is None or t == vt:
            continue
        if not allow:
            what = (f"architecture mismatch: the VLM's language model is {vt!r} but {ck.label} is {t!r}; a task vector "
                    f"only transfers between models of one lineage")
            raise SkillgraftError(f"{what}. Set allow_arch_mismatch=True in the recipe to merge the matching tensors anyway",
                                  cli=f"{what}. Pass --allow-arch-mismatch to merge the matching tensors anyway")
        warnings.append(f"the VLM's language model is {vt!r} but {ck.label} is {t!r}; merging the tensors whose shapes match")
        foreign.append(ck.label)
    return foreign
