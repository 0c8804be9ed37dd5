"""Where a merge applies: per-tensor context the merge methods do not see.

Pure functions of an *LM-relative* tensor name (the name inside the language model, after the
mapper has stripped the VLM's LM prefix: ``layers.3.self_attn.q_proj.weight``,
``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``) and of the LM's decoder depth.
The engine calls them once per tensor; nothing here reads weights or touches the vision tower
(the engine only ever passes LM tensor names).

- ``lm_layer_index`` / ``module_kind``: what a tensor is.
- ``is_excluded``: module filters (kinds or regexes) that keep a tensor from the VLM.
- ``value_at``: the value of a number, a per-layer list (mergekit-gradient semantics) or a
  ``Schedule`` (a method's layer rule, as data) for one tensor.
- ``effective_weights``: scales x schedules x the method's layer rule, the weights a method gets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .methods.params import Schedule

FILTER_KINDS: tuple[str, ...] = ("attention", "mlp", "norm", "embed", "lm_head")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

# order matters: the first matching rule wins (a q_norm inside self_attn is a norm)
_KIND_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lm_head", re.compile(r"(?:^|\.)lm_head\.|^(?:model\.)?(?:output|embed_out)\.")),
    ("embed", re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|word_embeddings|tok_embeddings|embed_positions)\.")),
    ("norm", re.compile(r"(?:norm|ln_\w+|ln\d*|layernorm)(?:\.|$)", re.IGNORECASE)),
    ("attention", re.compile(r"(?:^|\.)(?:self_attn|attn|attention|self_attention|cross_attn)\.")),
    ("mlp", re.compile(r"(?:^|\.)(?:mlp|feed_forward|block_sparse_moe|ffn|moe)\.")),
)


def lm_layer_index(lm_name: str) -> int | None:
    """Decoder layer index of an LM-relative tensor name, or None for tensors outside the layers.

    ``layers.3.self_attn.q_proj.weight`` -> 3; ``model.layers.12.mlp.up_proj.weight`` -> 12;
    ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight`` -> None.
    """
    m = _LAYER_RE.search(lm_name)
    return int(m.group(1)) if m else None


def module_kind(lm_name: str) -> str:
    """One of ``attention``, ``mlp``, ``norm``, ``embed``, ``lm_head``, ``other``.

    Norms inside attention or MLP blocks (``self_attn.q_norm``) count as ``norm``; the final
    ``norm.weight`` is a ``norm`` too.
    """
    for kind, pattern in _KIND_RULES:
        if pattern.search(lm_name):
            return kind
    return "other"


def validate_exclude(exclude: Sequence[str]) -> list[str | re.Pattern[str]]:
    """Compile a module filter: each entry is a kind from ``FILTER_KINDS`` or a regex searched in the
    LM-relative name. A bad regex is a ValueError naming it."""
    out: list[str | re.Pattern[str]] = []
    for item in exclude:
        item = str(item).strip()
        if not item:
            continue
        if item in FILTER_KINDS:
            out.append(item)
            continue
        try:
            out.append(re.compile(item))
        except re.error as e:
            raise ValueError(
                f"exclude: {item!r} is neither a module kind ({', '.join(FILTER_KINDS)}) nor a valid regex: {e}"
            ) from None
    return out


def is_excluded(lm_name: str, exclude: Sequence[str]) -> bool:
    """True if the LM tensor is kept from the VLM by the filter ``exclude`` (kinds or regexes)."""
    if not exclude:
        return False
    kind = module_kind(lm_name)
    for f in validate_exclude(exclude):
        if isinstance(f, str):
            if f == kind:
                return True
        elif f.search(lm_name):
            return True
    return False


def value_at(setting: float | Sequence[float] | Schedule, layer: int | None, n_layers: int, kind: str = "other") -> float:
    """The value of a number, a per-layer list or a ``Schedule`` for one tensor.

    - a number: that number everywhere;
    - a list of N values: anchors evenly spaced over the decoder depth, linearly interpolated (the
      semantics of mergekit's gradients: layer i of n sits at t = i/(n-1), the value is the linear
      interpolation at t*(N-1)). A list of exactly ``n_layers`` values is a per-layer list (layer i
      gets entry i exactly); a one-element list is a constant.
    - tensors outside the decoder layers (``layer`` None) sit where they are in the network: the
      embedding (and other non-layer tensors) at the first anchor, the final norm and the LM head at
      the last, unless a ``Schedule`` gives their values.
    """
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    sched = setting if isinstance(setting, Schedule) else Schedule(tuple(float(v) for v in setting))
    values = [float(v) for v in sched.values]
    if not values:
        raise ValueError("a schedule needs at least one value")
    if layer is None:
        end = {"embed": sched.before, "norm": sched.after, "lm_head": sched.after}.get(kind, sched.other)
        if end is not None:
            return float(end)
        return values[-1] if kind in ("lm_head", "norm") else values[0]
    if not 0 <= layer < max(n_layers, 1):
        raise ValueError(f"layer index {layer} outside 0..{n_layers - 1}")
    if len(values) == n_layers or len(values) == 1:
        return values[layer if len(values) > 1 else 0]
    t = layer / (n_layers - 1) if n_layers > 1 else 0.0
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def effective_weights(
    method: Any,
    params: dict[str, Any],
    lm_name: str,
    n_layers: int,
    expert_scales: Sequence[float | Sequence[float]],
    schedule: Sequence[float] | None = None,
) -> list[float]:
    """The expert weights to hand the method for one tensor.

    ``expert_scales``: each expert's scale, a number or a per-layer schedule (see ``value_at``);
    ``schedule``: an optional recipe-wide multiplier schedule; ``method.layer_weights`` an optional
    layer rule of the method (a ``Schedule``). The VLM's own weight (symmetric mode) is never
    scaled by a schedule: a multiplier of 0 must give back the VLM.
    """
    layer = lm_layer_index(lm_name)
    kind = module_kind(lm_name)
    m = 1.0
    rule = method.layer_weights(params, n_layers) if method.layer_weights is not None else None
    if rule is not None:
        m *= value_at(rule, layer, n_layers, kind)
    if schedule is not None:
        m *= value_at(schedule, layer, n_layers, kind)
    return [m * value_at(s, layer, n_layers, kind) for s in expert_scales]
