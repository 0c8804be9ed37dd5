"""Sign rules, combiners and masks: how the (thinned) task vectors of one tensor become one.

- sign rule ``TIES`` (Yadav et al. 2023): elect a sign per entry, from the sum of ``w_k tau_k``
  (``sign_from: weighted``, mergekit's ``consensus_method: sum``), of ``tau_k`` (``unweighted``: PEFT's
  ``total``, the paper's equation) or from the majority of signs (``count``: PEFT's ``frequency``).
  An entry agrees when its sign (of ``w_k tau_k``; of ``tau_k`` when unweighted) equals the elected
  one; zeros never agree; a zero sum elects ``+``.
- combiners: ``SUM`` (``sum_k w_k tau_k``, Task Arithmetic), ``DISJOINT`` (the agreeing entries summed
  and, with ``normalize``, divided by their summed weights (mergekit) or count (PEFT)),
  ``MODEL_STOCK`` (Jang et al. 2024), the interpolations ``LINEAR`` and ``SLERP``, and the subspace
  combiners of ``subspace.py``.
- mask ``TALL`` (consensus merging, Wang et al. 2024): keep the entries that at least ``k`` tasks'
  TALL masks select.

A combiner's per-tensor state has ``passes`` statistics passes (``measure(p, xs, at)`` per block,
thread-safe; ``absorb(p, part)`` in block order; ``finish(p)``) before ``apply(xs, at)`` merges a
block; ``at`` is the block's row range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .kernels import add_mask_, compare
from .params import ParamSpec
from .reduce import Total

Tensor = torch.Tensor

SIGN_CHOICES = ("weighted", "unweighted", "count")
NORMALIZE_CHOICES = (False, True, "none", "weights", "count")

SIGN_FROM = ParamSpec(
    "sign_from", "choice", "weighted",
    "sign election on the sum of w*tau ('weighted', mergekit), of tau ('unweighted', PEFT 'total', the paper), or "
    "on the count of signs ('count', PEFT 'frequency')",
    choices=SIGN_CHOICES,
)
NORMALIZE = ParamSpec(
    "normalize", "choice", False,
    "divide the agreeing sum by nothing (false/'none'), by the summed weights of the agreeing entries (true/'weights': "
    "mergekit, the paper's disjoint mean) or by their count ('count': PEFT); off by default so that one expert at "
    "scale lambda adds lambda*trim(tau), as in inject mode",
    choices=NORMALIZE_CHOICES,
)


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float], out: Tensor | None = None) -> Tensor:
    """sum_k w_k * tau_k, accumulated in the dtype of the deltas: a new tensor (inputs untouched),
    or ``out``, which may be ``deltas[0]`` (then a weight of 1 costs no pass over it)."""
    terms = [(d, float(w)) for d, w in zip(deltas, weights) if float(w) != 0.0]
    if not terms:
        return torch.zeros_like(deltas[0]) if out is None else out.zero_()
    (d0, w0), rest = terms[0], terms[1:]
    if out is None:
        out = torch.mul(d0, w0)
    elif d0 is not out:
        torch.mul(d0, w0, out=out)
    elif w0 != 1.0:
        out.mul_(w0)
    for d, w in rest:
        out.add_(d, alpha=w)
    return out


def scaled(x: Tensor, lam: float) -> Tensor:
    """``lam * x`` in place on a tensor the method owns (no-op for lam == 1)."""
    lam = float(lam)
    return x if lam == 1.0 else x.mul_(lam)


# ----------------------------------------------------------------------------------- TIES


def _signs(weights: Sequence[float], sign_from: str) -> list[float]:
    """The sign each entry's vote and agreement carry: +1 when unweighted, else the weight's sign."""
    if sign_from == "unweighted":
        return [1.0] * len(weights)
    return [1.0 if w > 0 else (-1.0 if w < 0 else 0.0) for w in weights]


def elect(deltas: Sequence[Tensor], weights: Sequence[float], sign_from: str = "weighted") -> Tensor | None:
    """The elected sign per entry (+1 where the vote is >= 0), or None when no entry votes."""
    if sign_from not in SIGN_CHOICES:
        raise ValueError(f"sign_from must be one of {SIGN_CHOICES}, not {sign_from!r}")
    mass = None
    for d, w, s in zip(deltas, [float(w) for w in weights], _signs(weights, sign_from)):
        if sign_from == "count":
            term, coef = torch.sign(d), s
        else:
            term, coef = d, (w if sign_from == "weighted" else 1.0)
        if coef == 0.0:
            continue  # a zero-weight entry has sign 0 in weighted/count mode: it never votes
        mass = torch.mul(term, coef) if mass is None else mass.add_(term, alpha=coef)
    if mass is None:
        return None
    # +1 where the mass is >= 0. An exact cancellation sums to +0.0 and elects +; a -0.0 mass only
    # arises where every entry is zero, so nothing agrees there either way.
    return torch.ones_like(mass).copysign_(mass)


def _normalize_mode(normalize: bool | str) -> str:
    if normalize is False or normalize is None or normalize == "none":
        return "none"
    if normalize is True or normalize == "weights":
        return "weights"
    if normalize == "count":
        return "count"
    raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, not {normalize!r}")


def disjoint(deltas: Sequence[Tensor], weights: Sequence[float], elected: Tensor | None,
             sign_from: str = "weighted", normalize: bool | str = False, overwrite: bool = False) -> Tensor:
    """TIES disjoint merge: the agreeing ``w_k tau_k`` summed, divided as ``normalize`` says.

    One task vector at a time (no stacking): three temporaries of the block's size whatever the
    number of task vectors; none with ``overwrite`` (the deltas are then overwritten).
    """
    mode = _normalize_mode(normalize)
    if elected is None:
        return torch.zeros_like(deltas[0])
    ws = [float(w) for w in weights]
    merged = None
    divisor = None
    for d, w, s in zip(deltas, ws, _signs(ws, sign_from)):
        if s == 0.0:
            continue  # a zero-weight entry has sign 0 in weighted/count mode: it never agrees
        # u = |d| where (s * d) agrees with the elected sign, else 0; then w * d = (w * s) * u * elected
        u = d.mul_(elected) if overwrite else torch.mul(d, elected)
        if s < 0:
            u.neg_()
        u.relu_()
        if mode != "none":
            if divisor is None:
                divisor = torch.zeros_like(u)
            add_mask_(divisor, compare(u, ">", 0.0), w if mode == "weights" else 1.0)
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


def elect_and_merge(deltas: Sequence[Tensor], weights: Sequence[float], sign_from: str = "weighted",
                    normalize: bool | str = False, overwrite: bool = False) -> Tensor:
    """TIES elect + disjoint merge of already-thinned deltas (see the module docstring for the modes);
    ``overwrite``: the deltas may be overwritten."""
    return disjoint(deltas, weights, elect(deltas, weights, sign_from), sign_from, normalize, overwrite)


@dataclass(frozen=True)
class SignRule:
    """How a sign is elected per entry before a disjoint merge (only ``TIES`` so far)."""

    name: str
    params: tuple[ParamSpec, ...]


TIES = SignRule("ties", (SIGN_FROM,))


# ----------------------------------------------------------------------------------- combiners


class _State:
    """A combiner's state for one tensor: no statistics; ``apply`` merges a block."""

    passes = 0

    def measure(self, p: int, xs: list[Tensor], at: slice) -> Any:
        return None

    def absorb(self, p: int, part: Any) -> None:
        pass

    def finish(self, p: int) -> None:
        pass

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Combiner:
    """How the thinned task vectors (``delta``) or the models (``interp``) of a tensor become one.

    ``whole_matrix(shape)``: the combiner needs every row of a tensor of that shape at once (an SVD);
    the engine then holds one matrix in float32 and says so in the plan.
    """

    name: str
    kind: str  # "delta" | "interp"
    params: tuple[ParamSpec, ...]
    start: Callable[..., _State]  # (shape, weights, params) -> state
    needs_sign: bool = False
    whole_matrix: Callable[[tuple[int, ...]], bool] = lambda shape: False
    scalable: bool = True  # takes the global ``lambda``
    stats: str = ""  # the whole-tensor statistic it gathers before merging, if any (for the plan and docs)


