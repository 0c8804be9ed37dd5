"""Find the language model inside a checkpoint: its prefix, its head, and its layer numbering.

Every LM tensor gets an *LM-relative name* in the numbering of a plain causal LM:
``layers.3.mlp.up_proj.weight``, ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``.
Two checkpoints' tensors correspond when their LM-relative names are equal.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import SkillgraftError
from ..io.reader import CheckpointReader
from .families import CAUSAL_LM, Family, family_for

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
HEAD = "lm_head.weight"
EMBED = "embed_tokens.weight"


def _config_get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class LMLayout:
    """How one checkpoint stores its language model."""

    family: str
    prefix: str
    head: str | None
    skip_layers: frozenset[int] = field(default_factory=frozenset)
    how: str = "family data"

    @property
    def tied(self) -> bool:
        return self.head is None

    def lm_name(self, name: str) -> str | None:
        """The LM-relative name of checkpoint tensor ``name`` (None when it is not LM)."""
        if self.head is not None:
            head_stem = self.head[: -len("weight")]
            if name.startswith(head_stem):
                return "lm_head." + name[len(head_stem):]
        if not name.startswith(self.prefix):
            return None
        rel = name[len(self.prefix):]
        m = _LAYER.match(rel)
        if m and self.skip_layers:
            j = int(m.group(1))
            if j in self.skip_layers:
                return None
            i = j - sum(1 for s in self.skip_layers if s < j)
            rel = f"layers.{i}.{m.group(2)}"
        return rel

    def is_skipped_layer(self, name: str) -> bool:
        """True for tensors of decoder layers that have no LLM counterpart (e.g. cross-attention)."""
        if not name.startswith(self.prefix):
            return False
        m = _LAYER.match(name[len(self.prefix):])
        return bool(m) and int(m.group(1)) in self.skip_layers

    def lm_names(self, reader: CheckpointReader) -> dict[str, str]:
        """LM-relative name -> checkpoint tensor name, for every LM tensor of ``reader``."""
        out: dict[str, str] = {}
        for n in reader.names:
            rel = self.lm_name(n)
            if rel is not None:
                out[rel] = n
        return out


def _has_layers(names: list[str], prefix: str) -> bool:
    probe = prefix + "layers."
    return any(n.startswith(probe) for n in names)


def layout_from_family(reader: CheckpointReader, fam: Family) -> LMLayout | None:
    """The layout given by family data, or None when none of its prefixes holds decoder layers."""
    names = reader.names
    prefix = next((p for p in fam.prefixes if _has_layers(names, p)), None)
    if prefix is None:
        return None
    head = next((h for h in fam.heads if h in reader), None)
    skip: frozenset[int] = frozenset()
    if fam.skip_layers_key:
        listed = _config_get(reader.config, fam.skip_layers_key) or []
        skip = frozenset(int(x) for x in listed)
    return LMLayout(fam.name, prefix, head, skip)


def auto_layout(reader: CheckpointReader, reference: dict[str, tuple[int, ...]]) -> LMLayout | None:
    """Find the LM prefix by matching suffixes and shapes against a reference LM's tensors.

    ``reference`` maps LM-relative names to shapes (from the expert). Each checkpoint name that
    ends in a reference name with a compatible shape votes for the prefix in front of it.
    """
    votes: Counter[str] = Counter()
    probes = {r: s for r, s in reference.items() if r.startswith(("layers.0.", "layers.1.")) or r in (EMBED, "norm.weight")}
    for n in reader.names:
        for rel, shape in probes.items():
            if n.endswith(rel) and (n == rel or n[-len(rel) - 1] == "."):
                got = reader.shape(n)
                if got == shape or (rel == EMBED and got[1:] == shape[1:]):
                    votes[n[: -len(rel)]] += 1
    if not votes:
        return None
    prefix, count = votes.most_common(1)[0]
    head = None
    if HEAD in reference:
        cands = [n for n in reader.names if n.endswith(HEAD) and not n.startswith(prefix + "layers.")]
        cands = [n for n in cands if reader.shape(n)[1:] == reference[HEAD][1:]]
        head = min(cands, key=len) if cands else None
    return LMLayout("auto", prefix, head, frozenset(), how=f"auto-detected ({count} suffix+shape matches)")


def detect_layout(
    reader: CheckpointReader, role: str, reference: dict[str, tuple[int, ...]] | None = None
) -> LMLayout:
    """The LM layout of a checkpoint: family data first, then a causal-LM layout, then auto-detection."""
    model_type = reader.config.get("model_type")
    fam = family_for(model_type)
    for candidate in (fam, CAUSAL_LM):
        if candidate is not None:
            layout = layout_from_family(reader, candidate)
            if layout is not None:
                return layout
    if reference:
        layout = auto_layout(reader, reference)
        if layout is not None:
            return layout
    raise SkillgraftError(
        f"{role} {reader.root}: cannot find the language model's decoder layers "
        f"(model_type {model_type!r}; no tensors named like '<prefix>layers.N....')"
    )


def reference_shapes(reader: CheckpointReader, layout: LMLayout) -> dict[str, tuple[int, ...]]:
    """LM-relative name -> shape, used to auto-detect another checkpoint's layout."""
    ref = {rel: reader.shape(n) for rel, n in layout.lm_names(reader).items()}
    if HEAD not in ref and EMBED in ref:
        ref[HEAD] = ref[EMBED]
    return ref


def layer_count(rel_names: list[str] | dict[str, str]) -> int:
    """Number of decoder layers among LM-relative names (highest index + 1)."""
    idx = [int(m.group(1)) for r in rel_names if (m := _LAYER.match(r))]
    return max(idx) + 1 if idx else 0

