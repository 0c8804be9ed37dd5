"""A worker scores sweep points: in place on a VLM loaded once, or through a merged checkpoint.

The same class runs in the sweep's own process and, wrapped as a Ray actor, on a cluster: it is
built from JSON-able arguments only (the recipe, the evaluator spec, options).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from ..evaluate import make_evaluator
from ..extras import require
from ..io.resolve import resolve_checkpoint
from ..methods import METHODS
from ..pipeline import inject, prepare
from ..recipe import Recipe
from .inplace import InPlaceModel
from .space import canonical_point


def point_recipe(base: Recipe, point: dict[str, Any]) -> Recipe:
    """The recipe that merges ``point``: the sweep's fixed settings overlaid with the point's."""
    p = canonical_point(point)
    m = METHODS[p["method"]]
    known = {x.name for x in m.params}
    data = base.model_dump()
    data["method"] = m.name
    for e, spec in zip(data["experts"], base.experts):
        lbl = spec.label
        e["scale"] = float(p.get(f"scale.{lbl}", p.get("scale", e["scale"])))
        e["density"] = float(p.get(f"density.{lbl}", p.get("density", e["density"]))) if m.uses_density else 1.0
    params = {k: v for k, v in data.get("parameters", {}).items() if k in known}
    params.update({k[len("param."):]: v for k, v in p.items() if k.startswith("param.")})
    data["parameters"] = params
    if "seed" in p:
        data["seed"] = int(p["seed"])
    return Recipe.model_validate(data)


def estimate_inplace_bytes(recipe: Recipe, methods: list[str], allow_unmatched: bool = False) -> tuple[int, int]:
    """(bytes an in-place sweep needs, bytes available) for this VLM and these methods."""
    psutil = require("psutil", "an in-place sweep")

    cache_taus, probe = _cache_mode(recipe, methods)
    with ExitStack() as stack:
        prep = prepare(point_recipe(recipe, {"method": probe}), stack, allow_unmatched=allow_unmatched)
        r = prep.plan.vlm.reader
        model = sum(r.nbytes(n) for n in r.names)
        lm_elems = 0
        lm_own = 0
        for e in prep.plan.entries:
            if e.action == "merge":
                n = 1
                for s in e.shape:
                    n *= s
                lm_elems += n
                lm_own += r.nbytes(e.name)
    copies = len(recipe.experts) + (0 if cache_taus else 1)
    need = model + lm_own + 4 * lm_elems * (copies + 2)  # + merge temporaries
    return need, int(psutil.virtual_memory().available)


def _cache_mode(recipe: Recipe, methods: list[str]) -> tuple[bool, str]:
    """(cache task vectors only?, a method whose plan covers every swept method)."""
    ms = [METHODS[m] for m in methods]
    deltas = [m for m in ms if m.kind == "delta"]
    cache_taus = recipe.mode == "inject" and all(m.kind == "delta" for m in ms)
    probe = deltas[0].name if deltas and recipe.base is not None else ms[0].name
    return cache_taus, probe


class Worker:
    """Scores points for one sweep. ``inplace``: load the VLM once and apply points in memory."""

    def __init__(self, recipe: dict[str, Any], evaluator: dict[str, Any], *, inplace: bool, methods: list[str],
                 device: str = "cpu", allow_unmatched: bool = False):
        self.recipe = Recipe.model_validate(recipe)
        self.evaluator = make_evaluator(evaluator)
        self.inplace = inplace
        self.methods = methods
        self.device = device
        self.allow_unmatched = allow_unmatched
        self.stack = ExitStack()
        self.model = None
        self.processor = None
        self.ip = None
        self.setup: dict[str, float] = {}
        if inplace and not self.evaluator.supports_loaded:
            raise SkillgraftError(f"the {self.evaluator.kind} evaluator scores checkpoints only; use --inplace never")

    # ------------------------------------------------------------------ in place
    def _ensure_loaded(self) -> None:
        if self.ip is not None:
            return
        t0 = time.perf_counter()
        self.model, self.processor = self.evaluator.load(resolve_checkpoint(self.recipe.vlm, "vlm"))
        t1 = time.perf_counter()
        cache_taus, probe = _cache_mode(self.recipe, self.methods)
        prep = prepare(point_recipe(self.recipe, {"method": probe}), self.stack, allow_unmatched=self.allow_unmatched)
        self.ip = InPlaceModel(self.model, prep.plan, cache_taus=cache_taus, device=self.device,
                               allow_unmatched=self.allow_unmatched)
        self.rows = {e.name: e.rows for e in prep.plan.entries}
        self.setup = {"load_s": t1 - t0, "cache_s": time.perf_counter() - t1}

    def _settings(self, recipe: Recipe):
        with ExitStack() as stack:
            prep = prepare(recipe, stack, allow_unmatched=self.allow_unmatched)
            rows = {e.name: e.rows for e in prep.plan.entries}
        if rows != self.rows:
            raise SkillgraftError(f"method {recipe.method} plans different row slices; use --inplace never")
        return prep.settings

    # -------------------------------------------------------------------- API
    def baseline(self) -> tuple[dict[str, float], dict[str, float]]:
        """Scores of the VLM alone."""
        t0 = time.perf_counter()
        if self.inplace:
            self._ensure_loaded()
            t1 = time.perf_counter()
            scores = self.evaluator.evaluate_loaded(self.model, self.processor)
        else:
            t1 = time.perf_counter()
            scores = self.evaluator.evaluate_dir(resolve_checkpoint(self.recipe.vlm, "vlm"))
        t2 = time.perf_counter()
        return _as_floats(scores), {"setup_s": t1 - t0, "eval_s": t2 - t1, "total_s": t2 - t0, **self.setup}

    def run(self, point: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        """Scores of the VLM merged at ``point``, and where the time went."""
        recipe = point_recipe(self.recipe, point)
        if self.inplace:
            return self._run_inplace(recipe)
        return self._run_streaming(recipe)

    def _run_inplace(self, recipe: Recipe) -> tuple[dict[str, float], dict[str, float]]:
        self._ensure_loaded()
        t0 = time.perf_counter()
        settings = self._settings(recipe)
        self.ip.apply(settings)
        t1 = time.perf_counter()
        try:
            scores = self.evaluator.evaluate_loaded(self.model, self.processor)
        finally:
            t2 = time.perf_counter()
            self.ip.restore()
        t3 = time.perf_counter()
        return _as_floats(scores), {"apply_s": t1 - t0, "eval_s": t2 - t1, "restore_s": t3 - t2, "total_s": t3 - t0}

    def _run_streaming(self, recipe: Recipe) -> tuple[dict[str, float], dict[str, float]]:
        tmp = Path(tempfile.mkdtemp(prefix="skillgraft-sweep-"))
        try:
            t0 = time.perf_counter()
            inject(recipe, tmp / "model", device=self.device, progress=False, allow_unmatched=self.allow_unmatched)
            t1 = time.perf_counter()
            scores = self.evaluator.evaluate_dir(tmp / "model")
            t2 = time.perf_counter()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        t3 = time.perf_counter()
        return _as_floats(scores), {"apply_s": t1 - t0, "eval_s": t2 - t1, "restore_s": t3 - t2, "total_s": t3 - t0}

    def close(self) -> None:
        self.stack.close()


def _as_floats(scores: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in scores.items()}
