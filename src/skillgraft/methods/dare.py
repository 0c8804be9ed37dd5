"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch"): random drop and rescale, then combine by TA (``dare``) or TIES (``dare_ties``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, Param, weighted_sum
from .sparsify import dare_drop
from .ties import NORMALIZE, SIGN_FROM, elect_and_merge

Tensor = torch.Tensor

RESCALE = Param("rescale", True, "divide kept entries by density so the delta's expectation is unchanged")


def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    rescale: bool = True,
) -> Tensor:
    """Drop each entry with probability 1-density (rescaled by 1/density), then sum lambda_k * tau_k."""
    dropped = [dare_drop(d, p, generator, rescale) for d, p in zip(deltas, densities)]
    return weighted_sum(dropped, weights)


def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    rescale: bool = True,
    sign_from: str = "weighted",
    normalize: bool = False,
) -> Tensor:
    """DARE drop-and-rescale, then TIES sign election and merge of the agreeing entries."""
    dropped = [dare_drop(d, p, generator, rescale) for d, p in zip(deltas, densities)]
    return elect_and_merge(dropped, weights, sign_from=sign_from, normalize=normalize)


METHOD_LINEAR = Method(
    name="dare",
    kind="delta",
    fn=dare_linear,
    summary="DARE: random drop with rescale, then Task Arithmetic",
    paper="Yu et al. 2024, Language Models are Super Mario",
    stochastic=True,
    uses_density=True,
    params=(RESCALE,),
)

METHOD_TIES = Method(
    name="dare_ties",
    kind="delta",
    fn=dare_ties,
    summary="DARE drop with rescale, then TIES sign election",
    paper="Yu et al. 2024, Language Models are Super Mario",
    stochastic=True,
    uses_density=True,
    params=(RESCALE, SIGN_FROM, NORMALIZE),
)
