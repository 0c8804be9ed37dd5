"""Sparsification of a single task vector: the building blocks TIES, DARE, Breadcrumbs, DELLA share.

Counting convention (same as mergekit and PEFT): a magnitude trim at density ``p`` keeps
``int(p * n)`` entries (floor). mergekit additionally keeps at least one entry; PEFT may keep zero.
We keep at least one (mergekit) -- the two only differ when ``p * n < 1``.

Ties in magnitude are broken by position (lower flat index wins), so masks are deterministic and
keep exactly the requested count; mergekit (argsort) and PEFT (topk) break ties arbitrarily, so on
inputs with repeated magnitudes *which* tied entries are kept may differ, never how many.

Speed: the top-k selection never sorts the tensor. It estimates the threshold from a strided
sample, counts the entries above an upper bound, and runs an exact ``kthvalue`` on the thin band of
candidates only (falling back to a full ``kthvalue`` if the estimate missed), so it is exact and
costs a few linear passes instead of an ``O(n log n)`` sort.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

_EXACT_BELOW = 1 << 17  # below this many entries a plain kthvalue is cheapest
_SAMPLE = 1 << 16


def keep_count(n: int, density: float) -> int:
    """Entries a magnitude trim keeps: ``max(1, int(density * n))`` (mergekit's rule), ``n`` at density >= 1."""
    if density >= 1.0:
        return n
    if n == 0:
        return 0
    return max(1, int(density * n))


def _kth_largest_mask(a: Tensor, k: int) -> Tensor:
    """Bool mask (flat) of the ``k`` largest entries of the 1-D non-negative ``a``; ties by position."""
    n = a.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    thr = None
    if n > _EXACT_BELOW:
        thr = _banded_threshold(a, k)
    if thr is None:
        # k-th largest == (n-k+1)-th smallest
        thr = torch.kthvalue(a, n - k + 1).values
    gt = a > thr
    need = k - int(gt.sum())
    if need > 0:
        eq = a == thr
        n_eq = int(eq.sum())
        if n_eq > need:
            idx = eq.nonzero().flatten()[need:]
            eq[idx] = False
        gt |= eq
    return gt


def _banded_threshold(a: Tensor, k: int) -> Tensor | None:
    """The exact k-th largest value of ``a`` via a sampled band; None if the band missed it."""
    n = a.numel()
    step = max(1, n // _SAMPLE)
    # offset the stride start so that rows of a matrix are not always sampled at column 0
    sample = a[step // 2 :: step]
    m = sample.numel()
    q = 1.0 - k / n  # fraction of entries below the threshold
    margin = 6.0 / math.sqrt(m) + 2.0 / m
    lo_rank = max(1, min(m, int(math.floor((q - margin) * m))))
    hi_rank = max(1, min(m, int(math.ceil((q + margin) * m)) + 1))
    lo = torch.kthvalue(sample, lo_rank).values if q - margin > 0 else None
    hi = torch.kthvalue(sample, hi_rank).values if q + margin < 1 else None
    above = a > hi if hi is not None else None
    c_hi = int(above.sum()) if above is not None else 0
    if c_hi > k:
        return None
    band = a >= lo if lo is not None else torch.ones_like(a, dtype=torch.bool)
    if above is not None:
        band &= ~above
    cand = a[band]
    need = k - c_hi
    if need > cand.numel():
        return None
    return torch.kthvalue(cand, cand.numel() - need + 1).values


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Boolean mask keeping the ``keep_count(n, density)`` entries with largest |delta| (TIES trim)."""
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    return _kth_largest_mask(delta.abs().flatten(), k).view(delta.shape)


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """Keep the top ``density`` fraction of entries by magnitude, zero the rest (no rescale).

    Returns ``delta`` itself (not a copy) when nothing is trimmed.
    """
    if density >= 1.0:
        return delta
    return delta * magnitude_mask(delta, density)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: drop the ``gamma`` fraction of largest-|delta| entries and the smallest
    ones, keeping ``int(density * n)`` entries in all.

    Same counts as mergekit's ``magnitude_outliers``: ``n_top = int(gamma * n)`` largest are removed,
    reduced when needed so that the kept count still reaches ``int(density * n)``.
    """
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    n_top = n - target - n_bot  # actually removed from the top
    a = delta.abs().flatten()
    keep = _kth_largest_mask(a, target + n_top)
    if n_top > 0:
        keep &= ~_kth_largest_mask(a, n_top)
    return keep.view(delta.shape)


def random_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """Bernoulli(density) keep-mask drawn from ``generator`` (DARE's drop step).

    Drawn as ``torch.bernoulli(full(density))``: the same stream PEFT's ``random_pruning`` and
    mergekit's ``bernoulli`` draw from the global generator, so a generator seeded like the global
    one reproduces their masks exactly.
    """
    probs = torch.full(delta.shape, float(density), dtype=torch.float32, device=delta.device)
    return torch.bernoulli(probs, generator=generator).to(torch.bool)


def norm_of(x: Tensor, norm: str) -> Tensor:
    if norm == "l1":
        return x.abs().sum()
    if norm == "l2":
        return torch.linalg.vector_norm(x)
    if norm == "linf":
        return x.abs().max()
    raise ValueError(f"rescale norm must be 'l1', 'l2' or 'linf', not {norm!r}")


def norm_rescale(original: Tensor, masked: Tensor, norm: str, eps: float = 1e-7) -> Tensor:
    """Scale ``masked`` (in place) so its ``norm`` matches ``original``'s (mergekit 0.1.5's rescale)."""
    if original.numel() == 0:
        return masked
    before = norm_of(original, norm)
    after = norm_of(masked, norm)
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


RESCALE_CHOICES = (True, False, "l1", "l2", "linf")


def dare_drop(
    delta: Tensor, density: float, generator: torch.Generator | None, rescale: bool | str = True
) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability 1-density, rescale the kept ones.

    ``rescale=True`` divides kept entries by ``density`` (the paper; PEFT's ``rescale=True``), which
    keeps the delta's expectation equal to the delta. ``"l1"``/``"l2"``/``"linf"`` instead rescale the
    whole tensor so that norm is preserved (mergekit 0.1.5's ``rescale: true`` uses ``"l1"``).
    ``False`` keeps the dropped delta unscaled (a known mistake in some published scripts).
    """
    if density >= 1.0:
        return delta
    kept = delta * random_mask(delta, density, generator)
    if rescale is True:
        return kept.div_(density)
    if rescale is False or rescale is None:
        return kept
    return norm_rescale(delta, kept, str(rescale))


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities: within each row (a 1-D tensor is one row), entries ranked
    by |delta|; the smallest gets ``density - epsilon``, the largest ``density + epsilon``, linear in rank.
    """
    x = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    x = x.reshape(x.shape[0], -1)
    m = x.shape[1]
    order = torch.argsort(x.abs(), dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=x.device).expand_as(order))
    if m > 1:
        rank_norm = ranks.to(torch.float32) / float(m - 1)
    else:
        rank_norm = torch.zeros_like(ranks, dtype=torch.float32)
    probs = (density - epsilon) + rank_norm * (2.0 * epsilon)
    return probs.reshape(delta.shape)


def della_drop(
    delta: Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    rescale: bool | str = True,
) -> Tensor:
    """DELLA MagPrune (Deep et al. 2024): drop entry i with probability ``1 - p_i`` (``p_i`` from
    ``della_probabilities``), rescale kept entries by ``1 / p_i`` (the paper; ``rescale=True``) or to
    match a norm (``"l1"``: mergekit 0.1.5), or not at all (``False``).
    """
    if density >= 1.0:
        return delta
    check_della(density, epsilon)
    probs = della_probabilities(delta, density, epsilon)
    keep = torch.bernoulli(probs, generator=generator).to(torch.bool)
    kept = delta * keep
    if rescale is True:
        return kept.div_(probs)
    if rescale is False or rescale is None:
        return kept
    return norm_rescale(delta, kept, str(rescale))


def check_della(density: float, epsilon: float) -> None:
    if density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise ValueError(
            f"DELLA needs density +/- epsilon inside (0, 1); got density={density}, epsilon={epsilon}"
        )
