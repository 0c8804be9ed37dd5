"""The sweep report: it never recommends a no-op, its scores carry 95% Wilson intervals, an Optuna
study resumes from the sweep directory with retention as a constraint, and the lmms-eval metric
paths of docs/sweeps.md read a results file laid out as lmms-eval writes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import build_llava_triple

from skillgraft.recipe import ExpertSpec, Recipe
from skillgraft.sweep.analysis import load_results, recommendation, wilson
from skillgraft.sweep.objective import Objective
from skillgraft.sweep.report import REPORT, RECIPE, summary_lines
from skillgraft.sweep.runner import SweepConfig, run_sweep
from skillgraft.sweep.space import build_space, point_key

DOCS = Path(__file__).resolve().parent.parent / "docs" / "sweeps.md"


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return build_llava_triple(tmp_path_factory.mktemp("report-llava"))


def config(t, methods=("ta",), vary=("scale=0:1.5:0.25",), search="grid", trials=None, **opts) -> SweepConfig:
    spec = {"kind": "python", "target": "toy_evaluator:ToyEvaluator",
            "options": {"vlm": str(t.vlm), "base": str(t.base), "expert": str(t.expert), **opts}}
    recipe = Recipe(vlm=str(t.vlm), base=str(t.base), experts=[ExpertSpec(model=str(t.expert))])
    return SweepConfig(recipe, build_space(list(methods), list(vary), ["expert"]), spec, Objective(["target"]),
                       search=search, trials=trials)


def test_wilson_interval():
    lo, hi = wilson(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson(0.0, 256)[0] == 0.0 and 0 < wilson(0.0, 256)[1] < 0.02   # never below 0, not degenerate
    assert wilson(1.0, 10)[1] == pytest.approx(1.0) and wilson(1.0, 10)[0] < 0.75
    # 256 items: a 2-3 point difference is inside the noise
    lo, hi = wilson(0.42, 256)
    assert 0.05 < hi - lo < 0.13


def test_nothing_beats_the_vlm_means_no_recommendation(triple, tmp_path):
    # the toy target peaks at a negative scale: every positive scale scores below the VLM alone,
    # and scale 0 (the VLM itself) is the "best" point; it must not be recommended
    out = tmp_path / "s"
    (out).mkdir()
    run_sweep(config(triple, ("ta", "dare"), ("scale=0:1:0.25", "density=0.5,1"), peak=-0.5), out, log=None)
    res = load_results(out)
    assert max(res.trials, key=lambda t: t.objective).params["scale"] == 0.0
    assert recommendation(res) is None
    text = (out / REPORT).read_text()
    assert "Nothing to recommend: no merge beat the VLM alone on target" in text and "What to try" in text
    assert "skillgraft inject" not in text and not (out / RECIPE).exists()
    assert "scale=0 " not in text.split("## Methods", 1)[0]  # no scale-0 point offered above the tables
    assert summary_lines(res)[0].startswith("nothing to recommend")


def test_report_intervals_and_plots(triple, tmp_path):
    out = tmp_path / "s"
    run_sweep(config(triple, ("ta", "dare"), ("scale=0:1.5:0.25", "density=0.5,1"), items=256), out, log=None)
    res = load_results(out)
    assert res.item_counts == {"general": 256, "target": 256}
    rec = recommendation(res)
    assert rec is not None and rec.params["scale"] > 0
    text = (out / REPORT).read_text()
    assert "95% interval" in text and "Wilson" in text
    lo, hi = wilson(rec.target, 256)
    assert f"[{lo:.3f}, {hi:.3f}]" in text
    assert (out / RECIPE).is_file()
    for name in ("scale_ta.png", "scale_dare.png", "scale_methods.png", "heatmap_dare.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_optuna_study_is_stored_and_resumed_with_retention_as_a_constraint(triple, tmp_path):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "o"
    cfg = config(triple, ("ta",), ("scale=0:2:0.05",), "optuna", 9, safe=0.5)
    cfg.max_trials_this_run = 4
    run_sweep(cfg, out, log=None)
    storage = f"sqlite:///{out / 'optuna.db'}"
    first = optuna.load_study(study_name="skillgraft-sweep", storage=storage).trials
    assert len(first) == 4
    cfg.max_trials_this_run = None
    run_sweep(cfg, out, log=None)
    study = optuna.load_study(study_name="skillgraft-sweep", storage=storage)
    trials = study.trials
    assert len(trials) == 9  # the same study went on: 4 + 5, not a fresh 9
    assert [t.params for t in trials[:4]] == [t.params for t in first]
    res = load_results(out)
    by_key = {t.key: t for t in res.trials}
    for t in trials:
        stored = by_key[t.user_attrs["key"]]
        assert t.value == pytest.approx(stored.target)  # the raw target, no penalty folded in
        shortfall = 0.95 - stored.retention
        assert t.system_attrs["constraints"] == [pytest.approx(shortfall)]  # retention as a constraint
    assert any(t.system_attrs["constraints"][0] > 0 for t in trials)  # the bound bit somewhere
    assert point_key(res.trials[0].params) == trials[0].user_attrs["key"]


LMMS_RESULTS = {  # the layout lmms-eval writes to OUTPUT/<model>/<date>_results.json
    "results": {
        "mme": {"alias": "mme", "mme_cognition_score,none": 301.4, "mme_cognition_score_stderr,none": "N/A",
                "mme_percetion_score,none": 1510.7, "mme_percetion_score_stderr,none": "N/A"},
        "mmbench_cn_dev": {"alias": "mmbench_cn_dev", "gpt_eval_score,none": 57.3,
                           "gpt_eval_score_stderr,none": "N/A"},
    },
    "group_subtasks": {"mme": [], "mmbench_cn_dev": []},
    "configs": {"mme": {"task": "mme", "output_type": "generate_until"}},
    "versions": {"mme": "Yaml", "mmbench_cn_dev": "Yaml"},
    "n-shot": {"mme": 0, "mmbench_cn_dev": 0},
    "n-samples": {"mme": {"original": 2374, "effective": 2374}, "mmbench_cn_dev": {"original": 4329, "effective": 4329}},
    "config": {"model": "llava_hf", "model_args": "pretrained=MODEL", "batch_size": "1"},
}


def test_docs_lmms_eval_metric_paths_read_lmms_eval_output(tmp_path):
    from skillgraft.evaluate.command import CommandEvaluator

    doc = DOCS.read_text().split("Example with lmms-eval", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    metrics = dict(m.split("=", 1) for m in
                   [a.split("--eval-metric ", 1)[1].split()[0] for a in doc.split("\n") if "--eval-metric " in a]
                   if "=" in m)
    assert "mme_percetion_score,none" in doc and metrics, "docs/sweeps.md shows the lmms-eval metric paths"
    json_glob = doc.split("--eval-json '", 1)[1].split("'", 1)[0]
    fake = tmp_path / "fake_lmms_eval.py"
    fake.write_text(
        "import json, sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output_path') + 1]) / 'llava-hf__merged'\n"
        "out.mkdir(parents=True)\n"
        f"(out / '20260101_000000_results.json').write_text(json.dumps({LMMS_RESULTS!r}))\n"
        "(out / '20260101_000000_samples_mme.jsonl').write_text('{}')\n"
    )
    ev = CommandEvaluator(f"{sys.executable} {fake} --model_args pretrained={{model}} --output_path {{out}}",
                          json_glob, metrics)
    scores = ev.evaluate_dir(tmp_path)
    assert scores == {"general": 1510.7, "cross_lingual": 57.3}
