"""A toy evaluator that needs no benchmark: it scores how far a model moved along the expert's direction.

    s = sum <theta - theta_V, tau_E> / sum ||tau_E||^2     over the LM's MLP down-projections

(TA at scale lambda gives s = lambda exactly.) ``target`` peaks at ``s = peak``; ``general`` stays at
1 until ``s = safe`` and then falls, so the pair has a Goldilocks zone like a real one. It is
deterministic and instant: the sweep machinery (search, store, resume, Ray, report) can be tested
and demonstrated on any VLM/expert pair with it. Use as the ``python`` evaluator
``toy_evaluator:ToyEvaluator`` (this tests directory on the path) with options ``vlm``, ``base``, ``expert``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

_KEY = re.compile(r"layers\.(\d+)\.mlp\.down_proj\.weight$")


def _down_projs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = _KEY.search(k)
        if m:
            out[m.group(0)] = v.detach().float()
    return out


class ToyEvaluator:
    supports_loaded = True

    def __init__(self, vlm: str, base: str, expert: str, peak: float = 0.8, width: float = 0.5, safe: float = 0.9,
                 slope: float = 0.5, delay: float = 0.0, items: int = 0):
        from skillgraft.evaluate import load_model

        self.peak, self.width, self.safe, self.slope, self.delay = peak, width, safe, slope, float(delay)
        self.items = int(items)  # > 0: report scores as accuracies over this many items each
        v, _ = load_model(vlm)
        b, _ = load_model(base)
        e, _ = load_model(expert)
        self.v = _down_projs(v.state_dict())
        bb, ee = _down_projs(b.state_dict()), _down_projs(e.state_dict())
        self.tau = {k: ee[k] - bb[k] for k in self.v}
        self.norm2 = sum(float((t * t).sum()) for t in self.tau.values())

    def scenarios(self) -> list[str]:
        return ["general", "target"]

    def default_target(self) -> list[str]:
        return ["target"]

    def item_counts(self) -> dict[str, int] | None:
        return {"general": self.items, "target": self.items} if self.items else None

    def load(self, model_dir: str | Path) -> tuple[Any, Any]:
        from skillgraft.evaluate import load_model

        return load_model(model_dir)

    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        model, proc = self.load(model_dir)
        return self.evaluate_loaded(model, proc)

    def evaluate_loaded(self, model: Any, processor: Any) -> dict[str, float]:
        if self.delay:
            import time

            time.sleep(self.delay)
        cur = _down_projs(model.state_dict())
        s = sum(float(((cur[k] - self.v[k]) * self.tau[k]).sum()) for k in self.v) / self.norm2
        target = math.exp(-(((s - self.peak) / self.width) ** 2))
        general = 1.0 if s <= self.safe else max(0.0, 1.0 - self.slope * (s - self.safe))
        return {"general": round(general, 6), "target": round(target, 6)}
