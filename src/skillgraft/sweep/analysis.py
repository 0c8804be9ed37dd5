"""Reading a finished (or running) sweep back: best point, Goldilocks zones, the recommended command.

The Goldilocks zone of a method: take that method's trials that share every setting with its best
point except the scale, sort them by scale, and keep the contiguous run around the best point in
which the target score is within ``within`` (90%) of the best feasible target and retention stays
at or above the objective's minimum (95%). A method whose best feasible point does not beat the VLM
alone has no zone. The zone is that run's scale interval; its width is a
measure of how forgiving the method is (0 means a single grid point: narrower than the step).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import METHODS
from ..recipe import Recipe
from .objective import Objective
from .space import Space
from .store import Store, Trial
from .worker import point_recipe

ZONE_WITHIN = 0.9


@dataclass
class Results:
    dir: Path
    trials: list[Trial]
    failed: list[Trial]
    baseline: Trial | None
    objective: Objective
    recipe: Recipe
    space: Space
    search: dict[str, Any]
    evaluator: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    item_counts: dict[str, int] | None = None   # items behind each score, when scores are accuracies

    @property
    def scale_key(self) -> str | None:
        names = [d.name for d in self.space.dims]
        if "scale" in names:
            return "scale"
        return next((n for n in names if n.startswith("scale.")), None)

    def methods(self) -> list[str]:
        seen = [t.params["method"] for t in self.trials]
        return [m for m in self.space.methods if m in seen] + sorted(set(seen) - set(self.space.methods))

    def of(self, method: str) -> list[Trial]:
        return [t for t in self.trials if t.params["method"] == method]

    def scenarios(self) -> list[str]:
        names: list[str] = []
        for t in ([self.baseline] if self.baseline else []) + self.trials:
            for k in t.scores:
                if k not in names:
                    names.append(k)
        return names


def load_results(sweep_dir: str | Path) -> Results:
    with Store(sweep_dir, create=False) as st:
        recipe = Recipe.model_validate(st.get_meta("recipe"))
        return Results(
            Path(sweep_dir), st.trials(), st.trials(state="failed"), st.baseline(),
            Objective.from_json(st.get_meta("objective")), recipe, Space.from_json(st.get_meta("space")),
            st.get_meta("search", {}), st.get_meta("evaluator", {}), st.get_meta("runs", []),
            st.get_meta("item_counts"),
        )


def best_trial(trials: list[Trial]) -> Trial | None:
    """Highest objective; ties go to the smaller scale (the gentler merge), then the earlier trial."""
    cands = [t for t in trials if t.objective is not None]
    if not cands:
        return None
    return max(cands, key=lambda t: (round(t.objective, 12), -_total_scale(t.params), -(t.id or 0)))


def _total_scale(p: dict[str, Any]) -> float:
    return sum(float(v) for k, v in p.items() if k == "scale" or k.startswith("scale."))


def is_noop(res: Results, trial: Trial) -> bool:
    """True when the point merges nothing into the VLM: every expert's scale is 0."""
    recipe = point_recipe(res.recipe, trial.params)
    return all(not any(e.scale) if isinstance(e.scale, list) else e.scale == 0 for e in recipe.experts)


def recommendation(res: Results) -> Trial | None:
    """The point to recommend: the best feasible merge that beats the VLM alone on the target.

    None when no merge does: then the report says so rather than recommending a no-op (scale 0, or a
    point that only matches the VLM)."""
    floor = baseline_target(res)
    cands = [t for t in res.trials if t.feasible is not False and t.target is not None
             and t.target > floor + 1e-12 and not is_noop(res, t)]
    return best_trial(cands)


