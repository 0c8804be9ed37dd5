"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

Three steps per tensor: *trim* each task vector to its top-``density`` entries by magnitude, *elect*
a sign per entry, *disjoint merge* the entries that agree with the elected sign.

Choices that differ between the paper, mergekit and PEFT, all selectable and named:

``sign_from`` -- what the elected sign is the sign of:
  ``"weighted"`` (default; mergekit's ``consensus_method: sum``): ``sum_k w_k * trim(tau_k)``;
  ``"unweighted"`` (PEFT's ``majority_sign_method="total"``, the paper's Eq.): ``sum_k trim(tau_k)``;
  ``"count"`` (PEFT's ``"frequency"``, mergekit's ``count``): the majority of the signs.
  With equal positive weights the first two agree. An entry "agrees" when its sign equals the
  elected one (sign of ``w_k tau_k`` in weighted/count mode, of ``tau_k`` in unweighted mode).
  Zeros never agree. A zero sum elects ``+``.

``normalize`` -- what the sum of agreeing entries ``sum_k w_k tau_k [agree_k]`` is divided by:
  ``False``/``"none"`` (default): nothing. One expert at scale lambda in inject mode then gives
  ``theta_V + lambda * trim(tau)``, exactly like TA on the trimmed vector.
  ``True``/``"weights"`` (mergekit's ``normalize: true``, its default for ``ties``): the summed
  weights of the agreeing entries (1 where that sum is 0): the paper's disjoint mean, weighted.
  ``"count"`` (PEFT's ``disjoint_merge``): the number of agreeing entries (at least 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, check_no_params, pop_lambda, scaled
from .sparsify import Trim, magnitude_trim, trimmed_chunks

Tensor = torch.Tensor

SIGN_CHOICES = ("weighted", "unweighted", "count")
NORMALIZE_CHOICES = (False, True, "none", "weights", "count")


def _normalize_mode(normalize: bool | str) -> str:
    if normalize is False or normalize is None or normalize == "none":
        return "none"
    if normalize is True or normalize == "weights":
        return "weights"
    if normalize == "count":
        return "count"
    raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, not {normalize!r}")


def elect_and_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    sign_from: str = "weighted",
    normalize: bool | str = False,
) -> Tensor:
    """TIES elect + disjoint merge of already-trimmed deltas (see the module docstring for the modes).

    Works one task vector at a time (no stacking), so the extra memory is three tensors of the
    output's size whatever the number of task vectors.
    """
    if sign_from not in SIGN_CHOICES:
        raise ValueError(f"sign_from must be one of {SIGN_CHOICES}, not {sign_from!r}")
    mode = _normalize_mode(normalize)
    ws = [float(w) for w in weights]
    # signed view of each entry used for the vote and the agreement test
    if sign_from == "unweighted":
        signs = [1.0] * len(ws)
    else:
        signs = [1.0 if w > 0 else (-1.0 if w < 0 else 0.0) for w in ws]

    mass = None
    for d, w, s in zip(deltas, ws, signs):
        if sign_from == "count":
            term, coef = torch.sign(d), s
        else:
            term, coef = d, (w if sign_from == "weighted" else 1.0)
        if coef == 0.0:
            continue  # a zero-weight entry has sign 0 in weighted/count mode: it never votes
        mass = torch.mul(term, coef) if mass is None else mass.add_(term, alpha=coef)
    if mass is None:
        return torch.zeros_like(deltas[0])
    # elected sign: +1 where the mass is >= 0. An exact cancellation sums to +0.0 and elects +; a
    # -0.0 mass only arises where every entry is zero, so nothing agrees there either way.
    elected = torch.ones_like(mass).copysign_(mass)
    del mass

    merged = None
    divisor = None
    for d, w, s in zip(deltas, ws, signs):
        if s == 0.0:
            continue  # a zero-weight entry has sign 0 in weighted/count mode: it never agrees
        # u = |d| where (s * d) agrees with the elected sign, else 0; then w * d = (w * s) * u * elected
        u = torch.mul(d, elected)
        if s < 0:
            u.neg_()
        u.relu_()
        if mode != "none":
            agree = u > 0
            if divisor is None:
                divisor = torch.zeros_like(u)
            divisor.add_(agree, alpha=(w if mode == "weights" else 1.0))
            del agree
        if w != 0.0:
            merged = u.mul_(w * s) if merged is None else merged.add_(u, alpha=w * s)
    if merged is None:
        return torch.zeros_like(deltas[0])
    merged.mul_(elected)
    if mode == "weights":
        nonzero = [w for w in ws if w != 0.0]
        if nonzero and min(nonzero) > 0:
            # positive weights: the divisor is 0 (where merged is 0 too) or at least the smallest
            # weight, so one clamp gives the same quotient as replacing its zeros (and is one pass)
            merged.div_(divisor.clamp_(min=min(nonzero)))
        else:
            merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    elif mode == "count":
        merged.div_(divisor.clamp_(min=1.0))
    return merged


def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    sign_from: str = "weighted",
    normalize: bool | str = False,
    out: Tensor | None = None,
    **params: object,
) -> Tensor:
    """Trim each delta to its top-``density`` entries by magnitude, elect signs, merge the agreeing ones
    (into ``out`` when given: see ``streamed_elect``)."""
    lam = pop_lambda(params)
    check_no_params("ties", params)
    trims = [magnitude_trim(d, p) for d, p in zip(deltas, densities)]
    return scaled(streamed_elect(deltas, trims, weights, sign_from, normalize, out=out), lam)


def streamed_elect(
    deltas: Sequence[Tensor],
    trims: Sequence[Trim | None],
    weights: Sequence[float],
    sign_from: str = "weighted",
    normalize: bool | str = False,
    out: Tensor | None = None,
) -> Tensor:
    """``elect_and_merge`` of the trimmed deltas, computed chunk by chunk into one output tensor.

    Only the output is tensor-sized; every temporary is one chunk (see ``sparsify.CHUNK``). ``out``
    (default: a new tensor) may be one of ``deltas``: each chunk is read before it is written.
    """
    if out is None:
        out = torch.empty(deltas[0].shape, dtype=deltas[0].dtype, device=deltas[0].device)
    flat = out.view(-1)
    for sl, chunks in trimmed_chunks(deltas, trims):
        flat[sl] = elect_and_merge(chunks, weights, sign_from=sign_from, normalize=normalize)
    return out


SIGN_FROM = Param(
    "sign_from",
    "weighted",
    "sign election on the sum of w*tau ('weighted', mergekit), of tau ('unweighted', PEFT 'total', the "
    "paper), or on the count of signs ('count', PEFT 'frequency')",
    choices=SIGN_CHOICES,
)
NORMALIZE = Param(
    "normalize",
    False,
    "divide the agreeing sum by nothing (false/'none'), by the summed weights of the agreeing entries "
    "(true/'weights': mergekit, the paper's disjoint mean) or by their count ('count': PEFT); off by "
    "default so that one expert at scale lambda adds lambda*trim(tau), as in inject mode",
    choices=NORMALIZE_CHOICES,
)

METHOD = Method(
    name="ties",
    kind="delta",
    fn=ties,
    summary="TIES: trim by magnitude, elect sign, merge agreeing entries",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS 2023)",
    uses_density=True,
    params=(SIGN_FROM, NORMALIZE, LAMBDA),
    writes_out=True,
)
