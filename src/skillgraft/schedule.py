"""Where a merge applies: per-tensor context the merge methods do not see.

Pure functions of an *LM-relative* tensor name (the name inside the language model, after the
mapper has stripped the VLM's LM prefix: ``layers.3.self_attn.q_proj.weight``,
``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``) and of the LM's decoder depth.
The engine calls them once per tensor; nothing here reads weights or touches the vision tower
(the engine only ever passes LM tensor names).

- ``lm_layer_index`` / ``module_kind``: what a tensor is.
- ``is_excluded``: module filters (kinds or regexes) that keep a tensor from the VLM.
- ``value_at`` / ``scale_multiplier``: per-layer schedules (mergekit-gradient semantics).
- ``layerswap_multiplier`` / ``method_multiplier``: the layer rule of methods like ``layerswap``.
- ``effective_weights``: everything above combined into the weights handed to a method.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

KINDS: tuple[str, ...] = ("attention", "mlp", "norm", "embed", "lm_head", "other")
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


def _position(layer: int | None, n_layers: int, kind: str, nonlayer: str) -> float:
    """Depth position t in [0, 1] of a tensor (mergekit: layer i of n -> i / (n - 1))."""
    if layer is None:
        if nonlayer == "mergekit" or kind == "embed":
            return 0.0
        if kind in ("lm_head", "norm"):
            return 1.0
        return 0.0
    if n_layers <= 1:
        return 1.0 if nonlayer == "mergekit" else 0.0
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer index {layer} outside 0..{n_layers - 1}")
    return layer / (n_layers - 1)


def value_at(
    setting: float | Sequence[float],
    layer: int | None,
    n_layers: int,
    kind: str = "other",
    nonlayer: str = "position",
) -> float:
    """The value of a scalar-or-schedule setting for one tensor.

    - a number: that number everywhere;
    - a list of N values: anchors evenly spaced over the decoder depth, linearly interpolated (the
      semantics of mergekit's gradients: layer i of n sits at t = i/(n-1), the value is the linear
      interpolation at t*(N-1)). A list of exactly ``n_layers`` values is thereby an explicit
      per-layer list (layer i gets entry i), and a one-element list is a constant.

    Tensors outside the decoder layers (``layer`` None) follow ``nonlayer``:
    ``"position"`` (default) puts the embedding at the first anchor (t=0) and the final norm and the
    LM head at the last anchor (t=1), where they sit in the network; ``"mergekit"`` uses t=0 for all
    of them, as mergekit does (it plans them with t=0).
    """
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    values = [float(v) for v in setting]
    if not values:
        raise ValueError("a schedule needs at least one value")
    if nonlayer not in ("position", "mergekit"):
        raise ValueError(f"nonlayer must be 'position' or 'mergekit', not {nonlayer!r}")
    if len(values) == 1:
        return values[0]
    t = _position(layer, n_layers, kind, nonlayer)
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def scale_multiplier(
    schedule: float | Sequence[float] | None,
    layer: int | None,
    n_layers: int,
    kind: str = "other",
    nonlayer: str = "position",
) -> float:
    """Multiplier of the expert scales for one tensor from a per-layer schedule (None: 1.0).

    See ``value_at`` for the list semantics and the rule for non-layer tensors.
    """
    if schedule is None:
        return 1.0
    return value_at(schedule, layer, n_layers, kind, nonlayer)


def layerswap_multiplier(layer: int | None, n_layers: int, first_k: int, last_k: int, kind: str = "other") -> float:
    """0.0 where layer swap keeps the VLM's tensor, 1.0 where the TA merge applies.

    Decoder layers ``< first_k`` and ``>= n_layers - last_k`` are kept. Outside the layers: the
    embedding is kept when ``first_k > 0``; the final norm and LM head when ``last_k > 0``; other
    non-layer tensors are merged.
    """
    if first_k < 0 or last_k < 0:
        raise ValueError("first_k and last_k must be >= 0")
    if layer is None:
        if kind == "embed":
            return 0.0 if first_k > 0 else 1.0
        if kind in ("norm", "lm_head"):
            return 0.0 if last_k > 0 else 1.0
        return 1.0
    if layer < first_k or layer >= n_layers - last_k:
        return 0.0
    return 1.0


def method_multiplier(method: Any, params: dict[str, Any], lm_name: str, n_layers: int) -> float:
    """The method's own per-tensor multiplier of the expert weights (1.0 unless it has a layer rule).

    ``method`` is a ``skillgraft.methods.Method``; ``params`` its resolved parameters.
    """
    rule = getattr(method, "layer_rule", None)
    if rule is None:
        return 1.0
    if rule == "layerswap":
        return layerswap_multiplier(
            lm_layer_index(lm_name), n_layers, int(params["first_k"]), int(params["last_k"]), module_kind(lm_name)
        )
    raise ValueError(f"unknown layer rule {rule!r} of method {getattr(method, 'name', method)!r}")


def effective_weights(
    method: Any,
    params: dict[str, Any],
    lm_name: str,
    n_layers: int,
    expert_scales: Sequence[float | Sequence[float]],
    schedule: float | Sequence[float] | None = None,
    nonlayer: str = "position",
) -> list[float]:
    """The expert weights to hand the method for one tensor.

    ``expert_scales``: each expert's scale, a number or a per-layer schedule (see ``value_at``);
    ``schedule``: an optional recipe-wide multiplier schedule. The product with the method's layer
    rule (``method_multiplier``) is returned. The VLM's own weight (symmetric mode) is never scaled by
    a schedule: a multiplier of 0 must give back the VLM.
    """
    layer = lm_layer_index(lm_name)
    kind = module_kind(lm_name)
    m = method_multiplier(method, params, lm_name, n_layers) * scale_multiplier(
        schedule, layer, n_layers, kind, nonlayer
    )
    return [m * value_at(s, layer, n_layers, kind, nonlayer) for s in expert_scales]
