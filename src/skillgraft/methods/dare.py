"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024): Drop And REscale, then combine by TA (``dare``) or TIES (``dare_ties``).

Each entry of each task vector is dropped with probability ``1 - density`` and the kept entries are
divided by ``density`` (``rescale=True``, the paper), so the expectation of the delta is the delta.
Some older PEFT releases and at least one published VLM-merging script forget that rescale; the
tests check it explicitly. mergekit 0.1.5's ``rescale: true`` is different: it rescales the dropped
tensor to keep its L1 norm (``rescale="l1"`` here), which equals 1/density only in expectation.

Randomness: one Bernoulli mask per task vector, drawn in order from the ``generator`` the engine
seeds per (recipe seed, tensor name). ``sampler`` picks how: ``uniform`` (default, ``rand < density``,
fastest) or ``bernoulli`` (``torch.bernoulli``, the very call PEFT and mergekit make, so with the same
seed PEFT's masks are reproduced exactly; tests/test_vs_peft.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, check_no_params, pop_lambda, rescale_is_local, scaled, weighted_sum
from .sparsify import RESCALE_CHOICES, SAMPLERS, dare_drop
from .ties import NORMALIZE, SIGN_FROM, elect_and_merge

Tensor = torch.Tensor

RESCALE = Param(
    "rescale",
    True,
    "true: divide kept entries by density (the paper, PEFT); 'l1'/'l2'/'linf': rescale the dropped tensor "
    "to keep that norm (mergekit 0.1.5 uses 'l1'); false: no rescale",
    choices=RESCALE_CHOICES,
)
SAMPLER = Param(
    "sampler",
    "uniform",
    "how the keep-masks are drawn: 'uniform' (rand < density, fastest) or 'bernoulli' (torch.bernoulli, the "
    "same stream as PEFT/mergekit for the same seed)",
    choices=SAMPLERS,
)


def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    rescale: bool | str = True,
    sampler: str = "uniform",
    **params: object,
) -> Tensor:
    """Drop each entry with probability 1-density (rescaled), then ``lambda * sum_k w_k * tau_k``."""
    lam = pop_lambda(params)
    check_no_params("dare_linear", params)
    dropped = [dare_drop(d, p, generator, rescale, sampler) for d, p in zip(deltas, densities)]
    return scaled(weighted_sum(dropped, weights), lam)


def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    rescale: bool | str = True,
    sampler: str = "uniform",
    sign_from: str = "weighted",
    normalize: bool | str = False,
    **params: object,
) -> Tensor:
    """DARE drop-and-rescale, then TIES sign election and merge of the agreeing entries."""
    lam = pop_lambda(params)
    check_no_params("dare_ties", params)
    dropped = [dare_drop(d, p, generator, rescale, sampler) for d, p in zip(deltas, densities)]
    return scaled(elect_and_merge(dropped, weights, sign_from=sign_from, normalize=normalize), lam)


METHOD_LINEAR = Method(
    name="dare",
    kind="delta",
    fn=dare_linear,
    summary="DARE: random drop with rescale, then Task Arithmetic",
    paper="Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
    "as a Free Lunch (ICML 2024)",
    stochastic=True,
    uses_density=True,
    elementwise=True,
    elementwise_when=rescale_is_local,
    params=(RESCALE, SAMPLER, LAMBDA),
)

METHOD_TIES = Method(
    name="dare_ties",
    kind="delta",
    fn=dare_ties,
    summary="DARE drop with rescale, then TIES sign election",
    paper=METHOD_LINEAR.paper,
    stochastic=True,
    uses_density=True,
    elementwise=True,
    elementwise_when=rescale_is_local,
    params=(RESCALE, SAMPLER, SIGN_FROM, NORMALIZE, LAMBDA),
)
