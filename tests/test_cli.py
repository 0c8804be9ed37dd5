"""The command line contract: exit 0 on success; exit 2, one `error:` line and no OUT on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import build_llava_triple, load_weights

from skillgraft import cli, engine


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skillgraft", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_inject_success(llava_triple, tmp_path):
    t = llava_triple
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "--scale", "0.5", "-o", tmp_path / "out", "-q")
    assert p.returncode == 0, p.stderr
    assert "21 tensors merged" in p.stdout and (tmp_path / "out" / "skillgraft_report.json").is_file()


def test_dry_run_prints_plan_and_writes_nothing(llava_triple, tmp_path):
    t = llava_triple
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "--dry-run", "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in p.stdout
    assert "48 tensors: 21 merged (2 row-sliced), 27 copied" in p.stdout
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """Experts that cannot derive from the VLM's base: wider, deeper."""
    root = tmp_path_factory.mktemp("bad")
    wide = build_llava_triple(root / "wide", hidden=48)
    deep = build_llava_triple(root / "deep", layers=3)
    return wide.expert, deep.expert


def test_missing_checkpoint(llava_triple, tmp_path):
    t = llava_triple
    p = run_cli("inject", t.vlm, tmp_path / "nope", "--base", t.base, "-o", tmp_path / "out")
    assert_user_error(p, "not found")
    assert not (tmp_path / "out").exists()


def test_hidden_size_mismatch(llava_triple, mismatched, tmp_path):
    t = llava_triple
    p = run_cli("inject", t.vlm, mismatched[0], "--base", t.base, "-o", tmp_path / "out")
    assert_user_error(p, "hidden size mismatch")
    assert not (tmp_path / "out").exists()


def test_layer_count_mismatch(llava_triple, mismatched, tmp_path):
    t = llava_triple
    p = run_cli("inject", t.vlm, mismatched[1], "--base", t.base, "-o", tmp_path / "out")
    assert_user_error(p, "layer count mismatch")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(llava_triple, tmp_path):
    t = llava_triple
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "-o", out)
    assert_user_error(p, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "-o", out, "--force", "-q")
    assert_user_error(p, "did not write")  # --force replaces only a previous skillgraft output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli("inject", t.vlm, t.expert, "--base", t.base, "-o", out, "-q").returncode == 0
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "-o", out, "--force", "-q", "--scale", "0.5")
    assert p.returncode == 0 and (out / "model.safetensors").is_file()


def test_missing_base_for_task_vector_method(llava_triple, tmp_path):
    p = run_cli("inject", llava_triple.vlm, llava_triple.expert, "-o", tmp_path / "out")
    assert_user_error(p, "needs --base")


def test_bad_arguments_are_one_line(llava_triple, tmp_path):
    t = llava_triple
    assert_user_error(run_cli("inject", t.vlm, t.expert, "--base", t.base, "--method", "nope", "-o", tmp_path / "o"), "unknown method 'nope'")
    assert_user_error(run_cli("inject", t.vlm, t.expert, "--base", t.base, "--density", "0", "-o", tmp_path / "o"), "density")
    assert_user_error(run_cli("inject", t.vlm, t.expert, "--base", t.base, "--param", "bogus=1", "-o", tmp_path / "o"), "no parameter 'bogus'")
    assert_user_error(run_cli("inject", t.vlm, t.expert, "--base", t.base), "-o OUT")
    assert not (tmp_path / "o").exists()


def test_recipe_with_two_experts(llava_triple, tmp_path):
    t = llava_triple
    recipe = {
        "vlm": str(t.vlm), "base": str(t.base), "method": "ta",
        "experts": [{"model": str(t.expert), "name": "a", "scale": 0.25}, {"model": str(t.expert), "name": "b", "scale": 0.5}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    p = run_cli("inject", "--recipe", path, "-o", tmp_path / "out", "-q")
    assert p.returncode == 0, p.stderr
    got, v = load_weights(tmp_path / "out"), load_weights(t.vlm)
    e, b = load_weights(t.expert), load_weights(t.base)
    n, s = "language_model.model.norm.weight", "model.norm.weight"
    torch.testing.assert_close(got[n], v[n] + 0.75 * (e[s] - b[s]), rtol=0, atol=1e-6)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vlm: [unclosed")
    assert_user_error(run_cli("inject", "--recipe", bad, "-o", tmp_path / "o"), "not valid YAML")
    bad.write_text("vlm: x\nexperts: []\n")
    assert_user_error(run_cli("inject", "--recipe", bad, "-o", tmp_path / "o"), "experts")
    bad.write_text("vlm: x\nexperts: [{model: y}]\nmethod: magic\n")
    assert_user_error(run_cli("inject", "--recipe", bad, "-o", tmp_path / "o"), "unknown method")
    assert_user_error(run_cli("inject", "--recipe", tmp_path / "none.yaml", "-o", tmp_path / "o"), "recipe file not found")


def test_interrupted_run_leaves_nothing(llava_triple, tmp_path, monkeypatch, capsys):
    """An interrupt in the middle of streaming leaves neither OUT nor a temporary directory."""
    calls = {"n": 0}
    real = engine.merge_entry

    def interrupt_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "merge_entry", interrupt_midway)
    t = llava_triple
    code = cli.main(["inject", str(t.vlm), str(t.expert), "--base", str(t.base), "-o", str(tmp_path / "out"), "-q"])
    assert code == 130 and calls["n"] == 10
    assert "error: interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unrelated_expert_warns_but_merges(llava_triple, tmp_path):
    other = build_llava_triple(tmp_path / "other", seed=5)
    t = llava_triple
    p = run_cli("inject", t.vlm, other.expert, "--base", t.base, "-o", tmp_path / "out", "-q")
    assert p.returncode == 0
    assert "warning: expert looks unrelated to the base" in p.stderr


def test_methods_listing():
    p = run_cli("methods")
    assert p.returncode == 0 and "dare_ties" in p.stdout and "Yadav" in p.stdout


def test_exclude_and_schedule_flags(llava_triple, tmp_path):
    t = llava_triple
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "--exclude", "embed,lm_head", "--scale", "0,1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "2 excluded (embed) by exclude filter" not in p.stdout  # one embed, one head
    assert "excluded (embed) by exclude filter" in p.stdout and "excluded (lm_head) by exclude filter" in p.stdout
    p = run_cli("inject", t.vlm, t.expert, "--base", t.base, "--scale", "0,1,x", "-o", tmp_path / "o")
    assert_user_error(p, "comma-separated numbers")
