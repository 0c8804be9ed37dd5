"""The jsonl and command evaluators: scoring rules, file validation, the external-command path."""

from __future__ import annotations

import json
import sys

import pytest

from skillgraft.errors import SkillgraftError
from skillgraft.evaluate import make_evaluator
from skillgraft.evaluate.command import CommandEvaluator, lookup
from skillgraft.evaluate.jsonl import check_constraint, load_items, score_item


def test_exact_match_and_constraints():
    assert score_item(" Red. ", {"answer": "red"})
    assert not score_item("red car", {"answer": "red"})
    c = lambda t, **kw: {"type": t, **kw}  # noqa: E731
    assert check_constraint("RED", c("uppercase"), None) and not check_constraint("Red", c("uppercase"), None)
    assert check_constraint("red", c("lowercase"), None)
    assert check_constraint("The car is red.", c("sentence"), None) and not check_constraint("the car", c("sentence"), None)
    assert check_constraint("[red]", c("wrapped", value="[]"), None)
    assert check_constraint("it is red", c("answer"), "Red") and not check_constraint("reddish", c("answer"), "red")
    assert check_constraint("a b c", c("max_words", value=3), None) and not check_constraint("a b c d", c("max_words", value=3), None)
    assert check_constraint("un deux", c("regex", pattern=r"^\w+ \w+$"), None)
    assert check_constraint("Bonjour", c("starts_with", value="bon"), None)
    item = {"question": "q", "answer": "red", "constraints": [c("uppercase"), c("answer")]}
    assert score_item("RED", item) and not score_item("red", item) and not score_item("BLUE", item)


def test_jsonl_file_validation(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"question": "q", "answer": "a", "language": "fr"}\n\n{"question": "r", "constraints": ["uppercase"]}\n')
    items = load_items(p)
    assert len(items) == 2 and items[1]["constraints"] == [{"type": "uppercase"}]
    for bad, msg in [('{"answer": "a"}', "question"), ('{"question": "q"}', "answer"), ("nope", "JSON"),
                     ('{"question": "q", "answer": "a", "image": "missing.png"}', "image not found"),
                     ('{"question": "q", "constraints": ["shout"]}', "unknown constraint")]:
        p.write_text(bad + "\n")
        with pytest.raises(SkillgraftError, match=msg):
            load_items(p)
    with pytest.raises(SkillgraftError, match="not found"):
        load_items(tmp_path / "none.jsonl")


def test_lookup_dotted_paths():
    data = {"results": {"mme.acc": 0.5, "tasks": [{"acc": 0.25}]}}
    assert lookup(data, "results.mme.acc") == 0.5
    assert lookup(data, "results.tasks.0.acc") == 0.25
    with pytest.raises(KeyError):
        lookup(data, "results.nope")


def test_command_evaluator_json_file_stdout_and_failure(tmp_path):
    model = tmp_path / "my model"  # a space: {model} is shell-quoted
    model.mkdir()
    (model / "config.json").write_text('{"score": 0.75}')
    py = sys.executable
    script = tmp_path / "ev.py"
    script.write_text(
        "import json, sys, pathlib\n"
        "cfg = json.loads(pathlib.Path(sys.argv[1], 'config.json').read_text())\n"
        "res = {'results': {'mme': {'acc': cfg['score']}, 'gen.x': 1}}\n"
        "if len(sys.argv) > 2: pathlib.Path(sys.argv[2], 'r.json').write_text(json.dumps(res))\n"
        "else: print('log line'); print(json.dumps(res))\n"
    )
    ev = CommandEvaluator(f"{py} {script} {{model}} {{out}}", "{out}/*.json",
                          {"general": "results.gen.x", "mme": "results.mme.acc"})
    assert ev.evaluate_dir(model) == {"general": 1.0, "mme": 0.75}
    assert ev.default_target() == ["mme"] and ev.default_retain() == "general"
    ev2 = make_evaluator(CommandEvaluator(f"{py} {script} {{model}}", None, {"mme": "results.mme.acc"}).spec())
    assert ev2.evaluate_dir(model) == {"mme": 0.75}
    with pytest.raises(RuntimeError, match="exited 3"):
        CommandEvaluator(f"{py} -c 'import sys; sys.exit(3)' {{model}}", None, {"a": "a"}).evaluate_dir(model)
    with pytest.raises(RuntimeError, match="no 'results.zz'"):
        CommandEvaluator(f"{py} {script} {{model}}", None, {"a": "results.zz"}).evaluate_dir(model)
    with pytest.raises(SkillgraftError, match="must contain"):
        CommandEvaluator("echo", None, {"a": "a"})


def test_sweep_with_command_evaluator(tmp_path):
    """The command evaluator drives a sweep through merged checkpoints (the streaming path)."""
    from conftest import build_llava_triple

    from skillgraft.recipe import ExpertSpec, Recipe
    from skillgraft.sweep.analysis import load_results
    from skillgraft.sweep.objective import Objective
    from skillgraft.sweep.runner import SweepConfig, run_sweep
    from skillgraft.sweep.space import build_space

    t = build_llava_triple(tmp_path / "m")
    code = ("import json, sys; from toy_evaluator import ToyEvaluator; "
            f"e = ToyEvaluator({str(t.vlm)!r}, {str(t.base)!r}, {str(t.expert)!r}); "
            "print(json.dumps(e.evaluate_dir(sys.argv[1])))")
    cmd = f"{sys.executable} -c {json.dumps(code)} {{model}}"
    spec = CommandEvaluator(cmd, None, {"general": "general", "target": "target"}).spec()
    recipe = Recipe(vlm=str(t.vlm), base=str(t.base), experts=[ExpertSpec(model=str(t.expert))])
    cfg = SweepConfig(recipe, build_space(["ta"], ["scale=0.8"], ["expert"]), spec, Objective(["target"]), report=False)
    res = run_sweep(cfg, tmp_path / "s", log=None)
    assert (res.backend, res.computed, res.failed) == ("streaming", 1, 0)
    r = load_results(tmp_path / "s")
    assert r.trials[0].scores == {"general": 1.0, "target": 1.0}
    assert r.baseline.scores["general"] == 1.0
