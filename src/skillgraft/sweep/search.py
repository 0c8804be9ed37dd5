"""Search strategies: ``grid`` (every point), ``random`` (seeded samples) and ``optuna`` (TPE).

A strategy proposes points (``ask``) and learns their objective (``tell``). Every proposal is
deterministic given the seed and what it was told, so a resumed sweep asks the same grid/random
points again and the runner skips those already in the store; an Optuna study is stored beside the
sweep and continues where it stopped, asking only for the remaining budget.
"""

from __future__ import annotations

import itertools
import random
import warnings
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from ..extras import require
from ..methods import METHODS
from .space import Dim, Space, canonical_point, point_key, rnd

SEARCHES = ("grid", "random", "optuna")


def _relevant(dim: Dim, method: str) -> bool:
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

    def replay(self, trials: list[tuple[dict[str, Any], float]], info: list[dict[str, Any]] | None = None) -> None:
        """Finished trials from an earlier run (params, objective), with their target and retention
        shortfall in ``info`` when known."""

    def ask(self, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def tell(self, point: dict[str, Any], value: float | None, *, target: float | None = None,
             shortfall: float | None = None) -> None:
        """The objective of an asked point (None: the trial failed), its target score, and how far its
        retention fell short of the minimum (<= 0: feasible)."""


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
    """Optuna's TPE sampler (seeded, multivariate, constant liar for batches) on the same space.

    The study lives in ``SWEEP/optuna.db`` through Optuna's own RDB storage, so a resumed sweep
    continues the same study (its sampler sees every earlier trial, and trials killed in flight are
    marked failed). Optuna's schema has its own ``trials`` table, so it is a second SQLite file beside
    ``sweep.db`` rather than tables inside it. The objective told to Optuna is the target score;
    retention enters as a constraint (``constraints_func``: feasible when ``min_retention - retention
    <= 0``), so TPE models the feasible region instead of a penalised score.
    """

    name = "optuna"
    STUDY = "skillgraft-sweep"
    DB = "optuna.db"

    def __init__(self, space: Space, budget: int | None, seed: int, storage_dir: str | Path | None = None):
        if not budget:
            raise SkillgraftError("an optuna search needs a trial budget",
                                  cli="--search optuna needs --trials N")
        optuna = require("optuna", "the optuna search")
        super().__init__(space, budget, seed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self._study: Any = None
        self.dists = self._distributions()
        self.asked = 0
        self.pending: dict[str, list[Any]] = {}

    @property
    def study(self) -> Any:
        """The study, created (or reopened) on first use: the sweep directory exists by then."""
        if self._study is None:
            with warnings.catch_warnings():  # constraints_func is marked experimental by Optuna
                warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
                sampler = self.optuna.samplers.TPESampler(
                    seed=self.seed, n_startup_trials=max(3, min(10, self.budget // 4)), constant_liar=True,
                    constraints_func=_constraints,
                )
            storage = None
            if self.storage_dir is not None:
                storage = self.optuna.storages.RDBStorage(f"sqlite:///{self.storage_dir / self.DB}")
            self._study = self.optuna.create_study(study_name=self.STUDY, storage=storage, direction="maximize",
                                                   sampler=sampler, load_if_exists=True)
            TS = self.optuna.trial.TrialState
            for t in self._study.get_trials(deepcopy=False, states=(TS.RUNNING, TS.WAITING)):
                self._study.tell(t.number, state=TS.FAIL)  # in flight when an earlier run stopped
            self.asked = len(self._study.get_trials(deepcopy=False, states=(TS.COMPLETE,)))
        return self._study

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

    def replay(self, trials: list[tuple[dict[str, Any], float]], info: list[dict[str, Any]] | None = None) -> None:
        """Add finished store trials the study does not hold yet (e.g. a grid sweep resumed with optuna)."""
        known = {t.user_attrs.get("key") for t in self.study.get_trials(deepcopy=False)}
        for i, (params, value) in enumerate(trials):
            extra = info[i] if info else {}
            key = point_key(params)
            if key in known or params.get("method") not in self.space.methods:
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
            target = extra.get("target", value)
            self.study.add_trial(self.optuna.trial.create_trial(
                params=ps, distributions=ds, value=target,
                user_attrs={"key": key, "constraint": _shortfall(extra.get("shortfall"))},
                system_attrs={"constraints": [_shortfall(extra.get("shortfall"))]},
            ))
            known.add(key)
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
        study = self.study
        while len(out) < n and self.asked < self.budget:
            trial = study.ask()
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
            trial.set_user_attr("key", point_key(p))
            self.pending.setdefault(point_key(p), []).append(trial)
            self.asked += 1
            out.append(p)
        return out

    def tell(self, point: dict[str, Any], value: float | None, *, target: float | None = None,
             shortfall: float | None = None) -> None:
        key = point_key(point)
        trials = self.pending.get(key)
        if not trials:
            return
        trial = trials.pop(0)
        TS = self.optuna.trial.TrialState
        if value is None:
            self.study.tell(trial, state=TS.FAIL)
            return
        trial.set_user_attr("constraint", _shortfall(shortfall))
        self.study.tell(trial, target if target is not None else value, state=TS.COMPLETE)


def _shortfall(x: float | None) -> float:
    return 0.0 if x is None else float(x)


def _constraints(trial: Any) -> list[float]:
    """Optuna's constraint values: <= 0 is feasible (retention at or above its minimum)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def make_search(name: str, space: Space, budget: int | None, seed: int,
                storage_dir: str | Path | None = None) -> Search:
    """A search strategy; ``storage_dir`` (the sweep directory) keeps an Optuna study between runs."""
    classes = {"grid": GridSearch, "random": RandomSearch}
    if name == "optuna":
        return OptunaSearch(space, budget, seed, storage_dir)
    if name not in classes:
        raise SkillgraftError(f"unknown search {name!r}; choose from {', '.join(SEARCHES)}")
    return classes[name](space, budget, seed)
