"""Subspace merges of 2-D weights: TSV-Merge (Gargiulo et al. 2025) and Iso-C (Marczak et al. 2025).

Both act on matrices; tensors with another number of dimensions (norms, biases) are merged as the
papers do (TSV: mean of the task vectors; Iso-C: their sum, i.e. TA). Both use the weighted task
vectors ``w_k * tau_k``. SVDs run in float32 (float64 inputs stay float64). Cost grows as
``m * n * min(m, n)`` per matrix: on large-vocabulary embeddings and LM heads this dominates the
merge, and ``--exclude embed,lm_head`` is the usual choice anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LAMBDA, Method, Param, check_no_params, pop_lambda, scaled, weighted_sum

Tensor = torch.Tensor


def _svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def _orthogonalize(x: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns (or rows) to ``x``: ``P Q^T`` from ``x = P S Q^T``."""
    p, _, qh = _svd(x)
    return p @ qh


def tsv_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    fraction: float | None = None,
    rank: int | None = None,
    **params: object,
) -> Tensor:
    """TSV-Merge: per matrix, keep each task's top singular triplets, decorrelate the stacked singular
    vectors (orthogonal Procrustes), and rebuild ``U_perp diag(S) V_perp^T``.

    ``fraction`` of ``min(m, n)`` singular triplets kept per task (default ``1/T`` for T task
    vectors, the paper's choice, which makes the stacked bases square at most); ``rank`` overrides
    it with an absolute count. With one task vector and the default, the result is that vector.
    """
    lam = pop_lambda(params)
    check_no_params("tsv", params)
    n_tasks = len(deltas)
    work = [d * float(w) for d, w in zip(deltas, weights)]
    if work[0].dim() != 2:
        out = work[0]
        for x in work[1:]:
            out.add_(x)
        return scaled(out.div_(n_tasks), lam)
    m, n = work[0].shape
    r = min(m, n)
    if rank is not None:
        k = max(1, min(r, int(rank)))
    else:
        f = (1.0 / n_tasks) if fraction is None else float(fraction)
        k = max(1, min(r, int(f * r)))
    dtype = torch.float64 if work[0].dtype == torch.float64 else torch.float32
    us, ss, vs = [], [], []
    for x in work:
        u, s, vh = _svd(x.to(dtype))
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :])
    del work
    u_cat = torch.cat(us, dim=1)
    s_cat = torch.cat(ss)
    v_cat = torch.cat(vs, dim=0)
    u_perp = _orthogonalize(u_cat)
    v_perp = _orthogonalize(v_cat)
    out = (u_perp * s_cat) @ v_perp
    return scaled(out.to(deltas[0].dtype), lam)


def iso_c(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    **params: object,
) -> Tensor:
    """Iso-C: SVD of the TA sum ``U S V^T``; replace the spectrum by its mean: ``mean(S) * U V^T``.

    The mean runs over all ``min(m, n)`` singular values and every direction gets it, as in the
    authors' code (task-vector sums of full fine-tunes are full rank).

    The isotropic spectrum gives every direction of the common subspace the same weight, so
    directions that only one task uses are not drowned by the dominant ones. The paper tunes the
    overall scale alpha (our ``lambda``) on validation data.
    """
    lam = pop_lambda(params)
    check_no_params("iso_c", params)
    total = weighted_sum(deltas, weights)
    if total.dim() != 2:
        return scaled(total, lam)
    dtype = torch.float64 if total.dtype == torch.float64 else torch.float32
    u, s, vh = _svd(total.to(dtype))
    sigma = s.mean()
    out = (u * sigma) @ vh
    return scaled(out.to(total.dtype), lam)


def _validate_tsv(densities: Sequence[float], params: dict) -> None:
    f = params.get("fraction")
    if f is not None and not 0.0 < float(f) <= 1.0:
        raise ValueError(f"tsv: fraction must be in (0, 1], got {f}")
    r = params.get("rank")
    if r is not None and int(r) < 1:
        raise ValueError(f"tsv: rank must be >= 1, got {r}")


TSV = Method(
    name="tsv",
    kind="delta",
    fn=tsv_merge,
    summary="TSV-Merge: per-task low-rank singular vectors, decorrelated, recombined",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR 2025)",
    params=(
        Param("fraction", None, "fraction of min(m, n) singular triplets kept per task; default 1/T (paper)"),
        Param("rank", None, "absolute number of singular triplets kept per task (overrides fraction)"),
        LAMBDA,
    ),
    validator=_validate_tsv,
)

ISO_C = Method(
    name="iso_c",
    kind="delta",
    fn=iso_c,
    summary="Iso-C: flatten the spectrum of the TA sum to its mean singular value",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (ICML 2025)",
    params=(LAMBDA,),
)
