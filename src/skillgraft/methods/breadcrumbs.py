"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", ECCV 2024).

Per tensor, each task vector loses its largest-magnitude outliers (the top ``gamma`` fraction) and
its small entries, keeping ``int(density * n)`` entries in all (the paper's beta is ``1 - density -
gamma``). The masked vectors are then added (``breadcrumbs``) or go through TIES sign election
(``breadcrumbs_ties``). Counts follow mergekit's ``magnitude_outliers``: when ``density + gamma > 1``
fewer outliers are removed so that the kept count still reaches ``int(density * n)``; at density 1
nothing is removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, check_no_params, pop_lambda, scaled, weighted_sum
from .sparsify import outlier_trim, trimmed_chunks
from .ties import NORMALIZE, SIGN_FROM, streamed_elect

Tensor = torch.Tensor

GAMMA = Param("gamma", 0.01, "fraction of largest-magnitude entries removed as outliers (paper's gamma)")


def _trims(deltas: Sequence[Tensor], densities: Sequence[float], gamma: float):
    return [outlier_trim(d, p, gamma) for d, p in zip(deltas, densities)]


def breadcrumbs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    gamma: float = 0.01,
    out: Tensor | None = None,
    **params: object,
) -> Tensor:
    """Mask outliers and small entries of each task vector, then ``lambda * sum_k w_k * tau_k``
    (into ``out`` when given; it may be ``deltas[0]``, read chunk by chunk before it is written)."""
    lam = pop_lambda(params)
    check_no_params("breadcrumbs", params)
    if out is None:
        out = torch.empty(deltas[0].shape, dtype=deltas[0].dtype, device=deltas[0].device)
    flat = out.view(-1)
    for sl, chunks in trimmed_chunks(deltas, _trims(deltas, densities, gamma)):
        flat[sl] = weighted_sum(chunks, weights)
    return scaled(out, lam)


def breadcrumbs_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    gamma: float = 0.01,
    sign_from: str = "weighted",
    normalize: bool | str = False,
    out: Tensor | None = None,
    **params: object,
) -> Tensor:
    """Breadcrumbs masks, then TIES sign election and merge of the agreeing entries (into ``out``)."""
    lam = pop_lambda(params)
    check_no_params("breadcrumbs_ties", params)
    trims = _trims(deltas, densities, gamma)
    return scaled(streamed_elect(deltas, trims, weights, sign_from, normalize, out=out), lam)


def _check_gamma(densities: Sequence[float], params: dict) -> None:
    g = float(params["gamma"])
    if not 0.0 <= g < 1.0:
        raise ValueError(f"breadcrumbs: gamma must be in [0, 1), got {g}")


_PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (ECCV 2024)"

METHOD = Method(
    name="breadcrumbs",
    kind="delta",
    fn=breadcrumbs,
    summary="Model Breadcrumbs: drop outliers and small entries, then Task Arithmetic",
    paper=_PAPER,
    uses_density=True,
    params=(GAMMA, LAMBDA),
    validator=_check_gamma,
    writes_out=True,
)

METHOD_TIES = Method(
    name="breadcrumbs_ties",
    kind="delta",
    fn=breadcrumbs_ties,
    summary="Model Breadcrumbs masks, then TIES sign election",
    paper=_PAPER,
    uses_density=True,
    params=(GAMMA, SIGN_FROM, NORMALIZE, LAMBDA),
    validator=_check_gamma,
    writes_out=True,
)
