"""Exact top-k by magnitude over a tensor seen block by block, in bounded memory.

``TopK`` finds the ``k`` largest ``|x|`` of an ``n``-entry tensor (ties broken by position: the
lower flat index wins) without holding the tensor: one statistics pass over its blocks, in order,
then a keep-mask per block in the apply pass.

The statistics pass brackets the threshold with a sample of ``|x|`` (``sample``), counts the entries
above the bracket and gathers the thin band inside it; ``kthvalue`` on the band gives the exact
k-th largest magnitude. If the sample missed (the band does not contain the k-th entry, or it grew
past ``band_cap`` entries), ``refine`` asks for two more passes that find the threshold exactly by
radix selection on the float bits: a histogram of the top 16 bits, then of the low 15 bits inside
the chosen bin. Without a sample (tensors of at most ``EXACT_BELOW`` entries) every value is the band.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .kernels import compare, count, first_true, select

Tensor = torch.Tensor

EXACT_BELOW = 1 << 17  # up to this many entries the band is the whole tensor
SAMPLE = 1 << 17  # entries of the sample that brackets the threshold
_HIGH, _LOW = 1 << 16, 1 << 15  # radix bins: bits 30..15, then bits 14..0 of a non-negative float32


def keep_count(n: int, density: float) -> int:
    """Entries a magnitude trim keeps: ``max(1, int(density * n))`` (mergekit's rule), ``n`` at density >= 1."""
    if density >= 1.0:
        return n
    if n == 0:
        return 0
    return max(1, int(density * n))


def bracket(sample: Tensor, n: int, k: int) -> tuple[Tensor | None, Tensor | None, float]:
    """Lower and upper bounds of the k-th largest of ``n`` magnitudes, from a sample of them, and the
    fraction of the sample between them.

    The bounds sit about five standard deviations of a sample quantile either side of it (plus slack
    for discreteness); ``None`` is an open end.
    """
    m = sample.numel()
    q = 1.0 - k / n  # fraction of entries below the threshold
    margin = 5.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 4.0 / m
    lo_i, hi_i = int(math.floor((q - margin) * m)), int(math.ceil((q + margin) * m))
    lo = torch.kthvalue(sample, lo_i + 1).values if lo_i >= 0 else None
    hi = torch.kthvalue(sample, hi_i + 1).values if hi_i < m else None
    return lo, hi, (min(hi_i, m - 1) - max(lo_i, 0) + 1) / m


class TopK:
    """Exact streamed selection of the ``k`` largest of ``n`` magnitudes (see the module docstring).

    Use: ``observe`` the ``|x|`` of every block in order (or ``measure`` blocks in any order and
    ``absorb`` the results in order), ``finish``; while ``refine`` is true, again; then ``mask`` the
    blocks in order.
    """

    def __init__(self, n: int, k: int, sample: Tensor | None = None, band_cap: int | None = None):
        self.n, self.k = n, k
        self.all, self.none = k >= n, k <= 0
        self.lo = self.hi = None
        inside = 1.0
        if not (self.all or self.none) and sample is not None and n > EXACT_BELOW:
            self.lo, self.hi, inside = bracket(sample, n, k)
        self.band_cap = band_cap if band_cap is not None else max(1 << 22, n // 50)
        self._expect = min(self.band_cap, int(1.25 * inside * n) + 4096)  # the band buffer's first size
        self._reset()
        self.thr: Tensor | None = None
        self.eq_left = 0  # entries equal to thr still to keep, in position order
        self.simple = True  # every entry equal to thr is kept: mask = |x| >= thr
        self.quotas: list[tuple[int, int]] | None = None  # per block: (entries equal to thr, how many kept)
        self.refine = False
        self._stage = "band"
        self._bin = 0
        self._above = 0

    @property
    def needs_pass(self) -> bool:
        return not (self.all or self.none)

    def _reset(self) -> None:
        self.c_hi = 0
        self.band: Tensor | None = None  # the gathered band, one buffer (see ``absorb``)
        self.band_n = 0
        self.starts: list[int] = []  # where each block's part of the band begins
        self.hist: Tensor | None = None

    def measure(self, a: Tensor) -> Any:
        """What one block's magnitudes (any shape, read in flat order) add to the statistics; no state
        is changed, so blocks may be measured side by side and ``absorb`` ed in order."""
        if not self.needs_pass:
            return None
        a = a.reshape(-1)
        if self._stage != "band":
            bits = a.float().contiguous().view(torch.int32)
            if self._stage == "high":
                return torch.bincount((bits >> 15).reshape(-1), minlength=_HIGH)
            return torch.bincount(bits[(bits >> 15) == self._bin] & (_LOW - 1), minlength=_LOW)
        c_hi = 0
        if self.hi is not None:
            above = compare(a, ">", self.hi)
            c_hi = count(above)
            keep = above.logical_not_() if self.lo is None else compare(a, ">=", self.lo).logical_and_(above.logical_not_())
            band = select(a, keep)
        elif self.lo is not None:
            band = select(a, compare(a, ">=", self.lo))
        else:
            band = a.clone()
        return c_hi, band

    def absorb(self, part: Any) -> None:
        if part is None:
            return
        if self._stage != "band":
            self.hist = part if self.hist is None else self.hist + part
            return
        c_hi, band = part
        self.c_hi += c_hi
        n = band.numel()
        self.starts.append(self.band_n)
        if self.band_n + n > self.band_cap:
            self.band_n = self.band_cap + 1  # give up gathering; the radix passes will decide
            self.band = None
        elif self.band_n <= self.band_cap:
            # one buffer, grown by doubling: many small long-lived pieces among the blocks' large
            # temporaries would fragment the heap (measured: 1 GB of RSS over an embedding's pass)
            if self.band is None or self.band_n + n > self.band.numel():
                size = self._expect if self.band is None else 2 * (self.band_n + n)
                grown = torch.empty(min(self.band_cap, max(size, self.band_n + n)), dtype=band.dtype, device=band.device)
                if self.band_n:
                    grown[: self.band_n] = self.band[: self.band_n]
                self.band = grown
            self.band[self.band_n : self.band_n + n] = band
            self.band_n += n

    def observe(self, a: Tensor) -> None:
        """Statistics of the next block's magnitudes (``measure`` then ``absorb``)."""
        self.absorb(self.measure(a))

    def finish(self) -> None:
        """End of a statistics pass: the threshold, or ``refine`` set for another pass."""
        if not self.needs_pass:
            return
        if self._stage == "band":
            found = self._from_band()
            if found is not None:
                cand = self.band[: self.band_n]
                self._set(*found)
                if not self.simple:
                    self._share_ties(cand)
                return
            self._stage, self.refine = "high", True
        elif self._stage == "high":
            self._pick_high()
        else:
            self._pick_low()
        self._reset()

    def _from_band(self) -> tuple[Tensor, int, int] | None:
        if self.band_n > self.band_cap or self.c_hi > self.k:
            return None
        need = self.k - self.c_hi
        cand = self.band[: self.band_n] if self.band is not None else torch.empty(0)
        if need > cand.numel() or need <= 0:
            return None
        thr = torch.kthvalue(cand, cand.numel() - need + 1).values
        n_gt = self.c_hi + count(compare(cand, ">", thr))
        n_eq = count(compare(cand, "==", thr))
        return thr, n_gt, n_eq

    def _share_ties(self, band: Tensor) -> None:
        """Per block, how many of its entries equal to the threshold are kept (the first ones by position,
        the earlier blocks first): from each block's part of the band, so blocks need no order."""
        bounds = self.starts + [band.numel()]
        left = self.eq_left
        self.quotas = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            n_eq = count(compare(band[a:b], "==", self.thr))
            take = min(n_eq, left)
            self.quotas.append((n_eq, take))
            left -= take

    @property
    def order_free(self) -> bool:
        """True when ``mask`` needs no block order (every tie kept, or each block's share known)."""
        return self.simple or self.quotas is not None

    def _pick(self, above: int) -> tuple[int, int]:
        """(bin holding the k-th largest, entries above that bin), counting down from the top."""
        hist = self.hist.cpu()
        from_top = hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(self.k - above)))
        b = hist.numel() - 1 - i
        return b, above + int(from_top[i] - hist[b])

    def _pick_high(self) -> None:
        self._bin, self._above = self._pick(0)
        self._stage = "low"

    def _pick_low(self) -> None:
        low, n_gt = self._pick(self._above)
        n_eq = int(self.hist[low])
        thr = torch.tensor([(self._bin << 15) | low], dtype=torch.int32).view(torch.float32)[0]
        self._set(thr, n_gt, n_eq)

    def _set(self, thr: Tensor, n_gt: int, n_eq: int) -> None:
        self.thr = thr
        self.eq_left = self.k - n_gt
        self.simple = self.eq_left == n_eq
        self.refine = False
        self.band = None

    def mask(self, a: Tensor, block: int | None = None) -> Tensor:
        """Keep-mask of a block given its magnitudes ``a``: block number ``block`` of the statistics pass
        (any order), or, without it, the next block (blocks in order)."""
        if self.all:
            return torch.ones_like(a, dtype=torch.bool)
        if self.none:
            return torch.zeros_like(a, dtype=torch.bool)
        thr = self.thr
        if self.simple:
            return compare(a, ">=", thr)
        keep = compare(a, ">", thr)
        if block is not None and self.quotas is not None:
            n_eq, take = self.quotas[block]
            if take == n_eq and take:
                keep |= compare(a, "==", thr)
            elif take:
                keep.view(-1)[first_true(compare(a, "==", thr), take)] = True
            return keep
        if self.eq_left > 0:
            eq = compare(a, "==", thr)
            n_eq = count(eq)
            if n_eq <= self.eq_left:
                keep |= eq
                self.eq_left -= n_eq
            elif n_eq:
                keep.view(-1)[first_true(eq, self.eq_left)] = True
                self.eq_left = 0
        return keep