class _Sum(_State):
    def __init__(self, shape, weights, params):
        self.weights = weights

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        return weighted_sum(xs, self.weights, out=xs[0])


class _Disjoint(_State):
    def __init__(self, shape, weights, params):
        self.weights, self.sign_from, self.normalize = weights, params["sign_from"], params["normalize"]

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        return elect_and_merge(xs, self.weights, self.sign_from, self.normalize, overwrite=True)


SUM = Combiner("sum", "delta", (), _Sum)
DISJOINT = Combiner("disjoint", "delta", (NORMALIZE,), _Disjoint, needs_sign=True)


# ----------------------------------------------------------------------------------- model stock


FILTER_WISE = ParamSpec("filter_wise", "choice", False, "one ratio per output row instead of per tensor",
                        choices=(True, False))


def stock_ratio(norms: list[Tensor], dots: dict[tuple[int, int], Tensor], n: int) -> Tensor:
    """Model Stock's ``t = N cos / (1 + (N - 1) cos)``, ``cos`` averaged over all pairs (0 where singular)."""
    cos = []
    for (i, j), dot in dots.items():
        prod = norms[i] * norms[j]
        cos.append((dot / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(denom), denom))


class _ModelStock(_State):
    """``t * mean_k(w_k tau_k)``; ``t`` from the angle of the whole tensors (a statistics pass), or of each
    row when ``filter_wise`` (rows are blocks of whole rows: no pass)."""

    def __init__(self, shape, weights, params):
        self.weights = weights
        self.filter_wise = bool(params["filter_wise"])
        self.row_wise = self.filter_wise and len(shape) >= 2
        self.passes = 0 if self.row_wise else 1
        self.norms: list[Total] = []
        self.dots: dict[tuple[int, int], Total] = {}
        self.t: Tensor | None = None

    def _flat(self, x: Tensor) -> Tensor:
        if self.row_wise:
            return x.reshape(x.shape[0], -1)
        return x.reshape(1, -1) if self.filter_wise else x.reshape(-1)

    @staticmethod
    def _parts(flat: list[Tensor]) -> tuple[list[Tensor], dict[tuple[int, int], Tensor]]:
        n = len(flat)
        norms = [torch.linalg.vector_norm(f, dim=-1) for f in flat]
        dots = {(i, j): (flat[i] * flat[j]).sum(dim=-1) for i in range(n) for j in range(i + 1, n)}
        return norms, dots

    def measure(self, p: int, xs: list[Tensor], at: slice) -> Any:
        return self._parts([self._flat(x) for x in xs])

    def absorb(self, p: int, part: Any) -> None:
        norms, dots = part
        if not self.norms:
            self.norms = [Total("l2") for _ in norms]
            self.dots = {k: Total("sum") for k in dots}
        for tot, v in zip(self.norms, norms):
            tot.add(v)
        for k, v in dots.items():
            self.dots[k].add(v)

    def finish(self, p: int) -> None:
        self.t = stock_ratio([t.value() for t in self.norms], {k: t.value() for k, t in self.dots.items()},
                             len(self.norms))

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        flat = [self._flat(x) for x in xs]
        t = self.t if not self.row_wise else stock_ratio(*self._parts(flat), len(flat))
        avg = torch.zeros_like(flat[0])
        for f, w in zip(flat, self.weights):
            if float(w) != 0.0:
                avg.add_(f, alpha=float(w))
        avg.div_(len(flat))
        return (t * avg).reshape(xs[0].shape)


