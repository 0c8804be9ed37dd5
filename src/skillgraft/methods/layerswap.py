"""Layer swap (the baseline of Chen et al. 2025, "Bring Reason to Vision: Understanding Perception and
Reasoning through Model Merging", after Bandarkar et al. 2024, "Layer Swapping for Zero-Shot
Cross-Lingual Transfer in Large Language Models").

The VLM's first ``first_k`` and last ``last_k`` decoder layers are kept whole; all other tensors get
the TA merge. The method function is plain TA; the layer rule lives in
``skillgraft.schedule.layerswap_multiplier`` and the engine applies it to the experts' weights (the
VLM's own weight is left alone, so a kept layer is exactly the VLM's, in both modes). Tensors outside
the decoder layers follow their end of the network: the embedding is kept with the first layers when
``first_k > 0``; the final norm and the LM head are kept with the last layers when ``last_k > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, pop_lambda, scaled, weighted_sum, check_no_params


def layerswap(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    first_k: int = 2,
    last_k: int = 2,
    **params: object,
) -> torch.Tensor:
    """TA on this tensor (the engine has already zeroed the expert weights in kept layers)."""
    lam = pop_lambda(params)
    check_no_params("layerswap", params)
    return scaled(weighted_sum(deltas, weights), lam)


def _validate(densities: Sequence[float], params: dict) -> None:
    for key in ("first_k", "last_k"):
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"layerswap: {key} must be a non-negative integer, got {v!r}")


METHOD = Method(
    name="layerswap",
    kind="delta",
    fn=layerswap,
    summary="Layer swap: keep the VLM's first/last K decoder layers, TA merge in between",
    paper="Chen et al. 2025, Bring Reason to Vision: Understanding Perception and Reasoning through Model "
    "Merging (layer-swap baseline, after Bandarkar et al. 2024)",
    params=(
        Param("first_k", 2, "number of the VLM's first decoder layers kept whole (0: none)"),
        Param("last_k", 2, "number of the VLM's last decoder layers kept whole (0: none)"),
        LAMBDA,
    ),
    layer_rule="layerswap",
    elementwise=True,
    validator=_validate,
)
