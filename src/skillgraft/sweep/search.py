"""Search strategies: ``grid`` (every point), ``random`` (seeded samples) and ``optuna`` (TPE).

A strategy proposes points (``ask``) and learns their objective (``tell``). Every proposal is
deterministic given the seed and what it was told, so a resumed sweep asks the same grid/random
points again and the runner skips those already in the store; Optuna is first told every finished
trial of the store (``replay``) and then asks only for the remaining budget.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from ..errors import SkillgraftError
from .space import Dim, Space, canonical_point, point_key, rnd

SEARCHES = ("grid", "random", "optuna")


def _relevant(dim: Dim, method: str) -> bool:
    from ..methods import METHODS

    m = METHODS[method]
    if dim.name.startswith("density"):
        return m.uses_density
    if dim.name.startswith("param."):
        return dim.name[len("param."):] in {p.name for p in m.params}
    if dim.name == "seed":
        return m.stochastic
    return True


class Search:
    name = "base"

    def __init__(self, space: Space, budget: int | None, seed: int):
        self.space = space
        self.budget = budget
        self.seed = seed

    def replay(self, trials: list[tuple[dict[str, Any], float]]) -> None:
        """Finished trials from an earlier run (params, objective)."""

    def ask(self, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def tell(self, point: dict[str, Any], value: float | None) -> None:
        """The objective of an asked point (None: the trial failed)."""


class PointList(Search):
    """A search whose points are all known up front (``points``); ``ask`` hands them out in order."""

    points: list[dict[str, Any]]
    _next = 0

    def ask(self, n: int) -> list[dict[str, Any]]:
        out = self.points[self._next : self._next + n]
        self._next += len(out)
        return out


class GridSearch(PointList):
    """Every combination, methods outermost, dimensions in the order given; duplicates merged."""

    name = "grid"

    def __init__(self, space: Space, budget: int | None, seed: int):
        super().__init__(space, budget, seed)
        seen: dict[str, dict[str, Any]] = {}
        for method in space.methods:
            dims = [d for d in space.dims if _relevant(d, method)]
            for combo in itertools.product(*(d.grid() for d in dims)):
                p = canonical_point({"method": method, **{d.name: v for d, v in zip(dims, combo)}})
                seen.setdefault(point_key(p), p)
        self.points = list(seen.values())
        if budget is not None and budget < len(self.points):
            raise SkillgraftError(
                f"the grid has {len(self.points)} points but --trials is {budget}; drop --trials or use --search random"
            )


class RandomSearch(PointList):
    """``budget`` independent draws, from a seeded generator: lists and steps uniformly over their
    values, continuous ranges uniformly over the interval."""

    name = "random"

    def __init__(self, space: Space, budget: int | None, seed: int):
        if not budget:
            raise SkillgraftError("--search random needs --trials N")
        super().__init__(space, budget, seed)
        rng = random.Random(seed)
        self.points = []
        for _ in range(budget):
            method = rng.choice(space.methods)
            p: dict[str, Any] = {"method": method}
            for d in space.dims:  # draw every dimension, relevant or not, so the stream never shifts
                if d.discrete:
                    v = rng.choice(d.grid())
                else:
                    v = d.cast(rng.uniform(d.low, d.high))
                if _relevant(d, method):
                    p[d.name] = v
            self.points.append(canonical_point(p))


class OptunaSearch(Search):
    """Optuna's TPE sampler (seeded, multivariate, constant liar for batches) on the same space."""

    name = "optuna"

    def __init__(self, space: Space, budget: int | None, seed: int):
        if not budget:
            raise SkillgraftError("--search optuna needs --trials N")
        try:
            import optuna
        except ImportError:
            raise SkillgraftError("--search optuna needs the optuna package: pip install optuna") from None
        super().__init__(space, budget, seed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(3, min(10, budget // 4)), constant_liar=True
        )
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.dists = self._distributions()
        self.asked = 0
        self.pending: dict[str, list[Any]] = {}

    def _distributions(self) -> dict[str, Any]:
        D = self.optuna.distributions
        out: dict[str, Any] = {"method": D.CategoricalDistribution(self.space.methods)}
        for d in self.space.dims:
            if d.values is not None:
                out[d.name] = D.CategoricalDistribution(list(d.values))
            elif d.name == "seed":
                out[d.name] = D.IntDistribution(int(d.low), int(d.high), step=int(d.step or 1))
            else:
                step = d.step
                if step is not None:  # optuna wants (high - low) to be a multiple of step
                    high = rnd(d.low + step * len(d.grid()[1:]))
                    out[d.name] = D.FloatDistribution(d.low, high, step=step)
                else:
                    out[d.name] = D.FloatDistribution(d.low, d.high)
        return out

    def replay(self, trials: list[tuple[dict[str, Any], float]]) -> None:
        for params, value in trials:
            if params.get("method") not in self.space.methods:
                continue
            ps, ds = {}, {}
            ok = True
            for k, v in params.items():
                dist = self.dists.get(k)
                if dist is None or not self._contains(dist, v):
                    ok = False
                    break
                ps[k], ds[k] = v, dist
            if not ok:
                continue
            self.study.add_trial(self.optuna.trial.create_trial(params=ps, distributions=ds, value=value))
            self.asked += 1

    def _contains(self, dist: Any, v: Any) -> bool:
        D = self.optuna.distributions
        if isinstance(dist, D.CategoricalDistribution):
            return v in dist.choices
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return dist.low - 1e-9 <= v <= dist.high + 1e-9

    def ask(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n and self.asked < self.budget:
            trial = self.study.ask()
            method = trial.suggest_categorical("method", self.space.methods)
            p: dict[str, Any] = {"method": method}
            for d in self.space.dims:
                if not _relevant(d, method):
                    continue
                dist = self.dists[d.name]
                if isinstance(dist, self.optuna.distributions.CategoricalDistribution):
                    v = trial.suggest_categorical(d.name, list(dist.choices))
                elif isinstance(dist, self.optuna.distributions.IntDistribution):
                    v = trial.suggest_int(d.name, dist.low, dist.high, step=dist.step)
                else:
                    v = d.cast(trial.suggest_float(d.name, dist.low, dist.high, step=dist.step))
                p[d.name] = v
            p = canonical_point(p)
            self.pending.setdefault(point_key(p), []).append(trial)
            self.asked += 1
            out.append(p)
        return out

    def tell(self, point: dict[str, Any], value: float | None) -> None:
        key = point_key(point)
        trials = self.pending.get(key)
        if not trials:
            return
        trial = trials.pop(0)
        state = self.optuna.trial.TrialState.COMPLETE if value is not None else self.optuna.trial.TrialState.FAIL
        self.study.tell(trial, value if value is not None else None, state=state)


def make_search(name: str, space: Space, budget: int | None, seed: int) -> Search:
    classes = {"grid": GridSearch, "random": RandomSearch, "optuna": OptunaSearch}
    if name not in classes:
        raise SkillgraftError(f"unknown search {name!r}; choose from {', '.join(SEARCHES)}")
    return classes[name](space, budget, seed)