MODEL_STOCK = Combiner("model_stock", "delta", (FILTER_WISE,), _ModelStock, scalable=False,
                       stats="the task vectors' norms and pairwise dot products (per tensor unless filter_wise)")


# ----------------------------------------------------------------------------------- interpolation


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Linear(_State):
    """Weighted average ``sum_i w_i theta_i / sum_i w_i`` (``normalize: false``: the weighted sum)."""

    def __init__(self, shape, weights, params):
        self.weights = weights
        self.total = sum(float(w) for w in weights) if params["normalize"] else 1.0
        if self.total == 0.0:
            raise ValueError("linear: the weights sum to 0, cannot normalize (set normalize: false)")

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        dtype = _work_dtype(xs[0])
        out = torch.zeros(xs[0].shape, dtype=dtype, device=xs[0].device)
        for x, w in zip(xs, self.weights):
            out.add_(x.to(dtype), alpha=float(w))
        if self.total != 1.0:
            out.div_(self.total)
        return out.to(xs[0].dtype)


LINEAR = Combiner(
    "linear", "interp",
    (ParamSpec("normalize", "choice", True, "divide by the sum of the weights (mergekit's default)", choices=(True, False)),),
    _Linear, scalable=False,
)


def slerp_t(weights: Sequence[float], t: float | None) -> float:
    """SLERP's factor: ``t`` if given, else the expert's share ``w_E / (w_V + w_E)`` of the weights."""
    if t is not None:
        return float(t)
    wv, we = float(weights[0]), float(weights[1])
    if wv + we == 0.0:
        raise ValueError("slerp: the weights sum to 0; give t explicitly")
    return we / (wv + we)


