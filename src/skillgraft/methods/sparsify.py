"""Sparsifiers: how one task vector is thinned before the task vectors are combined.

A ``Sparsifier`` is data (its name, parameters, whether it draws random numbers); ``start`` builds
the state for one task vector of one tensor, which the engine drives block by block:

- ``passes``: statistics passes it needs before the apply pass (0, or 1 for a whole-tensor
  statistic: a top-k threshold, a norm): ``measure`` each block (thread-safe), ``absorb`` the
  results in block order, ``finish`` the pass; ``refine`` asks for more;
- ``apply(x, keep, block)``: the thinned block (``x``, which the state may overwrite);
  ``keep(shape, p)`` draws the vector's next keep-mask from the random streams; ``block`` is the
  block's number in the statistics pass (None: blocks come in order).

The four sparsifiers, after their papers (counts and rescales as mergekit and PEFT have them):

- magnitude (TIES trim, Yadav et al. 2023): keep the ``keep_count(n, density)`` largest ``|tau|``;
- outliers (Model Breadcrumbs, Davari & Belilovsky 2024): drop the top ``gamma`` fraction too;
- dare (Yu et al. 2024): keep each entry with probability ``density``, divide kept ones by it;
- della (MagPrune, Deep et al. 2024): keep probability linear in the entry's magnitude rank within
  its row, from ``density - epsilon`` to ``density + epsilon``, kept ones divided by it.

``rescale`` of dare and della may instead match a norm of the dropped vector to the original's
(``"l1"`` is mergekit 0.1.5's choice): a whole-tensor statistic, so one statistics pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .kernels import mul_mask_
from .params import ParamSpec
from .reduce import NormMatch
from .streams import BlockStreams
from .topk import SAMPLE, TopK, keep_count

Tensor = torch.Tensor
Keep = Callable[[tuple[int, ...], Any], Tensor]  # (shape, probability) -> bool keep-mask

RESCALE_CHOICES = (True, False, "l1", "l2", "linf")
SAMPLERS = ("uniform", "bernoulli")

GAMMA = ParamSpec("gamma", "float", 0.01, "fraction of largest-magnitude entries removed as outliers (paper's gamma)",
                  low=0.0, high=1.0, open_high=True, per_layer=True)
EPSILON = ParamSpec(
    "epsilon", "float", 0.15,
    "half-width of the keep-probability range around density (paper's epsilon; default as in mergekit)",
    low=0.0, high=1.0, open_high=True, per_layer=True,
)
SAMPLER = ParamSpec(
    "sampler", "choice", "uniform",
    "how the keep-masks are drawn: 'uniform' (32-bit random words, fastest) or 'bernoulli' (torch.bernoulli, the "
    "same stream as PEFT/mergekit for the same seed)",
    choices=SAMPLERS,
)
_RESCALE_DOC = ("true: divide kept entries by their keep probability (the papers, PEFT); 'l1'/'l2'/'linf': rescale the "
                "dropped tensor to keep that norm (mergekit 0.1.5 uses 'l1'); false: no rescale")
RESCALE = ParamSpec("rescale", "choice", True, _RESCALE_DOC, choices=RESCALE_CHOICES)


def norm_rescale(params: dict[str, Any]) -> str | None:
    """The norm a ``rescale`` parameter matches, or None when it is a per-entry rescale (or none)."""
    r = params.get("rescale", True)
    return None if r in (True, False, None) else str(r)


# ----------------------------------------------------------------------------------- states


class _Vector:
    """The state of one task vector: no statistics, nothing dropped."""

    passes = 0
    refine = False

    def measure(self, x: Tensor, keep: Keep) -> Any:
        return None

    def absorb(self, part: Any) -> None:
        pass

    def finish(self) -> None:
        pass

    def apply(self, x: Tensor, keep: Keep, block: int | None = None) -> Tensor:
        return x


class _Trimmed(_Vector):
    """Magnitude trim (``drop`` None) or Breadcrumbs band (``drop``: the top entries removed again)."""

    passes = 1

    def __init__(self, keep: TopK, drop: TopK | None):
        self.tops = [t for t in (keep, drop) if t is not None]
        self.drop = drop

    @property
    def refine(self) -> bool:
        return any(t.refine for t in self.tops)

    @property
    def order_free(self) -> bool:
        """True once the thresholds are known and no block's ties depend on the blocks before it."""
        return all(t.order_free for t in self.tops)

    def measure(self, x: Tensor, keep: Keep) -> Any:
        a = x.abs()
        return [t.measure(a) for t in self.tops]

    def absorb(self, part: Any) -> None:
        for t, p in zip(self.tops, part):
            t.absorb(p)

    def finish(self) -> None:
        for t in self.tops:
            t.finish()

    def mask(self, a: Tensor, block: int | None = None) -> Tensor:
        """Keep-mask of a block given its magnitudes (see ``TopK.mask``)."""
        m = self.tops[0].mask(a, block)
        if self.drop is not None:
            m &= ~self.drop.mask(a, block)
        return m

    def apply(self, x: Tensor, keep: Keep, block: int | None = None) -> Tensor:
        return mul_mask_(x, self.mask(x.abs(), block))


