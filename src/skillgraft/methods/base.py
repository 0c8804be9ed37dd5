"""What a merge method is: a pure function on tensors plus its parameters, described as data.

Two kinds, both pure (no I/O, no global state, inputs never modified; randomness only from the
``generator`` passed in). The one exception is asked for by the caller: a method with ``writes_out``
takes ``out=`` and writes its result there, which may be the first delta (see ``Method.writes_out``).

- ``delta`` methods combine task vectors. ``fn(deltas, weights, densities, *, generator, **params)``
  gets float32 deltas ``tau_k = theta_k - theta_B`` of one tensor, their weights (lambda_k) and
  densities, and returns the combined delta ``M({(tau_k, p_k)})``. The engine adds it to ``theta_V``
  (inject mode: only expert deltas are passed) or to ``theta_B`` (symmetric mode: the VLM's delta
  is the first entry).
- ``interp`` methods need no base. ``fn(tensors, weights, *, generator, **params)`` gets the VLM's
  tensor first, then the experts', with their weights (the VLM's weight first), and returns the
  merged tensor.

Before reading any weight, the engine calls ``method.check(densities, params)`` once with the
densities of all entries it will pass (VLM first in symmetric mode): it raises ``ValueError`` for a
combination the method cannot run (too few task vectors, DELLA's epsilon out of range, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Tensor = torch.Tensor
DeltaFn = Callable[..., Tensor]
Validator = Callable[[Sequence[float], dict[str, Any]], None]

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: its default and what it means (named as in the method's paper).

    ``choices``, when given, lists the accepted values (checked by ``Method.resolve_params``).
    """

    name: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Method:
    """A registered merge method: data describing a pure tensor function.

    ``layer_rule``: ``None`` for methods that treat every tensor alike; ``"layerswap"`` when the
    engine must multiply the expert weights of each tensor by
    ``skillgraft.schedule.method_multiplier(method, params, lm_name, n_layers)`` (0 in the VLM layers
    that are kept whole, 1 elsewhere).
    ``min_deltas``: the fewest task vectors (delta) or tensors (interp) the method needs.
    """

    name: str
    kind: Literal["delta", "interp"]
    fn: DeltaFn
    summary: str
    paper: str
    stochastic: bool = False
    uses_density: bool = False
    # True when each output entry depends only on the same entry of the inputs (and the generator):
    # the engine may then merge a large tensor in row blocks, each with its own seeded generator.
    elementwise: bool = False
    params: tuple[Param, ...] = field(default_factory=tuple)
    layer_rule: str | None = None
    min_deltas: int = 1
    max_deltas: int | None = None
    validator: Validator | None = None
    # When set, narrows ``elementwise`` by the resolved parameters (e.g. DARE with a norm-matching
    # rescale needs the whole tensor). Use ``is_elementwise(params)``, not the field, to decide.
    elementwise_when: Callable[[dict[str, Any]], bool] | None = None
    # True when ``fn`` takes ``out=``: a float32 tensor of the result's shape (it may be ``deltas[0]``,
    # which is read chunk by chunk before being overwritten) that receives the result, saving the
    # engine one tensor-sized buffer. Without ``out`` the function is pure like every other.
    writes_out: bool = False

    def is_elementwise(self, params: dict[str, Any] | None = None) -> bool:
        """True when each output entry depends only on the same entry (row-wise methods: the same row)
        of the inputs and the generator, with these parameters: the engine may then merge a tensor in
        blocks of whole rows, each block with its own seeded generator."""
        if not self.elementwise:
            return False
        if self.elementwise_when is None:
            return True
        return bool(self.elementwise_when(self.resolve_params(dict(params or {}))))

    @property
    def needs_base(self) -> bool:
        return self.kind == "delta"

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the given values; unknown names or bad choices are a ValueError."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ValueError(f"method {self.name!r} has no parameter {unknown[0]!r} (it takes: {names})")
        out = {p.name: p.default for p in self.params}
        for name, value in given.items():
            p = known[name]
            if p.choices is not None and value not in p.choices:
                opts = ", ".join(repr(c) for c in p.choices)
                raise ValueError(f"method {self.name!r}: parameter {name!r} must be one of {opts}, not {value!r}")
            out[name] = value
        return out

    def check(self, densities: Sequence[float], params: dict[str, Any] | None = None) -> None:
        """Raise ValueError if the method cannot run on ``len(densities)`` entries with these settings.

        Cheap; meant to be called once per recipe, before any weight is read.
        """
        resolved = self.resolve_params(dict(params or {}))
        n = len(densities)
        what = "task vectors" if self.kind == "delta" else "models"
        if n < self.min_deltas:
            hint = " (use mode: symmetric to count the VLM's own delta, or add experts)" if self.kind == "delta" else ""
            raise ValueError(f"method {self.name!r} needs at least {self.min_deltas} {what}, got {n}{hint}")
        if self.max_deltas is not None and n > self.max_deltas:
            raise ValueError(f"method {self.name!r} takes at most {self.max_deltas} {what}, got {n}")
        for d in densities:
            if not 0.0 < float(d) <= 1.0:
                raise ValueError(f"method {self.name!r}: density must be in (0, 1], got {d}")
        if self.validator is not None:
            self.validator(densities, resolved)


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


LAMBDA = Param(
    "lambda",
    1.0,
    "global scaling of the merged task vector, applied after any normalisation (the lambda of Task "
    "Arithmetic / TIES / DELLA, mergekit's 'lambda'); multiplies every entry's weight, the VLM's too in "
    "symmetric mode",
)


def rescale_is_local(params: dict[str, Any]) -> bool:
    """A ``rescale`` that needs no whole-tensor statistic (not a norm match): row blocks are safe."""
    return params.get("rescale", True) in (True, False, None)


def pop_lambda(params: dict[str, Any]) -> float:
    """Remove and return the global ``lambda`` (a Python keyword, so passed through ``**params``)."""
    return float(params.pop("lambda", 1.0))


def check_no_params(name: str, params: dict[str, Any]) -> None:
    if params:
        raise TypeError(f"{name}() got unexpected parameter(s): {', '.join(sorted(params))}")
