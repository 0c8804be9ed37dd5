"""Task Arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, check_no_params, pop_lambda, scaled, weighted_sum


def task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    **params: object,
) -> torch.Tensor:
    """``lambda * sum_k w_k * tau_k`` (into ``out`` when given; it may be ``deltas[0]``). Densities
    are ignored: TA never sparsifies.

    Same as mergekit's ``task_arithmetic`` (``normalize: false``) and PEFT's ``task_arithmetic``.
    """
    lam = pop_lambda(params)
    check_no_params("task_arithmetic", params)
    return scaled(weighted_sum(deltas, weights, out=out), lam)


METHOD = Method(
    name="ta",
    kind="delta",
    fn=task_arithmetic,
    summary="Task Arithmetic: add the scaled task vectors",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR 2023)",
    elementwise=True,
    params=(LAMBDA,),
    writes_out=True,
)
