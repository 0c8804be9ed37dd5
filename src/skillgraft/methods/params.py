"""Typed parameters of merge methods, validated in one place.

A ``ParamSpec`` says what a parameter is (``float``, ``int``, ``choice``), its range, its default,
what it means, and whether it may vary over the decoder depth. A per-layer value is a list of
anchors with the semantics of mergekit's gradients (see ``skillgraft.schedule.value_at``); the engine
evaluates it per tensor, so a method only ever sees plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["float", "int", "choice"]


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: type, accepted range, default, meaning, and whether it varies per layer.

    ``low``/``high`` bound numbers (``open_low``/``open_high`` exclude the bound); ``choices`` lists
    the accepted values of a ``choice``; ``optional`` accepts ``None`` (the method then derives the
    value, e.g. TSV's ``fraction``); ``per_layer`` accepts a list of anchors over the decoder depth.
    """

    name: str
    kind: Kind
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False
    per_layer: bool = False

    def range_text(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(_show(c) for c in self.choices)
        if self.low is None and self.high is None:
            return f"any finite {self.kind}"
        lo = "-inf" if self.low is None else _show(self.low)
        hi = "inf" if self.high is None else _show(self.high)
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        return f"{self.kind} in {left}{lo}, {hi}{right}"

    def describe(self) -> str:
        """``float in [0, 1), default 0.01, per layer`` (for ``skillgraft methods`` and the docs)."""
        extra = ", per layer" if self.per_layer else ""
        none = " or none" if self.optional else ""
        return f"{self.range_text()}{none}, default {_show(self.default)}{extra}"

    def validate(self, value: Any, owner: str) -> Any:
        """The value, checked (and ints given as integral floats made ints); ValueError otherwise."""
        if isinstance(value, (list, tuple)):
            if not self.per_layer:
                raise ValueError(f"{owner}: parameter {self.name!r} cannot vary per layer (got a list)")
            if not value:
                raise ValueError(f"{owner}: parameter {self.name!r}: a per-layer schedule needs at least one value")
            return [self._scalar(v, owner) for v in value]
        return self._scalar(value, owner)

    def _scalar(self, value: Any, owner: str) -> Any:
        if value is None and self.optional:
            return None
        bad = f"{owner}: parameter {self.name!r} must be {self.range_text()}"
        if self.kind == "choice":
            # bools are ints in Python: match type as well as value, so 1 is not True
            for c in self.choices:
                if type(value) is type(c) and value == c:
                    return c
            raise ValueError(f"{bad}, not {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{bad}, not {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{bad}; got the non-finite {value!r}")
        if self.kind == "int":
            if value != int(value):
                raise ValueError(f"{bad}, not {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise ValueError(f"{bad}, not {value!r}")
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            raise ValueError(f"{bad}, not {value!r}")
        return value


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def resolve(specs: Iterable[ParamSpec], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Defaults overlaid with ``given``, every value validated; an unknown name is a ValueError."""
    known = {p.name: p for p in specs}
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(known) or "none"
        raise ValueError(f"method {owner!r} has no parameter {unknown[0]!r} (it takes: {names})")
    out = {name: p.default for name, p in known.items()}
    for name, value in given.items():
        out[name] = known[name].validate(value, f"method {owner!r}")
    return out


def at_layer(values: Mapping[str, Any], value_at: Any) -> dict[str, Any]:
    """Per-layer lists replaced by their value for one tensor (``value_at(list) -> float``)."""
    return {k: (value_at(v) if isinstance(v, list) else v) for k, v in values.items()}


def scalars(values: Sequence[Any]) -> bool:
    """True when no entry is a per-layer list."""
    return not any(isinstance(v, list) for v in values)


LAMBDA = ParamSpec(
    "lambda", "float", 1.0,
    "global scaling of the merged task vector, applied after any normalisation (the lambda of Task Arithmetic / "
    "TIES / DELLA, mergekit's 'lambda'); multiplies every entry's weight, the VLM's too in symmetric mode",
    per_layer=True,
)


@dataclass(frozen=True)
class Schedule:
    """Values over the decoder depth, as data (a method's per-layer rule, e.g. layer swap's).

    ``values``: anchors spread over the layers and interpolated (mergekit's gradients; exactly one
    value per layer when there are as many as layers). Tensors outside the layers take ``before``
    (the embedding), ``after`` (the final norm and the LM head) and ``other`` when given, else the
    first anchor (embedding, others) or the last (norm, head).
    """

    values: tuple[float, ...]
    before: float | None = None
    after: float | None = None
    other: float | None = None
