"""Task Arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, weighted_sum


def task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """sum_k lambda_k * tau_k. Densities are ignored: TA never sparsifies."""
    return weighted_sum(deltas, weights)


METHOD = Method(
    name="ta",
    kind="delta",
    fn=task_arithmetic,
    summary="Task Arithmetic: add the scaled task vectors",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic",
)