class _Dropped(_Vector):
    """Random drop with per-entry keep probability ``prob(x)`` (a number or a tensor), then rescale."""

    def __init__(self, prob: Callable[[Tensor], Any], rescale: Any):
        self.prob = prob
        self.rescale = rescale
        self.match = NormMatch(rescale) if isinstance(rescale, str) else None
        self.passes = 0 if self.match is None else 1

    def _thin(self, x: Tensor, keep: Keep, inplace: bool = False) -> tuple[Tensor, Any]:
        p = self.prob(x)
        mask = keep(tuple(x.shape), p)
        return mul_mask_(x if inplace else x.clone(), mask), p

    def measure(self, x: Tensor, keep: Keep) -> Any:
        return self.match.measure(x, self._thin(x, keep)[0])

    def absorb(self, part: Any) -> None:
        self.match.absorb(part)

    def finish(self) -> None:
        self.match.finish()

    def apply(self, x: Tensor, keep: Keep, block: int | None = None) -> Tensor:
        kept, p = self._thin(x, keep, inplace=self.match is None)
        if self.rescale is True:
            return kept.div_(p)
        return kept if self.match is None else self.match.apply(kept)


# ----------------------------------------------------------------------------------- sparsifiers


@dataclass(frozen=True)
class Sparsifier:
    """How each task vector is thinned: name, parameters, randomness, and its per-tensor state."""

    name: str
    params: tuple[ParamSpec, ...]
    start_fn: Callable[..., _Vector]
    random: bool = False
    needs_sample: bool = False  # a top-k threshold: brackets it with a sample of the vector
    words: bool = False  # a scalar keep probability: the 'uniform' sampler may use 32-bit words
    ranks_rows: bool = False  # ranks entries within rows, a 1-D tensor being one row
    stats: str = ""  # the whole-tensor statistic it gathers in a first pass, if any (for the plan and docs)

    def start(self, n: int, density: float, params: dict[str, Any], sample: Tensor | None = None) -> _Vector:
        """State for one task vector of ``n`` entries at ``density`` (``sample``: some of its values)."""
        if density >= 1.0:
            return _Vector()
        return self.start_fn(n, density, params, sample)

    def draws(self, params: dict[str, Any]) -> str:
        """The kind of random stream it reads (see ``streams``): 32-bit ``words`` or ``floats``."""
        return "words" if self.words and params.get("sampler", "uniform") == "uniform" else "floats"

    def statistic(self, params: dict[str, Any] | None) -> str:
        """What it gathers in a statistics pass under ``params`` (any, when None), or ''."""
        if self.random:
            norm = None if params is None else norm_rescale(params)
            return f"the {norm} norm of each dropped task vector (rescale: {norm})" if norm else (
                "the norm of each dropped task vector when rescale is l1/l2/linf" if params is None else "")
        return self.stats

    def row_local(self, params: dict[str, Any]) -> bool:
        """True when a kept entry depends on its own row only (no whole-tensor statistic)."""
        return not self.needs_sample and norm_rescale(params) is None


