"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024).

For task vectors ``tau_t`` (here weighted, ``w_t * tau_t``) and their TA sum ``tau_MTL``, the TALL
mask of task t keeps the entries where that task matters more than the others combined:
``m_t = |tau_t| >= tall_lambda * |tau_MTL - tau_t|``. Consensus keeps the entries that at least
``k`` tasks mark as theirs (``k=2`` in the paper: entries only one task uses are "selfish", entries
no task uses are "catastrophic") and applies that mask to the merged vector of the ``base`` method
(TA, or TIES with the given densities). ``k`` cannot exceed the number of task vectors, so with
``k=2`` inject mode needs two experts, or use symmetric mode (VLM delta + one expert).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, check_no_params, pop_lambda, scaled, weighted_sum
from .ties import NORMALIZE, SIGN_FROM, ties

Tensor = torch.Tensor


def consensus(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    k: int = 2,
    tall_lambda: float = 0.4,
    base: str = "ta",
    sign_from: str = "weighted",
    normalize: bool | str = False,
    **params: object,
) -> Tensor:
    """Keep the entries that at least ``k`` TALL masks select, in the TA (or TIES) merged vector."""
    lam = pop_lambda(params)
    check_no_params("consensus", params)
    if k > len(deltas):
        raise ValueError(f"consensus: k={k} needs at least {k} task vectors, got {len(deltas)}")
    total = weighted_sum(deltas, weights)
    votes = torch.zeros(total.shape, dtype=torch.int16, device=total.device)
    for d, w in zip(deltas, weights):
        w = float(w)
        if w == 0.0:
            continue
        wd = d * w
        votes += wd.abs() >= (total - wd).abs_().mul_(float(tall_lambda))
    mask = votes >= int(k)
    del votes
    if base == "ta":
        merged = total
    elif base == "ties":
        del total
        merged = ties(deltas, weights, densities, sign_from=sign_from, normalize=normalize)
    else:
        raise ValueError(f"consensus: base must be 'ta' or 'ties', not {base!r}")
    return scaled(merged.mul_(mask), lam)


def _validate(densities: Sequence[float], params: dict) -> None:
    k = int(params["k"])
    if k < 1:
        raise ValueError(f"consensus: k must be >= 1, got {k}")
    if k > len(densities):
        raise ValueError(
            f"consensus: k={k} needs at least {k} task vectors, got {len(densities)} "
            "(use mode: symmetric to count the VLM's delta, add experts, or lower k)"
        )
    if float(params["tall_lambda"]) < 0:
        raise ValueError("consensus: tall_lambda must be >= 0")


METHOD = Method(
    name="consensus",
    kind="delta",
    fn=consensus,
    summary="Consensus merging: keep entries that >= k tasks' TALL masks select, in the TA/TIES merge",
    paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (ICML 2024)",
    uses_density=True,
    elementwise=True,
    elementwise_when=lambda p: p["base"] == "ta",  # TALL masks are per entry; TIES trims globally
    params=(
        Param("k", 2, "minimum number of task TALL masks that must select an entry (paper: 2)"),
        Param(
            "tall_lambda",
            0.4,
            "TALL mask threshold lambda_t: keep |tau_t| >= lambda_t*|tau_MTL - tau_t| (the paper tunes it in "
            "[0.2, 0.6] per task; 0.4 is the middle)",
        ),
        Param("base", "ta", "merged vector the consensus mask is applied to: 'ta' or 'ties'", choices=("ta", "ties")),
        SIGN_FROM,
        NORMALIZE,
        LAMBDA,
    ),
    validator=_validate,
)
