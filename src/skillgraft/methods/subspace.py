"""Subspace combiners of 2-D weights: TSV-Merge (Gargiulo et al. 2025) and Iso-C (Marczak et al. 2025).

Both need a whole matrix for its SVD, so the engine holds one float32 matrix per tensor (plus the
SVD's factors) and says so in the plan. Tensors with another number of dimensions (norms, biases)
are merged as the papers do, block by block (TSV: mean of the task vectors; Iso-C: their sum).
Both use the weighted task vectors ``w_k * tau_k``; SVDs run in float32 (float64 stays float64).
Cost grows as ``m * n * min(m, n)`` per matrix: on large-vocabulary embeddings and LM heads this
dominates the merge, and ``--exclude embed,lm_head`` is the usual choice anyway.
"""

from __future__ import annotations

import torch

from .combine import Combiner, _State, weighted_sum
from .params import ParamSpec

Tensor = torch.Tensor


def _svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def _orthogonalize(x: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns (or rows) to ``x``: ``P Q^T`` from ``x = P S Q^T``."""
    p, _, qh = _svd(x)
    return p @ qh


def _is_matrix(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2


class _Matrix(_State):
    """Gathers one float32 matrix over the blocks of a statistics pass; ``apply`` returns its rows."""

    def __init__(self, shape, weights, params):
        self.shape, self.weights = tuple(shape), [float(w) for w in weights]
        self.matrix = _is_matrix(self.shape)
        self.work: Tensor | None = None
        self.out: Tensor | None = None

    def absorb(self, p: int, part: tuple[Tensor, slice]) -> None:
        block, at = part
        if self.work is None:
            self.work = torch.empty(self.shape, dtype=block.dtype, device=block.device)
        self.work[at] = block

    def _svd_of_work(self) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        """SVD of the gathered matrix (float32, float64 kept), which is then released; and its dtype."""
        x, self.work = self.work, None
        dtype = x.dtype
        u, s, vh = _svd(x.to(torch.float64 if dtype == torch.float64 else torch.float32))
        return u, s, vh, dtype

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        if self.matrix:
            return self.out[at]
        return self.local(xs)

    def local(self, xs: list[Tensor]) -> Tensor:
        raise NotImplementedError


class _TSV(_Matrix):
    """TSV-Merge: per matrix, keep each task's top singular triplets, decorrelate the stacked singular
    vectors (orthogonal Procrustes), rebuild ``U_perp diag(S) V_perp^T``. One statistics pass per task,
    so only one task's matrix is held at a time.

    ``fraction`` of ``min(m, n)`` triplets kept per task (default ``1/T`` for T task vectors, the
    paper's choice); ``rank`` overrides it with a count. With one task vector and the default, the
    result is that vector.
    """

    def __init__(self, shape, weights, params):
        super().__init__(shape, weights, params)
        n_tasks = len(self.weights)
        self.passes = n_tasks if self.matrix else 0
        self.factors: list[tuple[Tensor, Tensor, Tensor]] = []
        if self.matrix:
            r = min(self.shape)
            if params["rank"] is not None:
                self.k = max(1, min(r, int(params["rank"])))
            else:
                f = (1.0 / n_tasks) if params["fraction"] is None else float(params["fraction"])
                self.k = max(1, min(r, int(f * r)))

    def measure(self, p: int, xs: list[Tensor], at: slice) -> tuple[Tensor, slice]:
        return xs[p] * self.weights[p], at

    def finish(self, p: int) -> None:
        u, s, vh, out_dtype = self._svd_of_work()
        self.factors.append((u[:, : self.k], s[: self.k], vh[: self.k, :]))
        if p == self.passes - 1:
            us, ss, vs = zip(*self.factors)
            self.factors = []
            u_perp = _orthogonalize(torch.cat(us, dim=1))
            v_perp = _orthogonalize(torch.cat(vs, dim=0))
            self.out = ((u_perp * torch.cat(ss)) @ v_perp).to(out_dtype)

    def local(self, xs: list[Tensor]) -> Tensor:
        work = [d * w for d, w in zip(xs, self.weights)]
        out = work[0]
        for x in work[1:]:
            out.add_(x)
        return out.div_(len(work))


class _IsoC(_Matrix):
    """Iso-C: SVD of the TA sum ``U S V^T``; the spectrum replaced by its mean: ``mean(S) * U V^T``.

    The mean runs over all ``min(m, n)`` singular values and every direction gets it, as in the
    authors' code (task-vector sums of full fine-tunes are full rank). The isotropic spectrum gives
    every direction of the common subspace the same weight, so directions only one task uses are
    not drowned by the dominant ones. The paper tunes the overall scale alpha (our ``lambda``).
    """

    def __init__(self, shape, weights, params):
        super().__init__(shape, weights, params)
        self.passes = 1 if self.matrix else 0

    def measure(self, p: int, xs: list[Tensor], at: slice) -> tuple[Tensor, slice]:
        return weighted_sum(xs, self.weights, out=xs[0]), at

    def finish(self, p: int) -> None:
        u, s, vh, out_dtype = self._svd_of_work()
        self.out = ((u * s.mean()) @ vh).to(out_dtype)

    def local(self, xs: list[Tensor]) -> Tensor:
        return weighted_sum(xs, self.weights, out=xs[0])


TSV = Combiner(
    "tsv", "delta",
    (
        ParamSpec("fraction", "float", None, "fraction of min(m, n) singular triplets kept per task; default 1/T (paper)",
                  low=0.0, high=1.0, open_low=True, optional=True, per_layer=True),
        ParamSpec("rank", "int", None, "number of singular triplets kept per task (overrides fraction)", low=1,
                  optional=True),
    ),
    _TSV, whole_matrix=_is_matrix, stats="each task vector's matrix and its SVD, one task vector per pass",
)
ISO_C = Combiner("iso_c", "delta", (), _IsoC, whole_matrix=_is_matrix, stats="the TA sum's matrix and its SVD")
