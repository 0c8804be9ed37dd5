"""What a merge method is: a composition of parts, with typed parameters, run block by block.

A ``Method`` is data: a sparsifier (how each task vector is thinned), an optional sign rule, a
combiner (how the task vectors, or the models, become one) and an optional mask, with the typed
parameters of its parts. Two kinds:

- ``delta`` methods combine task vectors ``tau_k = theta_k - theta_B`` of one tensor with weights
  ``w_k`` (lambda_k) and densities ``p_k`` into ``M({(tau_k, w_k, p_k)})``; the engine adds it to
  ``theta_V`` (inject mode: only the experts' vectors) or to ``theta_B`` (symmetric mode: the VLM's
  vector first).
- ``interp`` methods need no base: the models' own tensors, the VLM's first, weights ``(w_V, w_E...)``.

One call signature for both: ``method.fn(xs, weights, densities, *, generator=None, **params)``
merges whole tensors (``densities`` are ignored by interpolations). The engine instead asks for a
``TensorMerge`` (``method.kernel``) and drives it over row blocks of bounded size:

1. ``needs_sample``: a sample of the operands to bracket top-k thresholds (``take_sample``);
2. statistics passes ``p = 0, 1, ...`` while ``pending(p)``: ``observe(p, xs, streams, at)`` for
   every block in order (or ``measure`` blocks side by side and ``absorb`` them in order), then
   ``finish(p)``;
3. the apply pass: ``apply(xs, streams, at)`` per block, in order.

``xs`` are float32 blocks the merge may overwrite, ``at`` the block's row range, ``streams`` the
random streams of the block's random block (see ``streams.BlockStreams``). Methods are pure: no
I/O, no global state, randomness only from the streams or the generator passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .combine import SUM, Combiner, SignRule, Tall, scaled
from .params import LAMBDA, ParamSpec, Schedule, resolve, scalars
from .sparsify import NONE, Sparsifier, sample_of
from .streams import BlockStreams
from .topk import EXACT_BELOW

Tensor = torch.Tensor


@dataclass(frozen=True)
class Parts:
    """The parts a method runs with (a method's ``switch`` may pick them by a parameter)."""

    sparsifier: Sparsifier
    sign: SignRule | None
    combiner: Combiner


@dataclass(frozen=True)
class Switch:
    """A choice parameter that selects the parts (consensus merging's ``base``: TA or TIES)."""

    spec: ParamSpec
    options: dict[Any, Parts]


@dataclass(frozen=True)
class Method:
    """A registered merge method: a composition of parts, described as data.

    ``min_inputs``/``max_inputs``: how many task vectors (delta) or models (interp) it takes.
    ``layer_weights(params, n_layers)``: a per-layer multiplier of the experts' weights as a
    ``Schedule`` (layer swap keeps the VLM's first and last layers), or None.
    """

    name: str
    summary: str
    paper: str
    combiner: Combiner = SUM
    sparsifier: Sparsifier = NONE
    sign: SignRule | None = None
    mask: Tall | None = None
    switch: Switch | None = None
    extra: tuple[ParamSpec, ...] = ()
    min_inputs: int = 1
    max_inputs: int | None = None
    layer_weights: Callable[[dict[str, Any], int], Schedule | None] | None = None
    checks: tuple[Callable[[Sequence[float], Sequence[float], dict[str, Any]], None], ...] = field(default=())

    def __post_init__(self) -> None:
        for parts in self._all_parts():
            if parts.combiner.needs_sign != (parts.sign is not None):
                raise ValueError(f"method {self.name!r}: combiner {parts.combiner.name!r} and sign rule disagree")

    def _all_parts(self) -> list[Parts]:
        if self.switch is not None:
            return list(self.switch.options.values())
        return [Parts(self.sparsifier, self.sign, self.combiner)]

    def parts(self, params: dict[str, Any]) -> Parts:
        """The parts this method runs with under ``params``."""
        if self.switch is None:
            return self._all_parts()[0]
        return self.switch.options[params[self.switch.spec.name]]

    # ------------------------------------------------------------------ description

    @property
    def kind(self) -> str:
        return self._all_parts()[0].combiner.kind

    @property
    def needs_base(self) -> bool:
        return self.kind == "delta"

    @property
    def stochastic(self) -> bool:
        return any(p.sparsifier.random for p in self._all_parts())

    @property
    def uses_density(self) -> bool:
        return any(p.sparsifier is not NONE for p in self._all_parts())

    @property
    def params(self) -> tuple[ParamSpec, ...]:
        """Every parameter, once, in the order: the method's own, the mask's, the switch, the parts', lambda."""
        specs: list[ParamSpec] = list(self.extra) + list(self.mask.params if self.mask is not None else ())
        if self.switch is not None:
            specs.append(self.switch.spec)
        for parts in self._all_parts():
            specs += parts.sparsifier.params + (parts.sign.params if parts.sign else ()) + parts.combiner.params
        if any(p.combiner.scalable for p in self._all_parts()):
            specs.append(LAMBDA)
        out: dict[str, ParamSpec] = {}
        for s in specs:
            out.setdefault(s.name, s)
        return tuple(out.values())

    def composition(self) -> str:
        """``dare x ties x disjoint`` (for ``skillgraft methods`` and the docs)."""
        def one(p: Parts) -> str:
            return " x ".join([p.sparsifier.name] + ([p.sign.name] if p.sign else []) + [p.combiner.name])

        text = " or ".join(f"{k}: {one(p)}" for k, p in self.switch.options.items()) if self.switch else one(
            self._all_parts()[0])
        return text + (" + TALL mask" if self.mask is not None else "")

    def statistics(self, params: dict[str, Any] | None = None) -> list[str]:
        """The whole-tensor statistics it gathers in passes before merging (under ``params``; any when None)."""
        parts = self._all_parts() if params is None else [self.parts(params)]
        notes = [n for p in parts for n in (p.sparsifier.statistic(params), p.combiner.stats) if n]
        return list(dict.fromkeys(notes))

    def whole_matrix(self, shape: tuple[int, ...], params: dict[str, Any] | None = None) -> bool:
        """True when a tensor of ``shape`` must be held whole (an SVD of the matrix)."""
        parts = self._all_parts() if params is None else [self.parts(params)]
        return any(p.combiner.whole_matrix(tuple(shape)) for p in parts)

    # ------------------------------------------------------------------ validation

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the given values, each validated by its spec; ValueError otherwise."""
        return resolve(self.params, given, self.name)

    def check(self, densities: Sequence[Any], params: dict[str, Any] | None = None) -> None:
        """Raise ValueError if the method cannot run on ``len(densities)`` inputs with these settings.

        Cheap; meant to be called once per recipe, before any weight is read. Per-layer values are
        checked again per tensor by ``check_tensor``.
        """
        resolved = self.resolve_params(dict(params or {}))
        n = len(densities)
        what = "task vectors" if self.kind == "delta" else "models"
        if n < self.min_inputs:
            hint = " (use mode: symmetric to count the VLM's own delta, or add experts)" if self.kind == "delta" else ""
            raise ValueError(f"method {self.name!r} needs at least {self.min_inputs} {what}, got {n}{hint}")
        if self.max_inputs is not None and n > self.max_inputs:
            raise ValueError(f"method {self.name!r} takes at most {self.max_inputs} {what}, got {n}")
        flat = [x for d in densities for x in (d if isinstance(d, (list, tuple)) else [d])]
        for d in flat:
            if not 0.0 < float(d) <= 1.0:
                raise ValueError(f"method {self.name!r}: density must be in (0, 1], got {d}")
        if self.mask is not None and int(resolved["k"]) > n:
            raise ValueError(
                f"consensus: k={resolved['k']} needs at least {resolved['k']} task vectors, got {n} "
                "(use mode: symmetric to count the VLM's delta, add experts, or lower k)"
            )
        if scalars(list(resolved.values())):
            self.check_tensor([1.0] * n, [float(d) if not isinstance(d, list) else d[0] for d in densities], resolved)

    def check_tensor(self, weights: Sequence[float], densities: Sequence[float], params: dict[str, Any]) -> None:
        """Checks that need the values one tensor gets (after per-layer schedules): ValueError."""
        for c in self.checks:
            c(weights, densities, params)

    # ------------------------------------------------------------------ running

    def kernel(self, shape: Sequence[int], weights: Sequence[float], densities: Sequence[float],
               params: dict[str, Any], band_cap: int | None = None) -> "TensorMerge":
        """The merge of one tensor of ``shape`` (its merged rows), to drive block by block."""
        return TensorMerge(self, tuple(shape), weights, densities, params, band_cap)

    def fn(self, xs: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float] | None = None, *,
           generator: torch.Generator | None = None, **params: Any) -> Tensor:
        """Merge whole tensors: the one call signature of every method (inputs are not modified).

        ``xs``: task vectors (delta) or models, the VLM's first (interp); ``densities`` default to 1.
        Random methods draw from ``generator`` (the global one if None) in order, one keep-mask per
        task vector, as the engine does per random block.
        """
        p = self.resolve_params(params)
        densities = list(densities) if densities is not None else [1.0] * len(xs)
        self.check(densities if self.kind == "delta" else [1.0] * len(xs), p)
        self.check_tensor(weights, densities, p)
        shape = tuple(xs[0].shape)
        work = [x.reshape(1) if x.dim() == 0 else x for x in xs]
        tm = self.kernel(work[0].shape, weights, densities, p)
        if tm.needs_sample:
            tm.take_sample([sample_of(x) for x in work])
        gen = generator if generator is not None else torch.default_generator
        start = gen.get_state() if tm.random else None
        at = slice(0, work[0].shape[0])

        def streams() -> BlockStreams | None:
            if not tm.random:
                return None
            gen.set_state(start)
            return tm.streams(gen, work[0].numel())

        p_no = 0
        while tm.pending(p_no):
            tm.observe(p_no, [x.clone() for x in work], streams(), at)
            tm.finish(p_no)
            p_no += 1
        return tm.apply([x.clone() for x in work], streams(), at, 0).reshape(shape)

    __call__ = fn


class TensorMerge:
    """The merge of one tensor, driven block by block (see the module docstring)."""

    def __init__(self, method: Method, shape: tuple[int, ...], weights: Sequence[float], densities: Sequence[float],
                 params: dict[str, Any], band_cap: int | None = None):
        parts = method.parts(params)
        self.method, self.parts, self.params = method, parts, params
        self.shape = shape
        self.n = math.prod(shape)
        self.weights = [float(w) for w in weights]
        self.densities = [float(d) for d in densities]
        self.band_cap = band_cap
        sp = parts.sparsifier
        thinned = [d < 1.0 for d in self.densities] if sp is not NONE else [False] * len(self.densities)
        self.drawers = [j for j, t in enumerate(thinned) if t] if sp.random else []
        self.random = bool(self.drawers)
        self.draw_kind = sp.draws(params)
        self.row_local = sp.row_local(params)
        # blocks of whole rows may be cut smaller, except a 1-D tensor whose "row" is the whole of it
        self.splits_rows = not (sp.ranks_rows and len(shape) == 1 and any(thinned))
        self.whole_matrix = parts.combiner.whole_matrix(shape)
        self.needs_sample = sp.needs_sample and any(thinned) and self.n > EXACT_BELOW
        self.combine = parts.combiner.start(shape, self.weights, params)
        self.lam = float(params.get("lambda", 1.0)) if parts.combiner.scalable else 1.0
        self.mask = method.mask
        self.vectors: list[Any] = []
        self.active: list[bool] = []
        if not self.needs_sample:
            self.take_sample(None)

    @property
    def planned_passes(self) -> int:
        """Statistics passes known before any data is seen (a top-k may ask for two more)."""
        return max([self.combine.passes] + [v.passes for v in self.vectors] +
                   [1 if self.needs_sample else 0])

    @property
    def order_free(self) -> bool:
        """True when apply-pass blocks may be merged in any order (no top-k ties carried from block to block)."""
        return all(getattr(v, "order_free", True) for v in self.vectors)

    def take_sample(self, samples: list[Tensor] | None) -> None:
        """Start every task vector's state, with a sample of its values when a threshold needs one."""
        sp = self.parts.sparsifier
        self.vectors = [sp.start(self.n, d, self.params, None if samples is None else samples[j])
                        for j, d in enumerate(self.densities)]
        self.active = [v.passes > 0 for v in self.vectors]

    def streams(self, gen: torch.Generator, n: int) -> BlockStreams:
        """The random streams of a random block of ``n`` entries whose generator is ``gen``."""
        return BlockStreams(gen, n, len(self.drawers), self.draw_kind)

    def _keep(self, j: int, streams: BlockStreams | None, device: torch.device) -> Callable[..., Tensor] | None:
        if j not in self.drawers:
            return None
        rank = self.drawers.index(j)
        return lambda shape, p: streams.keep(rank, shape, p, device)

    def pending(self, p: int) -> bool:
        """True while statistics pass ``p`` is needed."""
        return p < self.combine.passes or any(self.active)

    def measure(self, p: int, xs: list[Tensor], streams: BlockStreams | None, at: slice) -> Any:
        """What one block adds to the statistics of pass ``p``; changes no state (blocks may be measured
        side by side, each with its own random block's streams)."""
        comb = self.combine.measure(p, xs, at) if p < self.combine.passes else None
        return comb, [v.measure(x, self._keep(j, streams, x.device)) if self.active[j] else None
                      for j, (v, x) in enumerate(zip(self.vectors, xs))]

    def absorb(self, p: int, part: Any) -> None:
        """Add a block's ``measure`` to the statistics; blocks in order."""
        comb, vecs = part
        if p < self.combine.passes:
            self.combine.absorb(p, comb)
        for j, v in enumerate(self.vectors):
            if self.active[j]:
                v.absorb(vecs[j])

    def observe(self, p: int, xs: list[Tensor], streams: BlockStreams | None, at: slice) -> None:
        self.absorb(p, self.measure(p, xs, streams, at))

    def finish(self, p: int) -> None:
        if p < self.combine.passes:
            self.combine.finish(p)
        for j, v in enumerate(self.vectors):
            if self.active[j]:
                v.finish()
                self.active[j] = v.refine

    def apply(self, xs: list[Tensor], streams: BlockStreams | None, at: slice, block: int | None = None) -> Tensor:
        """The merged block: ``M`` of the block's task vectors (delta) or models (interp); ``xs`` may be
        overwritten. ``block``: the block's number in the statistics passes (None: blocks in order)."""
        mask = self.mask.mask(xs, self.weights, self.params) if self.mask is not None else None
        kept = [v.apply(x, self._keep(j, streams, x.device), block) for j, (v, x) in enumerate(zip(self.vectors, xs))]
        out = self.combine.apply(kept, at)
        if mask is not None:
            out = out.mul_(mask)
        return scaled(out, self.lam)
