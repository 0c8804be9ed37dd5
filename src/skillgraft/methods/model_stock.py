"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

From the angle between the task vectors, the interpolation ratio towards their average is
``t = N cos / (1 + (N - 1) cos)`` (``cos`` averaged over all pairs; N task vectors) and the merge is
``theta_B + t * mean_k(w_k tau_k)``. Needs at least two task vectors: in inject mode two experts, in
symmetric mode the VLM delta and one expert (mergekit's set-up: base + two fine-tuned models).
The weights are not in the paper (mergekit ignores them); here they scale the average, so with the
default weights of 1 the result is the paper's, and scale 0 adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, Param

Tensor = torch.Tensor


def model_stock(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    filter_wise: bool = False,
) -> Tensor:
    """``t * mean_k(w_k tau_k)`` with Model Stock's ratio ``t`` (one per tensor, or per row if ``filter_wise``)."""
    n = len(deltas)
    if n < 2:
        raise ValueError("model_stock needs at least two task vectors (use mode: symmetric or add experts)")
    shape = deltas[0].shape
    if filter_wise:
        flat = [d.reshape(1, -1) if d.dim() <= 1 else d.reshape(d.shape[0], -1) for d in deltas]
    else:
        flat = [d.reshape(-1) for d in deltas]
    norms = [torch.linalg.vector_norm(f, dim=-1) for f in flat]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = norms[i] * norms[j]
            cos.append(((flat[i] * flat[j]).sum(dim=-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(denom), denom))
    avg = torch.zeros_like(flat[0])
    for f, w in zip(flat, weights):
        if float(w) != 0.0:
            avg.add_(f, alpha=float(w))
    avg.div_(n)
    return (t * avg).reshape(shape)


METHOD = Method(
    name="model_stock",
    kind="delta",
    fn=model_stock,
    summary="Model Stock: move from the base towards the task vectors' average by a ratio set by their angle",
    paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (ECCV 2024)",
    params=(Param("filter_wise", False, "one ratio per output row instead of per tensor", choices=(True, False)),),
    min_deltas=2,
)
