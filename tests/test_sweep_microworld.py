"""Sweeps on the shipped micro-world: grid, random and Optuna searches, exact restore of the real VLM
after every in-place point, and the report's recommended command reproducing the best point's score."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from skillgraft.recipe import ExpertSpec, Recipe
from skillgraft.sweep.objective import Objective
from skillgraft.sweep.runner import SweepConfig, run_sweep
from skillgraft.sweep.space import build_space

LIMIT = 8
SCENARIOS = ["general", "cross_lingual"]


def _zoo_dir() -> Path | None:
    if os.environ.get("SKILLGRAFT_TEST_ZOO"):
        return Path(os.environ["SKILLGRAFT_TEST_ZOO"])
    try:
        from skillgraft.microworld.zoo import zoo_path
    except ImportError:
        return None
    try:
        return Path(zoo_path("vlm")).parent
    except Exception:
        return None


ZOO = _zoo_dir()
pytestmark = pytest.mark.skipif(ZOO is None or not (ZOO / "vlm").is_dir(), reason="the micro-world zoo is not shipped")


def _config(methods, vary, search="grid", trials=None) -> SweepConfig:
    from skillgraft.evaluate.base import MicroworldEvaluator

    recipe = Recipe(vlm=str(ZOO / "vlm"), base=str(ZOO / "base"), experts=[ExpertSpec(model=str(ZOO / "expert-multilingual"))])
    return SweepConfig(recipe, build_space(methods, vary, ["expert-multilingual"]),
                       MicroworldEvaluator(SCENARIOS, LIMIT).spec(), Objective(["cross_lingual"]),
                       search=search, trials=trials)


def test_grid_random_optuna_and_recommended_command(tmp_path):
    from skillgraft.cli import main as cli_main
    from skillgraft.evaluate.microworld import evaluate
    from skillgraft.sweep.analysis import best_trial, inject_argv, load_results, recommended_recipe

    g = run_sweep(_config(["ta", "dare"], ["scale=0.5,1.0", "density=0.5"]), tmp_path / "g", log=None)
    assert (g.computed, g.failed, g.backend) == (4, 0, "in-place")
    r = run_sweep(_config(["ta", "dare"], ["scale=0:1.5", "density=0.2:1"], "random", 3), tmp_path / "r", log=None)
    assert r.computed + r.reused == 3 and r.failed == 0
    try:
        import optuna  # noqa: F401
    except ImportError:
        pass
    else:
        o = run_sweep(_config(["ta"], ["scale=0:1.5:0.25"], "optuna", 3), tmp_path / "o", log=None)
        assert o.computed + o.reused == 3 and o.failed == 0 and (tmp_path / "o" / "report.md").is_file()
    for d in ("g", "r"):
        assert (tmp_path / d / "report.md").is_file()
    assert (tmp_path / "g" / "scale_ta.png").is_file() and (tmp_path / "g" / "scale_dare.png").is_file()

    res = load_results(tmp_path / "g")
    best = best_trial(res.trials)
    argv = inject_argv(recommended_recipe(res, best), str(tmp_path / "merged"))
    assert cli_main(argv[1:] + ["-q"]) == 0
    got = evaluate(tmp_path / "merged", scenarios=SCENARIOS, limit=LIMIT, progress=False)
    assert {k: got[k] for k in SCENARIOS} == best.scores


def test_real_vlm_bit_identical_after_each_point():
    from skillgraft.evaluate.base import MicroworldEvaluator
    from skillgraft.sweep.worker import Worker

    cfg = _config(["ta", "dare", "ties"], ["scale=1"])
    w = Worker(cfg.recipe.model_dump(mode="json"), cfg.evaluator, inplace=True, methods=cfg.space.methods)
    w.baseline()
    fresh, _ = MicroworldEvaluator(SCENARIOS, LIMIT).load(ZOO / "vlm")
    ref = fresh.state_dict()
    for p in ({"method": "ta", "scale": 1.0}, {"method": "dare", "scale": 1.3, "density": 0.4},
              {"method": "ties", "scale": 0.7, "density": 0.3}):
        w.run(p)
        now = w.model.state_dict()
        for k, v in ref.items():
            assert torch.equal(now[k].view(torch.int32), v.view(torch.int32)), (p, k)
    w.close()


def test_jsonl_evaluator_matches_microworld_scoring(tmp_path):
    """The same items as a user's JSONL file, through the jsonl evaluator's generate path, score the same."""
    import json

    from skillgraft.evaluate import microworld as mw
    from skillgraft.evaluate.jsonl import JsonlEvaluator
    from skillgraft.microworld import world as W

    items = list(mw.benchmark_items("general"))[:LIMIT] + list(mw.benchmark_items("cross_lingual"))[:LIMIT]
    lines = []
    for i, it in enumerate(items):
        it.image().save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": it.question, "answer": it.answer, "language": it.lang}))
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    marker = {"en": W.answer_marker("en"), "fr": W.answer_marker("fr")}
    model, proc = mw.load(ZOO / "vlm")
    want = mw.evaluate_loaded(model, proc, scenarios=["general", "cross_lingual"], limit=LIMIT, progress=False)
    got = {}
    for lang in ("en", "fr"):
        sub = tmp_path / f"{lang}.jsonl"
        sub.write_text("\n".join(x for x in lines if json.loads(x)["language"] == lang) + "\n")
        ev = JsonlEvaluator(sub, batch_size=64, max_new_tokens=8,
                            prompt_template="scene : {image} . question : {question} " + marker[lang] + " :")
        got[lang] = ev.evaluate_loaded(model, proc)
        assert set(got[lang]) == {"all", f"language:{lang}"}
    assert got["en"]["all"] == want["general"] and got["fr"]["all"] == want["cross_lingual"]