def _magnitude(n: int, density: float, params: dict, sample: Tensor | None) -> _Vector:
    a = None if sample is None else sample.abs()
    return _Trimmed(TopK(n, keep_count(n, density), a), None)


def _outliers(n: int, density: float, params: dict, sample: Tensor | None) -> _Vector:
    """Same counts as mergekit's ``magnitude_outliers``: ``int(density * n)`` entries kept after removing
    the ``int(gamma * n)`` largest, fewer outliers removed when ``density + gamma > 1``."""
    a = None if sample is None else sample.abs()
    target = int(density * n)
    n_bot = max(0, n - target - int(float(params["gamma"]) * n))
    drop = n - target - n_bot
    return _Trimmed(TopK(n, target + drop, a), TopK(n, drop, a) if drop > 0 else None)


def _dare(n: int, density: float, params: dict, sample: Tensor | None) -> _Vector:
    return _Dropped(lambda x: density, params["rescale"])


def _della(n: int, density: float, params: dict, sample: Tensor | None) -> _Vector:
    eps = float(params["epsilon"])
    check_della(density, eps)
    return _Dropped(lambda x: della_probabilities(x, density, eps), params["rescale"])


NONE = Sparsifier("none", (), lambda *a: _Vector())
MAGNITUDE = Sparsifier("magnitude", (), _magnitude, needs_sample=True, stats="a top-k threshold per task vector")
OUTLIERS = Sparsifier("outliers", (GAMMA,), _outliers, needs_sample=True,
                      stats="two top-k thresholds per task vector")
DARE = Sparsifier("dare", (RESCALE, SAMPLER), _dare, random=True, words=True)
DELLA = Sparsifier("della", (EPSILON, RESCALE, SAMPLER), _della, random=True, ranks_rows=True)


# ----------------------------------------------------------------------------------- helpers


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


def check_della(density: float, epsilon: float) -> None:
    if density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise ValueError(
            f"DELLA needs density +/- epsilon inside (0, 1); got density={density}, epsilon={epsilon}"
        )


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Boolean mask keeping the ``keep_count(n, density)`` entries with largest |delta| (TIES trim)."""
    return _one_pass_mask(MAGNITUDE, delta, density, {})


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: drop the ``gamma`` fraction of largest-|delta| entries and the smallest
    ones, keeping ``int(density * n)`` entries in all."""
    return _one_pass_mask(OUTLIERS, delta, density, {"gamma": gamma})


def _one_pass_mask(s: Sparsifier, delta: Tensor, density: float, params: dict) -> Tensor:
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    state = s.start(delta.numel(), density, params, sample_of(delta))
    a = delta.abs()
    while True:
        state.absorb(state.measure(delta, None))
        state.finish()
        if not state.refine:
            break
    return state.mask(a)


def whole_topk(x: Tensor, k: int) -> TopK:
    """The exact top-``k`` selection of ``|x|`` for a tensor in memory, ready to ``mask`` its blocks in order."""
    t = TopK(x.numel(), k, sample_of(x).abs())
    a = x.abs()
    while t.needs_pass:
        t.observe(a)
        t.finish()
        if not t.refine:
            break
    return t


def sample_positions(n: int, size: int = SAMPLE) -> Tensor:
    """Fixed pseudo-random flat positions (seeded by ``n``) whose values bracket a top-k threshold."""
    g = torch.Generator(device="cpu").manual_seed(n)
    return torch.randint(n, (min(size, n),), generator=g)


def sample_of(x: Tensor) -> Tensor:
    """``x``'s values at ``sample_positions``."""
    flat = x.reshape(-1)
    return flat[sample_positions(flat.numel()).to(flat.device)]


def random_mask(delta: Tensor, density: float, generator: torch.Generator | None, sampler: str = "uniform") -> Tensor:
    """Bernoulli(density) keep-mask of one task vector drawn from ``generator`` as DARE draws it."""
    gen = generator if generator is not None else torch.default_generator
    kind = DARE.draws({"sampler": sampler})
    return BlockStreams(gen, delta.numel(), 1, kind).keep(0, tuple(delta.shape), density, delta.device)
