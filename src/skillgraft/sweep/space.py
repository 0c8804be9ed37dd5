"""The search space of a sweep: ``--vary NAME=SPEC`` dimensions and ``--method`` choices.

A dimension is a list (``density=0.1,0.3,0.5,1.0``), a stepped range with both ends included
(``scale=0:1.5:0.1`` is 16 points), or a continuous range (``scale=0:1.5``, random and Optuna
search only). Names:

- ``scale`` / ``density``: every expert's lambda / density; ``scale.LABEL`` / ``density.LABEL``
  one expert's (LABEL as in the recipe, default the expert directory's name);
- ``param.NAME``: a method parameter (``param.epsilon=0.05,0.1``), dropped for methods without it;
- ``seed``: the seed of the random methods.

A *point* is a flat dict ``{"method": "ta", "scale": 0.8, ...}``; :func:`normalise` puts it in its
canonical form (floats rounded, density dropped for methods that ignore it), so that two points
that merge the same way get the same key and are computed once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import SkillgraftError
from ..methods import METHODS

_DIGITS = 10
INT_DIMS = ("seed",)
MAX_GRID_POINTS = 10_000  # a grid, and any one stepped range, is refused beyond this many points


def _num(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise SkillgraftError(f"--vary {what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise SkillgraftError(f"--vary {what}: {text!r} is not a finite number")
    return v


def rnd(x: float) -> float:
    """A float in canonical form: 0.1 * 3 and 0.3 give the same key."""
    r = round(float(x), _DIGITS)
    return 0.0 if r == 0 else r


@dataclass(frozen=True)
class Dim:
    """One varied quantity: explicit ``values``, or a range ``low..high`` (with ``step`` or continuous)."""

    name: str
    values: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None

    @property
    def discrete(self) -> bool:
        return self.values is not None or self.step is not None

    def grid(self) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise SkillgraftError(
                f"--vary {self.name}={self.low:g}:{self.high:g} is a continuous range; grid search needs a step "
                f"({self.name}={self.low:g}:{self.high:g}:STEP) or a list, or use --search random/optuna"
            )
        n = self.size() - 1
        vals = [self.cast(self.low + i * self.step) for i in range(n + 1)]
        return vals

    def size(self) -> int | None:
        """Number of points (without building them); None for a continuous range."""
        if self.values is not None:
            return len(self.values)
        if self.step is None:
            return None
        return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1

    def cast(self, v: Any) -> Any:
        return int(round(v)) if self.name in INT_DIMS else rnd(v)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "values": list(self.values) if self.values is not None else None,
                "low": self.low, "high": self.high, "step": self.step}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Dim":
        vals = d.get("values")
        return cls(d["name"], tuple(vals) if vals is not None else None, d.get("low"), d.get("high"), d.get("step"))


def _check_name(name: str, labels: list[str]) -> None:
    head, _, tail = name.partition(".")
    if name in ("scale", "density", "seed"):
        return
    if head in ("scale", "density") and tail:
        if tail not in labels:
            raise SkillgraftError(f"--vary {name}: no expert labelled {tail!r} (experts: {', '.join(labels)})")
        return
    if head == "param" and tail:
        return
    raise SkillgraftError(
        f"--vary {name}: unknown quantity; use scale, density, seed, scale.LABEL, density.LABEL or param.NAME"
    )


def parse_vary(text: str, labels: list[str]) -> Dim:
    """``NAME=a,b,c`` | ``NAME=lo:hi:step`` | ``NAME=lo:hi`` -> a :class:`Dim`."""
    if "=" not in text:
        raise SkillgraftError(f"--vary expects NAME=VALUES (e.g. scale=0:1.5:0.1), got {text!r}")
    name, spec = (s.strip() for s in text.split("=", 1))
    _check_name(name, labels)
    if not spec:
        raise SkillgraftError(f"--vary {name}: no values given")
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SkillgraftError(f"--vary {name}={spec}: a range is LOW:HIGH or LOW:HIGH:STEP")
        lo, hi = _num(parts[0], name), _num(parts[1], name)
        if hi < lo:
            raise SkillgraftError(f"--vary {name}={spec}: HIGH is below LOW")
        step = _num(parts[2], name) if len(parts) == 3 else None
        if step is not None and step <= 0:
            raise SkillgraftError(f"--vary {name}={spec}: STEP must be positive")
        dim = Dim(name, None, lo, hi, step)
        if step is not None and (hi - lo) / step + 1 > MAX_GRID_POINTS:
            raise SkillgraftError(
                f"--vary {name}={spec}: {(hi - lo) / step + 1:.3g} points, more than {MAX_GRID_POINTS:,} points in one "
                f"range; use a coarser STEP, or a continuous range {name}={lo:g}:{hi:g} with --search random/optuna"
            )
    else:
        raw = [yaml.safe_load(v.strip()) for v in spec.split(",") if v.strip()]
        if name.startswith("param."):
            vals = tuple(rnd(v) if isinstance(v, float) else v for v in raw)
        else:
            vals = tuple(Dim(name).cast(_num(str(v), name)) for v in raw)
        dim = Dim(name, tuple(dict.fromkeys(vals)))
    if name.startswith("density"):
        lo = min(dim.values) if dim.values is not None else dim.low
        hi = max(dim.values) if dim.values is not None else dim.high
        if not (0 < lo and hi <= 1):
            raise SkillgraftError(f"--vary {name}: densities must lie in (0, 1]")
    return dim


@dataclass
class Space:
    """The methods to try and the varied dimensions; the fixed settings live in the sweep's base recipe."""

    methods: list[str]
    dims: list[Dim]

    def to_json(self) -> dict[str, Any]:
        return {"methods": self.methods, "dims": [d.to_json() for d in self.dims]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Space":
        return cls(list(d["methods"]), [Dim.from_json(x) for x in d["dims"]])

    def grid_size(self) -> int:
        """Points of the full grid, counted without building it (continuous ranges refused)."""
        n = len(self.methods)
        for d in self.dims:
            size = d.size()
            if size is None:
                d.grid()  # raises the continuous-range error
            n *= size
        return n

    def check_grid(self) -> None:
        """Refuse a grid of more than MAX_GRID_POINTS points before it is built."""
        n = self.grid_size()
        if n > MAX_GRID_POINTS:
            raise SkillgraftError(
                f"the grid has {n:,} points, more than the {MAX_GRID_POINTS:,} points a grid search may have; "
                f"use coarser steps or --search random/optuna with --trials N"
            )


def build_space(methods: list[str], varies: list[str], labels: list[str]) -> Space:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SkillgraftError(f"unknown method {bad[0]!r}; choose from {', '.join(sorted(METHODS))}")
    dims = [parse_vary(v, labels) for v in varies]
    names = [d.name for d in dims]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SkillgraftError(f"--vary {sorted(dup)[0]} given twice")
    return Space(list(dict.fromkeys(methods)), dims)


def canonical_point(point: dict[str, Any]) -> dict[str, Any]:
    """The canonical form of a point: floats rounded, settings the method ignores removed."""
    m = METHODS[point["method"]]
    known = {p.name for p in m.params}
    out: dict[str, Any] = {}
    for k, v in point.items():
        if k.startswith("density") and not m.uses_density:
            continue
        if k.startswith("param.") and k[len("param."):] not in known:
            continue
        if k == "seed" and not m.stochastic:
            continue
        out[k] = rnd(v) if isinstance(v, float) else v
    return out


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(canonical_point(point), sort_keys=True)


def describe(point: dict[str, Any]) -> str:
    """``ta scale=0.8 density=0.5`` for logs and tables."""
    rest = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(point.items()) if k != "method")
    return f"{point['method']} {rest}".strip()
