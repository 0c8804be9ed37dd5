"""Whole-tensor reductions (norms, dot products) assembled from the reductions of its blocks.

Each block's reduction is the torch call the whole-tensor computation would make; the parts are
combined in float64 and rounded back to float32. With one block the result is that block's value
bit for bit (a float32 is exact in float64, and so are its square and the square root of that), so
a tensor that fits one block merges exactly as a whole tensor; with several blocks the result
differs from a single float32 reduction by rounding only.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class Total:
    """Combine per-block reductions: ``sum`` (sums, L1 norms), ``l2`` (L2 norms) or ``max`` (L-inf norms)."""

    def __init__(self, how: str):
        if how not in ("sum", "l2", "max"):
            raise ValueError(f"unknown reduction {how!r}")
        self.how = how
        self.acc: Tensor | None = None

    def add(self, part: Tensor) -> None:
        x = part.detach().double()
        if self.how == "l2":
            x = x * x
        if self.acc is None:
            self.acc = x
        elif self.how == "max":
            self.acc = torch.maximum(self.acc, x)
        else:
            self.acc = self.acc + x

    def value(self) -> Tensor:
        acc = self.acc if self.how != "l2" else self.acc.sqrt()
        return acc.float()


NORM_KIND = {"l1": ("sum", 1), "l2": ("l2", 2), "linf": ("max", float("inf"))}


def block_norm(x: Tensor, norm: str) -> Tensor:
    """The ``l1``/``l2``/``linf`` norm of ``x`` as one fused reduction (no temporary ``|x|``)."""
    if norm not in NORM_KIND:
        raise ValueError(f"rescale norm must be 'l1', 'l2' or 'linf', not {norm!r}")
    return torch.linalg.vector_norm(x, ord=NORM_KIND[norm][1])


class NormMatch:
    """Rescale a thinned tensor so its norm matches the original's (mergekit 0.1.5's ``rescale``).

    Statistics pass: ``measure(original, thinned)`` per block, ``absorb`` in order. Apply:
    ``apply(thinned)`` multiplies by ``norm(original) / norm(thinned)`` (left alone when either norm
    is below ``eps``).
    """

    def __init__(self, norm: str, eps: float = 1e-7):
        self.norm = norm
        self.eps = eps
        self.before = Total(NORM_KIND[norm][0])
        self.after = Total(NORM_KIND[norm][0])
        self.factor: Tensor | None = None
        self.empty = True

    def measure(self, original: Tensor, thinned: Tensor) -> tuple[Tensor, Tensor] | None:
        if not original.numel():
            return None
        return block_norm(original, self.norm), block_norm(thinned, self.norm)

    def absorb(self, part: tuple[Tensor, Tensor] | None) -> None:
        if part is not None:
            self.empty = False
            self.before.add(part[0])
            self.after.add(part[1])

    def finish(self) -> None:
        if self.empty:
            return
        before, after = self.before.value(), self.after.value()
        if not (before < self.eps or after < self.eps):
            self.factor = before / after

    def apply(self, thinned: Tensor) -> Tensor:
        return thinned if self.factor is None else thinned.mul_(self.factor.to(thinned.device))
