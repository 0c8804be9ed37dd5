"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, Param
from .sparsify import magnitude_prune

Tensor = torch.Tensor


def elect_and_merge(
    deltas: Sequence[Tensor], weights: Sequence[float], sign_from: str = "weighted", normalize: bool = True
) -> Tensor:
    """TIES elect + disjoint merge of already-trimmed deltas.

    The sign of each entry is the sign of the summed mass: of ``lambda_k * tau_k`` when
    ``sign_from="weighted"`` (mergekit's choice) or of ``tau_k`` when ``"unweighted"`` (PEFT's).
    Entries that agree with the elected sign are combined as ``sum lambda_k tau_k``; with
    ``normalize`` the sum is divided by the sum of the weights of the agreeing entries (the
    paper's disjoint mean, as mergekit does), otherwise it is left as a sum.
    """
    weighted = torch.stack([d * float(w) for d, w in zip(deltas, weights)])
    if sign_from == "weighted":
        mass = weighted.sum(dim=0)
    elif sign_from == "unweighted":
        mass = torch.stack(list(deltas)).sum(dim=0)
    else:
        raise ValueError(f"sign_from must be 'weighted' or 'unweighted', not {sign_from!r}")
    elected = torch.where(mass >= 0, 1.0, -1.0).to(weighted.dtype)
    stacked = torch.stack(list(deltas))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    merged = (weighted * agree).sum(dim=0)
    if not normalize:
        return merged
    w = torch.tensor([float(x) for x in weights], dtype=weighted.dtype, device=weighted.device)
    w = w.view(-1, *([1] * (weighted.dim() - 1)))
    divisor = (agree * w).sum(dim=0)
    divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return merged / divisor


def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    sign_from: str = "weighted",
    normalize: bool = False,
) -> Tensor:
    """Trim each delta to its top-``density`` entries by magnitude, elect signs, merge the agreeing ones."""
    trimmed = [magnitude_prune(d, p) for d, p in zip(deltas, densities)]
    return elect_and_merge(trimmed, weights, sign_from=sign_from, normalize=normalize)


SIGN_FROM = Param("sign_from", "weighted", "sign election on lambda*tau ('weighted', mergekit) or tau ('unweighted', PEFT)")
NORMALIZE = Param(
    "normalize",
    False,
    "divide by the summed weights of the agreeing entries (disjoint mean); off by default so that one "
    "expert at scale lambda adds lambda*trim(tau), as in inject mode",
)

METHOD = Method(
    name="ties",
    kind="delta",
    fn=ties,
    summary="TIES: trim by magnitude, elect sign, merge agreeing entries",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
    uses_density=True,
    params=(SIGN_FROM, NORMALIZE),
)
