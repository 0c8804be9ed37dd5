"""A small sweep through a local Ray instance: trials run as Ray actor tasks, results land in the store."""

from __future__ import annotations

import pytest
from conftest import build_llava_triple

from skillgraft.recipe import ExpertSpec, Recipe
from skillgraft.sweep.analysis import load_results
from skillgraft.sweep.objective import Objective
from skillgraft.sweep.runner import SweepConfig, run_sweep
from skillgraft.sweep.space import build_space

ray = pytest.importorskip("ray")


def test_sweep_on_local_ray(tmp_path):
    t = build_llava_triple(tmp_path / "m")
    spec = {"kind": "python", "target": "toy_evaluator:ToyEvaluator",
            "options": {"vlm": str(t.vlm), "base": str(t.base), "expert": str(t.expert)}}
    recipe = Recipe(vlm=str(t.vlm), base=str(t.base), experts=[ExpertSpec(model=str(t.expert))])
    space = build_space(["ta", "dare"], ["scale=0.4,0.8,1.2", "density=0.5"], ["expert"])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cfg = SweepConfig(recipe, space, spec, Objective(["target"]), ray_address="auto", report=False)
        res = run_sweep(cfg, tmp_path / "s", log=None)
        assert res.backend == "ray" and (res.computed, res.failed) == (6, 0)
        assert res.best == {"method": "ta", "scale": 0.8}
        trials = load_results(tmp_path / "s").trials
        assert {t.backend for t in trials} == {"ray"} and all(t.state == "done" for t in trials)
        local = run_sweep(SweepConfig(recipe, space, spec, Objective(["target"]), report=False), tmp_path / "l", log=None)
        assert {t.key: t.scores for t in load_results(tmp_path / "l").trials} == {t.key: t.scores for t in trials}
        assert local.backend == "in-place"
    finally:
        ray.shutdown()
