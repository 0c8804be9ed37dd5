"""The statistics of ``inspect``: pure functions on tensors, additive over row blocks and tensors.

Definitions (tau_V = theta_V - theta_B, tau_E = theta_E - theta_B, sums over every merged entry):

- norms ``|tau_V|``, ``|tau_E|``; their ``ratio`` |tau_E| / |tau_V|; ``cosine`` <tau_V, tau_E> / (|tau_V| |tau_E|);
- relative delta norms ``|tau_V| / |theta_B|`` and ``|tau_E| / |theta_B|``;
- the *sign-conflict rate*: among entries where both task vectors are non-negligible, the fraction
  where their signs differ. An entry of a task vector is **non-negligible** when its magnitude is at
  least ``threshold`` (default 1.0) times that task vector's root mean square over the row block it
  is read in (a whole tensor, or about 4M entries of a larger one). For Gaussian-like deltas that
  keeps the largest ~32% of each delta, about what TIES keeps (Yadav et al., NeurIPS 2023); two
  unrelated deltas conflict on 50% of such entries, a shared direction on fewer. Tensors over
  ``SIGN_EXACT`` entries are examined on every ``SIGN_STRIDE``-th row (norms are always exact);
- the *effective rank* of a matrix (Roy and Vetterli, EUSIPCO 2007), entropy-based:
  ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` over its singular values; it equals k for k equal
  singular values and 1 for a rank-one matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

DEFAULT_THRESHOLD = 1.0
SIGN_EXACT = 1 << 20  # tensors up to this many entries have every entry examined for sign conflicts ...
SIGN_STRIDE = 8       # ... larger ones every 8th row (the same rows of both deltas)


@dataclass
class PairStats:
    """Sums over a group of entries; add groups with ``+=``. ``n`` counts entries."""

    n: int = 0
    m: int = 0              # entries examined for sign conflicts (n, or a row sample of it)
    vv: float = 0.0         # |tau_V|^2
    ee: float = 0.0         # |tau_E|^2
    ve: float = 0.0         # <tau_V, tau_E>
    bb: float = 0.0         # |theta_B|^2
    both: int = 0           # entries where both deltas are non-negligible
    conflicts: int = 0      # ... and their signs differ

    def __iadd__(self, other: "PairStats") -> "PairStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def summary(self) -> dict[str, float | int | None]:
        """Norms, ratio, cosine, conflict rate and relative norms (None where undefined)."""
        nv, ne, nb = math.sqrt(self.vv), math.sqrt(self.ee), math.sqrt(self.bb)
        return {
            "entries": self.n,
            "norm_vlm": nv,
            "norm_expert": ne,
            "ratio": ne / nv if nv > 0 else None,
            "cosine": self.ve / (nv * ne) if nv > 0 and ne > 0 else None,
            "sign_conflict": self.conflicts / self.both if self.both else None,
            "both_non_negligible": self.both / self.m if self.m else None,
            "rel_vlm": nv / nb if nb > 0 else None,
            "rel_expert": ne / nb if nb > 0 else None,
        }

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def block_stats(tau_v: torch.Tensor, tau_e: torch.Tensor, base: torch.Tensor,
                threshold: float = DEFAULT_THRESHOLD, stride: int = 1) -> PairStats:
    """The sums of one row block of contiguous float32 task vectors and base weights (same shape).

    Norms and the inner product are BLAS dot products over every entry (accumulated across blocks in
    float64); sign conflicts are counted on every ``stride``-th row.
    """
    v, e, b = tau_v.reshape(-1), tau_e.reshape(-1), base.reshape(-1)
    n = v.numel()
    vv, ee = float(torch.dot(v, v)), float(torch.dot(e, e))
    out = PairStats(n=n, vv=vv, ee=ee, ve=float(torch.dot(v, e)), bb=float(torch.dot(b, b)))
    sv, se = (tau_v, tau_e) if stride == 1 or tau_v.dim() == 0 else (tau_v[::stride], tau_e[::stride])
    out.m = sv.numel()
    if vv > 0 and ee > 0 and n > 0:  # a zero delta has no non-negligible entry (and no sign)
        big = (sv.abs() >= threshold * math.sqrt(vv / n)) & (se.abs() >= threshold * math.sqrt(ee / n))
        out.both = int(big.sum())
        out.conflicts = int((big & ((sv > 0) != (se > 0))).sum())
    return out


def effective_rank(matrix: torch.Tensor) -> float:
    """Entropy-based effective rank exp(H(sigma / sum sigma)) of a 2-D tensor (0 for a zero matrix)."""
    if matrix.dim() != 2:
        raise ValueError("effective rank needs a matrix")
    s = torch.linalg.svdvals(matrix.double() if matrix.numel() <= 1 << 16 else matrix.float()).double()
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
