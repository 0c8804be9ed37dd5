"""Sweeps: the search space, the in-place path (bit-exact apply and restore), grid / random / Optuna
searches, resuming (in process and after a kill), the report and its recommended command.

The machinery is exercised with the toy evaluator (instant, deterministic); the real micro-world
runs in test_sweep_microworld.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from conftest import build_llava_triple

from skillgraft.errors import SkillgraftError
from skillgraft.recipe import ExpertSpec, Recipe
from skillgraft.sweep.objective import Objective
from skillgraft.sweep.runner import SweepConfig, run_sweep
from skillgraft.sweep.space import build_space, canonical_point, parse_vary, point_key


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return build_llava_triple(tmp_path_factory.mktemp("sweep-llava"))


def toy_spec(t, **opts):
    return {"kind": "python", "target": "toy_evaluator:ToyEvaluator",
            "options": {"vlm": str(t.vlm), "base": str(t.base), "expert": str(t.expert), **opts}}


def config(t, methods=("ta",), vary=("scale=0:1.5:0.1",), search="grid", trials=None, **kw):
    recipe = Recipe(vlm=str(t.vlm), base=str(t.base), experts=[ExpertSpec(model=str(t.expert))])
    return SweepConfig(recipe, build_space(list(methods), list(vary), ["expert"]), toy_spec(t), Objective(["target"]),
                       search=search, trials=trials, **kw)


def db_rows(d: Path) -> dict[str, tuple]:
    con = sqlite3.connect(str(d / "sweep.db"))
    rows = {k: (i, f, s) for k, i, f, s in con.execute("SELECT key, id, finished, state FROM trials")}
    con.close()
    return rows


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


# ----------------------------------------------------------------------------------- space
def test_vary_ranges_lists_and_errors():
    d = parse_vary("scale=0:1.5:0.1", ["e"])
    assert len(d.grid()) == 16 and d.grid()[3] == 0.3 and d.grid()[-1] == 1.5
    assert parse_vary("density=0.1,0.3,0.5,1.0", ["e"]).grid() == [0.1, 0.3, 0.5, 1.0]
    assert parse_vary("scale=0:2", ["e"]).step is None
    assert parse_vary("scale.e=0.5,1", ["e"]).grid() == [0.5, 1.0]
    for bad in ("scale", "scale=1:0", "scale=0:1:0", "density=0:1.5:0.5", "bogus=1", "scale.x=1", "scale=a,b"):
        with pytest.raises(SkillgraftError):
            parse_vary(bad, ["e"])
    with pytest.raises(SkillgraftError, match="continuous"):
        parse_vary("scale=0:2", ["e"]).grid()
    # ta ignores density: two densities are one point
    assert point_key({"method": "ta", "scale": 0.1 * 3, "density": 0.5}) == point_key({"method": "ta", "scale": 0.3})
    assert "density" in canonical_point({"method": "dare", "scale": 1.0, "density": 0.5})


# ---------------------------------------------------------------------------------- in place
@pytest.mark.parametrize("method,density,params", [
    ("ta", 1.0, {}), ("dare", 0.5, {}), ("ties", 0.3, {}), ("dare_ties", 0.4, {}), ("breadcrumbs", 0.6, {}),
    ("della", 0.5, {}), ("layerswap", 1.0, {"first_k": 1, "last_k": 0}), ("linear", 1.0, {}),
])
def test_inplace_equals_checkpoint_and_restores_bit_identical(triple, tmp_path, method, density, params):
    from transformers import LlavaForConditionalGeneration

    from skillgraft.api import inject, prepare
    from skillgraft.sweep.inplace import InPlaceModel

    model = LlavaForConditionalGeneration.from_pretrained(str(triple.vlm), dtype="auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(vlm=str(triple.vlm), base=str(triple.base), method=method, seed=7, parameters=params,
                    experts=[ExpertSpec(model=str(triple.expert), scale=0.9, density=density)])
    with ExitStack() as stack:
        prep = prepare(recipe, stack)
        ip = InPlaceModel(model, prep.plan, cache_taus=prep.settings.method.kind == "delta")
        for _ in range(2):  # apply, restore, apply again: same bits both times
            ip.apply(prep.settings)
            merged = {k: v.clone() for k, v in model.state_dict().items()}
            ip.restore()
            after = model.state_dict()
            for k, v in before.items():
                assert torch.equal(bits(after[k]), bits(v)), k
    ref = LlavaForConditionalGeneration.from_pretrained(str(inject(recipe, tmp_path / "o", progress=False).out_dir),
                                                        dtype="auto").state_dict()
    changed = 0
    for k, v in merged.items():
        assert torch.equal(bits(v), bits(ref[k])), k
        changed += not torch.equal(v, before[k])
    # every merged LM tensor moved (layerswap: not the kept layer's); vision tower and projector did not
    assert changed == sum(not torch.equal(ref[k], before[k]) for k in before) and changed >= 11


def test_inplace_symmetric_and_interp_use_full_cache(triple):
    from transformers import LlavaForConditionalGeneration

    from skillgraft.api import prepare
    from skillgraft.sweep.inplace import InPlaceModel

    model = LlavaForConditionalGeneration.from_pretrained(str(triple.vlm), dtype="auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(vlm=str(triple.vlm), base=str(triple.base), method="ta", mode="symmetric",
                    experts=[ExpertSpec(model=str(triple.expert), scale=0.5)])
    with ExitStack() as stack:
        prep = prepare(recipe, stack)
        with pytest.raises(SkillgraftError):
            InPlaceModel(model, prep.plan, cache_taus=True).apply(prep.settings)
        ip = InPlaceModel(model, prep.plan, cache_taus=False)
        ip.apply(prep.settings)
        ip.restore()
    assert all(torch.equal(bits(model.state_dict()[k]), bits(v)) for k, v in before.items())


# ------------------------------------------------------------------------------- searches
def test_grid_random_optuna(triple, tmp_path):
    g = run_sweep(config(triple, ("ta", "dare"), ("scale=0:1.5:0.1", "density=0.5,1")), tmp_path / "g", log=None)
    assert (g.computed, g.reused, g.failed, g.backend) == (16 + 32, 0, 0, "in-place")
    assert g.best == {"method": "ta", "scale": 0.8}
    r = run_sweep(config(triple, ("ta", "ties"), ("scale=0:1.5", "density=0.2:1"), "random", 10), tmp_path / "r",
                  log=None, )
    assert r.computed + r.reused == 10 and r.failed == 0
    pytest.importorskip("optuna")
    o = run_sweep(config(triple, ("ta",), ("scale=0:1.5:0.05",), "optuna", 14), tmp_path / "o", log=None)
    assert o.computed + o.reused == 14
    from skillgraft.sweep.analysis import load_results

    res = load_results(tmp_path / "o")
    best = max(t.objective for t in res.trials)
    assert best > 0.9  # TPE finds the peak at 0.8 within 14 trials
    t0 = res.trials[0]
    assert t0.version and t0.timings["eval_s"] >= 0 and t0.search == "optuna" and t0.state == "done"
    assert res.baseline is not None and res.baseline.scores["general"] == 1.0


def test_resume_in_process_recomputes_nothing(triple, tmp_path):
    cfg = config(triple, ("ta",), ("scale=0:1.5:0.1",))
    cfg.max_trials_this_run = 6
    first = run_sweep(cfg, tmp_path / "s", log=None)
    assert first.computed == 6
    before = db_rows(tmp_path / "s")
    cfg.max_trials_this_run = None
    second = run_sweep(cfg, tmp_path / "s", log=None)
    assert (second.computed, second.reused) == (10, 6)
    after = db_rows(tmp_path / "s")
    for k, v in before.items():
        assert after[k] == v  # same row, same finish time: not recomputed
    # optuna resumes from the store too: the budget counts the finished trials
    pytest.importorskip("optuna")
    ocfg = config(triple, ("ta",), ("scale=0:1.5:0.1",), "optuna", 8)
    ocfg.max_trials_this_run = 3
    run_sweep(ocfg, tmp_path / "o", log=None)
    ocfg.max_trials_this_run = None
    again = run_sweep(ocfg, tmp_path / "o", log=None)
    assert again.computed + again.reused <= 5 + 1


def test_resume_refuses_another_sweep(triple, tmp_path):
    run_sweep(config(triple, ("ta",), ("scale=0,1",)), tmp_path / "s", log=None)
    other = config(triple, ("ta",), ("scale=0,1",))
    other.objective = Objective(["general"])
    with pytest.raises(SkillgraftError, match="different objective"):
        run_sweep(other, tmp_path / "s", log=None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(SkillgraftError, match="not empty"):
        run_sweep(config(triple), tmp_path / "busy", log=None)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "skillgraft", *args]


def test_kill_midway_then_resume(triple, tmp_path, capsys):
    out = tmp_path / "k"
    argv = _cli("sweep", str(triple.vlm), str(triple.expert), "--base", str(triple.base), "--method", "ta",
                "--vary", "scale=0:1.4:0.2", "--eval", "python", "--eval-python", "toy_evaluator:ToyEvaluator",
                "--eval-option", f"vlm={triple.vlm}", "--eval-option", f"base={triple.base}",
                "--eval-option", f"expert={triple.expert}", "--eval-option", "delay=0.3", "-o", str(out), "-q")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    log = (tmp_path / "log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 90
    done = {}
    while time.time() < deadline:
        time.sleep(0.2)
        if (out / "sweep.db").is_file():
            try:
                done = {k: v for k, v in db_rows(out).items() if v[2] == "done" and k != "__baseline__"}
            except sqlite3.OperationalError:
                continue
            if len(done) >= 2:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert 2 <= len(done) < 8, "the sweep should have been killed midway: " + (tmp_path / "log").read_text()[-2000:]
    before = {k: v for k, v in db_rows(out).items() if v[2] == "done"}
    from skillgraft.cli import main  # the same command again, in this process

    assert main(argv[3:]) == 0
    n_trials = 8
    n_done = len([k for k in before if k != "__baseline__"])
    assert f"{n_trials - n_done} point(s) scored, {n_done} reused" in capsys.readouterr().out
    after = db_rows(out)
    for k, v in before.items():
        assert after[k] == v, k
    assert all(v[2] == "done" for v in after.values())


def test_report_and_recommended_command_reproduces(triple, tmp_path):
    from skillgraft.cli import main as cli_main
    from skillgraft.evaluate import make_evaluator
    from skillgraft.sweep.analysis import best_trial, inject_argv, load_results, recommended_recipe

    out = tmp_path / "s"
    run_sweep(config(triple, ("ta", "dare"), ("scale=0:1.5:0.25", "density=0.3,1")), out, log=None)
    for name in ("report.md", "scale_ta.png", "scale_dare.png", "heatmap_dare.png", "scale_methods.png",
                 "recommended_recipe.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "Goldilocks" in text and "skillgraft inject" in text
    res = load_results(out)
    best = best_trial(res.trials)
    argv = inject_argv(recommended_recipe(res, best), str(tmp_path / "merged"))
    assert argv[:2] == ["skillgraft", "inject"]
    assert cli_main(argv[1:] + ["-q"]) == 0
    got = make_evaluator(res.evaluator).evaluate_dir(tmp_path / "merged")
    assert got == best.scores
    # `skillgraft report` rewrites the same files from the store alone
    (out / "report.md").unlink()
    from skillgraft.cli import main

    assert main(["report", str(out)]) == 0 and (out / "report.md").is_file()


def test_cli_errors(triple, tmp_path, capsys):
    from skillgraft.cli import main

    common = [str(triple.vlm), str(triple.expert), "--base", str(triple.base), "-o", str(tmp_path / "x")]
    assert main(["sweep", *common, "--vary", "scale=2:1"]) == 2
    assert "error: --vary scale=2:1: HIGH is below LOW" in capsys.readouterr().err
    assert main(["sweep", *common, "--method", "nope"]) == 2
    assert "error: unknown method 'nope'" in capsys.readouterr().err
    assert main(["sweep", *common, "--search", "optuna", "--vary", "scale=0:1"]) == 2
    assert "needs --trials" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_streaming_fallback_matches_inplace(triple, tmp_path):
    a = run_sweep(config(triple, ("ta", "dare"), ("scale=0.4,1.2", "density=0.5")), tmp_path / "a", log=None)
    cfg = config(triple, ("ta", "dare"), ("scale=0.4,1.2", "density=0.5"), inplace="never")
    b = run_sweep(cfg, tmp_path / "b", log=None)
    assert a.backend == "in-place" and b.backend == "streaming"
    from skillgraft.sweep.analysis import load_results

    sa = {t.key: t.scores for t in load_results(tmp_path / "a").trials}
    sb = {t.key: t.scores for t in load_results(tmp_path / "b").trials}
    assert sa == sb
