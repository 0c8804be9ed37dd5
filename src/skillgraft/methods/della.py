"""DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling").

MagPrune: within each row of a task vector, entries are ranked by magnitude and kept with a
probability that grows linearly with rank from ``density - epsilon`` (smallest) to ``density +
epsilon`` (largest); kept entries are rescaled by ``1 / p_i`` (the paper; ``rescale=True``). Then
``della`` elects signs and fuses the agreeing entries (TIES), ``della_linear`` just adds them.
mergekit 0.1.5 differs in the rescale: it keeps the L1 norm of the pruned tensor (``rescale="l1"``).
With ``epsilon=0`` MagPrune is DARE's uniform drop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, check_no_params, pop_lambda, rescale_is_local, scaled, weighted_sum
from .sparsify import RESCALE_CHOICES, check_della, della_drop
from .dare import SAMPLER
from .ties import NORMALIZE, SIGN_FROM, elect_and_merge

Tensor = torch.Tensor

EPSILON = Param(
    "epsilon",
    0.15,
    "half-width of the keep-probability range around density (paper's epsilon; default as in mergekit)",
)
RESCALE = Param(
    "rescale",
    True,
    "true: divide kept entries by their keep probability (the paper); 'l1'/'l2'/'linf': keep that norm "
    "(mergekit 0.1.5 uses 'l1'); false: no rescale",
    choices=RESCALE_CHOICES,
)


def _prune(deltas, densities, epsilon, generator, rescale, sampler):
    return [della_drop(d, p, epsilon, generator, rescale, sampler) for d, p in zip(deltas, densities)]


def della(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    epsilon: float = 0.15,
    rescale: bool | str = True,
    sampler: str = "uniform",
    sign_from: str = "weighted",
    normalize: bool | str = False,
    **params: object,
) -> Tensor:
    """MagPrune each task vector, then TIES sign election and fusion of the agreeing entries."""
    lam = pop_lambda(params)
    check_no_params("della", params)
    pruned = _prune(deltas, densities, epsilon, generator, rescale, sampler)
    return scaled(elect_and_merge(pruned, weights, sign_from=sign_from, normalize=normalize), lam)


def della_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    epsilon: float = 0.15,
    rescale: bool | str = True,
    sampler: str = "uniform",
    **params: object,
) -> Tensor:
    """MagPrune each task vector, then ``lambda * sum_k w_k * tau_k``."""
    lam = pop_lambda(params)
    check_no_params("della_linear", params)
    return scaled(weighted_sum(_prune(deltas, densities, epsilon, generator, rescale, sampler), weights), lam)


def _validate(densities: Sequence[float], params: dict) -> None:
    eps = float(params["epsilon"])
    if eps < 0:
        raise ValueError(f"della: epsilon must be >= 0, got {eps}")
    for p in densities:
        check_della(float(p), eps)


_PAPER = (
    "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling"
)

METHOD = Method(
    name="della",
    kind="delta",
    fn=della,
    summary="DELLA: magnitude-ranked random drop (MagPrune) with rescale, then TIES sign election",
    paper=_PAPER,
    stochastic=True,
    uses_density=True,
    elementwise=True,  # row-wise: ranks are taken within a row, and engine blocks are whole rows
    elementwise_when=rescale_is_local,
    params=(EPSILON, RESCALE, SAMPLER, SIGN_FROM, NORMALIZE, LAMBDA),
    validator=_validate,
)

METHOD_LINEAR = Method(
    name="della_linear",
    kind="delta",
    fn=della_linear,
    summary="DELLA MagPrune with rescale, then Task Arithmetic",
    paper=_PAPER,
    stochastic=True,
    uses_density=True,
    elementwise=True,  # row-wise: ranks are taken within a row, and engine blocks are whole rows
    elementwise_when=rescale_is_local,
    params=(EPSILON, RESCALE, SAMPLER, LAMBDA),
    validator=_validate,
)