# 95% two-sided normal quantile
Z95 = 1.959963984540054


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` items (Wilson 1927): unlike the
    normal approximation it stays inside [0, 1] and is sound near 0 and 1, where skill scores live."""
    if n <= 0:
        return (0.0, 1.0)
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval(res: Results, names: list[str], value: float | None) -> tuple[float, float] | None:
    """95% interval of a score (or of the mean of several, pooled over their items), when the
    evaluator reported item counts; None otherwise (scores that are not proportions)."""
    if value is None or not res.item_counts or any(n not in res.item_counts for n in names):
        return None
    if not 0.0 <= value <= 1.0:
        return None
    return wilson(value, sum(int(res.item_counts[n]) for n in names))


@dataclass
class Zone:
    method: str
    fixed: dict[str, Any]          # the slice: the best point's other settings
    best: Trial
    low: float | None
    high: float | None
    points: list[Trial]            # the slice, sorted by scale

    @property
    def width(self) -> float | None:
        return None if self.low is None else round(self.high - self.low, 10)


def slice_of(trials: list[Trial], ref: Trial, scale_key: str) -> list[Trial]:
    """Trials equal to ``ref`` in every setting but ``scale_key``, sorted by scale."""
    fixed = {k: v for k, v in ref.params.items() if k != scale_key}
    out = [t for t in trials if {k: v for k, v in t.params.items() if k != scale_key} == fixed and scale_key in t.params]
    return sorted(out, key=lambda t: float(t.params[scale_key]))


def zone(res: Results, method: str, within: float = ZONE_WITHIN) -> Zone | None:
    trials = res.of(method)
    best = best_trial(trials)
    sk = res.scale_key
    if best is None or sk is None or sk not in best.params:
        return None
    pts = slice_of(trials, best, sk)
    fixed = {k: v for k, v in best.params.items() if k not in (sk, "method")}
    if not best.feasible or best.target is None or best.target <= baseline_target(res) + 1e-12:
        return Zone(method, fixed, best, None, None, pts)  # nothing to inject: no zone
    ref = best.target
    ok = [bool(t.feasible) and t.target is not None and t.target >= within * ref - 1e-12 for t in pts]
    i = next(k for k, t in enumerate(pts) if t.key == best.key)
    lo = hi = i
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(pts) - 1 and ok[hi + 1]:
        hi += 1
    return Zone(method, fixed, best, float(pts[lo].params[sk]), float(pts[hi].params[sk]), pts)


def baseline_target(res: Results) -> float:
    """The target score of the VLM alone (-inf when unknown)."""
    if res.baseline is None or any(t not in res.baseline.scores for t in res.objective.target):
        return float("-inf")
    return sum(res.baseline.scores[t] for t in res.objective.target) / len(res.objective.target)


def grid_step(values: list[float]) -> float | None:
    xs = sorted(set(values))
    return None if len(xs) < 2 else round(min(b - a for a, b in zip(xs, xs[1:])), 10)


# ------------------------------------------------------------------------------ recommendation
def recommended_recipe(res: Results, trial: Trial) -> Recipe:
    return point_recipe(res.recipe, trial.params)


def inject_argv(recipe: Recipe, out: str = "OUT", recipe_file: str | None = None) -> list[str]:
    """``skillgraft inject ...`` that merges ``recipe``; positional form for one expert."""
    if len(recipe.experts) != 1 or recipe.exclude or recipe.vlm_weight != 1.0 or recipe.vlm_density != 1.0:
        return ["skillgraft", "inject", "--recipe", recipe_file or "recommended_recipe.yaml", "-o", out]
    m = METHODS[recipe.method]
    e = recipe.experts[0]
    argv = ["skillgraft", "inject", recipe.vlm, e.model]
    if recipe.base:
        argv += ["--base", recipe.base]
    argv += ["--method", recipe.method, "--scale", f"{e.scale:g}"]
    if m.uses_density:
        argv += ["--density", f"{e.density:g}"]
    defaults = {p.name: p.default for p in m.params}
    for k, v in recipe.parameters.items():
        if defaults.get(k, object()) != v:
            argv += ["--param", f"{k}={_yaml_scalar(v)}"]
    if m.stochastic or recipe.seed != 0:
        argv += ["--seed", str(recipe.seed)]
    if recipe.mode != "inject":
        argv += ["--mode", recipe.mode]
    if recipe.dtype != "auto":
        argv += ["--dtype", recipe.dtype]
    return argv + ["-o", out]


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


def eval_argv(evaluator: dict[str, Any], out: str = "OUT") -> list[str] | None:
    if evaluator.get("kind") != "microworld":
        return None
    argv = ["skillgraft", "eval", out, "--suite", "microworld"]
    if evaluator.get("scenarios"):
        argv += ["--scenarios", ",".join(evaluator["scenarios"])]
    if evaluator.get("limit"):
        argv += ["--limit", str(evaluator["limit"])]
    return argv


def shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