class _Slerp(_State):
    """Spherical interpolation with one angle per tensor: norms (pass 0), the normalised dot product
    (pass 1), then ``ca * theta_V + cb * theta_E`` block by block."""

    def __init__(self, shape, weights, params):
        if len(weights) != 2:
            raise ValueError(f"slerp interpolates exactly two models (the VLM and one expert), got {len(weights)}")
        self.t = slerp_t(weights, params["t"])
        self.dot_threshold, self.eps = float(params["dot_threshold"]), float(params["eps"])
        self.passes = 0 if self.t in (0.0, 1.0) else 2
        self.tot = [Total("l2"), Total("l2"), Total("sum")]
        self.na = self.nb = self.ca = self.cb = None

    @staticmethod
    def _rows(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
        dtype = _work_dtype(xs[0])
        return xs[0].reshape(1, -1).to(dtype), xs[1].reshape(1, -1).to(dtype)

    def measure(self, p: int, xs: list[Tensor], at: slice) -> Any:
        a, b = self._rows(xs)
        if p == 0:
            return torch.linalg.vector_norm(a, dim=1, keepdim=True), torch.linalg.vector_norm(b, dim=1, keepdim=True)
        return (((a / self.na) * (b / self.nb)).sum(dim=1, keepdim=True),)

    def absorb(self, p: int, part: Any) -> None:
        for tot, v in zip(self.tot[:2] if p == 0 else self.tot[2:], part):
            tot.add(v)

    def finish(self, p: int) -> None:
        if p == 0:
            na, nb = self.tot[0].value(), self.tot[1].value()
            self.na = torch.where(na > self.eps, na, torch.ones_like(na))
            self.nb = torch.where(nb > self.eps, nb, torch.ones_like(nb))
            return
        dot = self.tot[2].value().clamp(-1, 1)
        t = self.t
        lin = dot.abs() > self.dot_threshold
        theta = torch.acos(torch.where(lin, torch.zeros_like(dot), dot))
        sin_theta = torch.sin(theta)
        safe = torch.where(lin, torch.ones_like(sin_theta), sin_theta)
        self.ca = torch.where(lin, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / safe)
        self.cb = torch.where(lin, torch.full_like(dot, t), torch.sin(t * theta) / safe)

    def apply(self, xs: list[Tensor], at: slice) -> Tensor:
        if self.passes == 0:
            return xs[0] if self.t == 0.0 else xs[1]
        a, b = self._rows(xs)
        out = self.ca.to(a.device) * a + self.cb.to(a.device) * b
        return out.reshape(xs[0].shape).to(xs[0].dtype)


SLERP = Combiner(
    "slerp", "interp",
    (
        ParamSpec("t", "float", None, "interpolation factor from the VLM (0) to the expert (1); default w_E/(w_V+w_E)",
                  low=0.0, high=1.0, optional=True, per_layer=True),
        ParamSpec("dot_threshold", "float", 0.9995, "above this |cos(theta)| the tensors are treated as collinear "
                  "(linear interpolation)", low=0.0, high=1.0, per_layer=True),
        ParamSpec("eps", "float", 1e-8, "norms below this are treated as 1", low=0.0, per_layer=True),
    ),
    _Slerp, scalable=False, stats="the two tensors' norms, then their normalised dot product (two passes)",
)


# ----------------------------------------------------------------------------------- TALL mask


class Tall:
    """Consensus (Wang et al. 2024): ``m_t = |w_t tau_t| >= tall_lambda * |tau_MTL - w_t tau_t|``, kept
    where at least ``k`` of the masks agree; ``tau_MTL`` is the Task Arithmetic sum."""

    params = (
        ParamSpec("k", "int", 2, "minimum number of task TALL masks that must select an entry (paper: 2)", low=1),
        ParamSpec("tall_lambda", "float", 0.4, "TALL mask threshold lambda_t: keep |tau_t| >= lambda_t*|tau_MTL - "
                  "tau_t| (the paper tunes it in [0.2, 0.6] per task; 0.4 is the middle)", low=0.0, per_layer=True),
    )

    @staticmethod
    def mask(deltas: Sequence[Tensor], weights: Sequence[float], params: dict[str, Any]) -> Tensor:
        k = int(params["k"])
        if k > len(deltas):
            raise ValueError(f"consensus: k={k} needs at least {k} task vectors, got {len(deltas)}")
        total = weighted_sum(deltas, weights)
        votes = torch.zeros(total.shape, dtype=torch.int16, device=total.device)
        for d, w in zip(deltas, weights):
            w = float(w)
            if w == 0.0:
                continue
            wd = d * w
            votes += wd.abs() >= (total - wd).abs_().mul_(float(params["tall_lambda"]))
        return votes >= k


TALL = Tall()
