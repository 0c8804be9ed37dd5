"""The math of skill formats: low-rank factors, 1-bit signs with row scales, top-k sparse rows.

Pure functions on float32 tensors (no I/O). Each format stores a task vector ``delta`` of shape
``[rows, cols]`` in a few tensors and rebuilds any leading block of rows from them, so a reader
can serve the first ``n`` rows of a reconstructed delta without rebuilding the rest.

- low-rank: ``delta ~ B @ A`` from a truncated SVD (exact for small matrices, randomised for
  large ones; with an energy target the rank comes from the exact singular values, obtained from
  the eigenvalues of the smaller Gram matrix).
- BitDelta (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit"): the signs of
  ``delta`` packed 8 to a byte, times one scale per output row, set to the row's mean absolute
  delta (the L2-optimal scale for a fixed sign pattern); no distillation step.
- sparse: the top ``density`` fraction of entries by magnitude (ties broken by position, the same
  counting rule as TIES' trim), in compressed-row form: row pointers, column indices, values.
"""

from __future__ import annotations

import math

import torch

from ..methods.sparsify import keep_count, whole_topk

Tensor = torch.Tensor

EXACT_SVD_MAX = 1024  # matrices whose smaller side is at most this get an exact SVD
OVERSAMPLE = 8  # extra columns of the randomised range finder
POWER_ITERATIONS = 2
BLOCK_ELEMENTS = 1 << 22  # row blocks of about 4M entries (16 MB in float32)


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Consecutive row ranges of about BLOCK_ELEMENTS entries covering ``rows`` rows."""
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


# ----------------------------------------------------------------------------- low rank


def rank_for_energy(sq_singular: Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold ``energy`` of the squared Frobenius norm."""
    total = float(sq_singular.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(sq_singular.double(), 0) / total
    return int(torch.searchsorted(cum, torch.tensor(min(energy, 1.0) - 1e-12, dtype=cum.dtype))) + 1


def _gram_factors(delta: Tensor, energy: float) -> tuple[Tensor, Tensor]:
    """Exact truncated SVD at the rank that keeps ``energy``, via the smaller Gram matrix.

    ``eigh`` of ``delta^T delta`` (or ``delta delta^T``) in float64 gives the squared singular
    values and one side's singular vectors; the other factor is a projection of ``delta``.
    """
    rows, cols = delta.shape
    wide = cols > rows
    n = rows if wide else cols
    gram = torch.zeros(n, n, dtype=torch.float64)
    if wide:
        for c in row_blocks(cols, rows):
            part = delta[:, c]
            gram += (part @ part.T).double()
    else:
        for r in row_blocks(rows, cols):
            part = delta[r]
            gram += (part.T @ part).double()
    vals, vecs = torch.linalg.eigh(gram)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    r = rank_for_energy(vals, energy)
    basis = vecs[:, :r].float().contiguous()
    if wide:  # delta ~ U_r (U_r^T delta)
        return basis, basis.T @ delta
    return delta @ basis, basis.T.contiguous()  # delta ~ (delta V_r) V_r^T


def lowrank_factors(delta: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A`` the best rank-r approximation of a 2-D ``delta`` (float32).

    Give ``rank`` or ``energy`` (the fraction of ``||delta||_F^2`` to keep). Matrices whose smaller
    side is at most EXACT_SVD_MAX get an exact SVD; larger ones a randomised SVD (Halko et al.
    2011, ``torch.svd_lowrank``) for a fixed rank, or the Gram-matrix eigendecomposition for an
    energy target. The singular values go to ``B``.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    rows, cols = delta.shape
    full = min(rows, cols)
    if full <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, full) if rank is not None else rank_for_energy(s.square(), energy)
        return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()
    if energy is not None:
        return _gram_factors(delta, energy)
    r = min(rank, full)
    u, s, v = torch.svd_lowrank(delta, q=min(r + OVERSAMPLE, full), niter=POWER_ITERATIONS)
    return (u[:, :r] * s[:r]).contiguous(), v[:, :r].T.contiguous()


def lowrank_rows(b: Tensor, a: Tensor, rows: int | None = None) -> Tensor:
    """The first ``rows`` rows of ``B @ A`` in float32 (only those rows are computed)."""
    b = b if rows is None else b[:rows]
    return b.float() @ a.float()


# ----------------------------------------------------------------------------- BitDelta

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_signs(delta: Tensor) -> Tensor:
    """``uint8 [rows, ceil(cols / 8)]``: bit j of byte i is 1 where ``delta[:, 8 i + j] >= 0``."""
    rows, cols = delta.shape
    pad = -cols % 8
    bits = delta >= 0
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    return (bits.view(rows, -1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, cols: int) -> Tensor:
    """float32 ``[rows, cols]`` of +1 / -1 from :func:`pack_signs`' bytes."""
    rows = packed.shape[0]
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS).ne(0).reshape(rows, -1)[:, :cols]
    return bits.float().mul_(2).sub_(1)


def bitdelta_scales(delta: Tensor) -> Tensor:
    """Per-row scale ``mean |delta|``: the L2-optimal scale for ``scale * sign(delta)``."""
    return delta.abs().mean(dim=1)


def bitdelta_rows(packed: Tensor, scale: Tensor, cols: int, rows: int | None = None) -> Tensor:
    """The first ``rows`` rows of ``scale[:, None] * sign`` in float32."""
    if rows is not None:
        packed, scale = packed[:rows], scale[:rows]
    return unpack_signs(packed, cols).mul_(scale.float().unsqueeze(1))


# ----------------------------------------------------------------------------- sparse


def index_dtype(limit: int) -> torch.dtype:
    """The narrowest signed integer type that holds values up to ``limit``."""
    if limit <= torch.iinfo(torch.int16).max:
        return torch.int16
    if limit <= torch.iinfo(torch.int32).max:
        return torch.int32
    return torch.int64


def sparse_count(numel: int, density: float) -> int:
    """Entries a sparse skill keeps: TIES' trim count (``max(1, int(density * n))``)."""
    return keep_count(numel, density)


def sparse_rows(delta: Tensor, density: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(rowptr, col, val)``: the top ``density`` fraction of a 2-D ``delta`` by magnitude, by rows.

    The selection streams over row blocks with :func:`skillgraft.methods.sparsify.whole_topk`
    (exact count, ties broken by position); ``val`` is float32.
    """
    rows, cols = delta.shape
    topk = whole_topk(delta, sparse_count(delta.numel(), density))
    counts, col_parts, val_parts = [], [], []
    for blk in row_blocks(rows, cols):
        part = delta[blk]
        keep = topk.mask(part.abs())
        counts.append(keep.sum(1))
        r, c = keep.nonzero(as_tuple=True)
        col_parts.append(c)
        val_parts.append(part[r, c])
    rowptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(torch.cat(counts), 0, out=rowptr[1:])
    col = torch.cat(col_parts) if col_parts else torch.zeros(0, dtype=torch.int64)
    val = torch.cat(val_parts) if val_parts else torch.zeros(0)
    return rowptr, col, val


def sparse_to_dense(rowptr: Tensor, col: Tensor, val: Tensor, cols: int, rows: int | None = None) -> Tensor:
    """The first ``rows`` rows of the dense float32 matrix in compressed-row form."""
    n = rowptr.numel() - 1 if rows is None else rows
    end = int(rowptr[n])
    out = torch.zeros(n, cols)
    counts = (rowptr[1 : n + 1] - rowptr[:n]).long()
    r = torch.repeat_interleave(torch.arange(n), counts)
    out[r, col[:end].long()] = val[:end].float()
    return out


def relative_error(delta: Tensor, approx: Tensor) -> tuple[float, float]:
    """(sum of squared errors, sum of squares of ``delta``) of one block, for a relative error."""
    return float((delta - approx).square().sum()), float(delta.square().sum())


def rel(err_sq: float, ref_sq: float) -> float:
    """``sqrt(err_sq / ref_sq)``; 0 when both are 0."""
    if ref_sq <= 0:
        return 0.0 if err_sq <= 0 else math.inf
    return math.sqrt(err_sq / ref_sq)
