"""The quantity a sweep optimises: the target score, subject to retaining the VLM's general skill.

    target    = mean of the target scenarios' scores
    retention = score[retain] / baseline[retain]        (baseline: the VLM alone, no merge)
    feasible  = retention >= min_retention               (default 0.95)
    objective = target                                   if feasible
              = target - 1 - (min_retention - retention) otherwise

Scores are accuracies in [0, 1], so every feasible point ranks above every infeasible one, and
among infeasible points the less damaging ranks higher (which gives TPE a slope to follow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SkillgraftError

@dataclass
class Objective:
    target: list[str]
    retain: str | None = "general"
    min_retention: float = 0.95

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "retain": self.retain, "min_retention": self.min_retention}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Objective":
        return cls(list(d["target"]), d.get("retain"), float(d.get("min_retention", 0.95)))

    def describe(self) -> str:
        t = " + ".join(self.target)
        if self.retain is None:
            return f"mean {t} score"
        return f"mean {t} score, subject to {self.retain} retention >= {self.min_retention:.0%} of the VLM alone"

    def check(self, scenarios: list[str] | None) -> None:
        """Refuse targets the evaluator does not report (when it names its scenarios up front)."""
        if scenarios is None:
            return
        for s in [*self.target, *([self.retain] if self.retain else [])]:
            if s not in scenarios:
                raise SkillgraftError(f"the evaluator reports no {s!r} score (it reports: {', '.join(scenarios)})")

    def retention(self, scores: dict[str, float], baseline: dict[str, float] | None) -> float | None:
        if self.retain is None or baseline is None:
            return None
        b = baseline.get(self.retain)
        s = scores.get(self.retain)
        if b is None or s is None:
            return None
        if b <= 0:
            return 1.0 if s >= b else 0.0
        return s / b

    def shortfall(self, retention: float | None) -> float | None:
        """How far ``retention`` falls below the minimum (<= 0: feasible; None: no constraint)."""
        if self.retain is None or retention is None:
            return None
        return self.min_retention - retention

    def score(self, scores: dict[str, float], baseline: dict[str, float] | None) -> tuple[float, float, float | None, bool]:
        """(objective, target, retention, feasible) of one trial's scores."""
        missing = [t for t in self.target if t not in scores]
        if missing:
            raise SkillgraftError(f"the evaluator returned no {missing[0]!r} score (got: {', '.join(scores)})")
        target = sum(scores[t] for t in self.target) / len(self.target)
        ret = self.retention(scores, baseline)
        feasible = ret is None or ret >= self.min_retention - 1e-12
        obj = target if feasible else target - 1.0 - (self.min_retention - ret)
        return obj, target, ret, feasible
