"""Hostile input, as a careless user or an attacker would give it.

Every refusal is one ``error:`` line on stderr, exit status 2, no traceback, no OUT (nor a hidden
temporary) left behind, and every input file byte-identical before and after (hashed). The cases
run the real command line (``skillgraft.cli.main``, in this process for speed; in subprocesses where
a second process is the point). docs/reliability.md lists every case and what skillgraft does.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_llava_triple, load_weights
from safetensors.torch import load_file, save_file

from skillgraft import cli, pipeline
from skillgraft.errors import SkillgraftError
from skillgraft.skills import export as skill_export
from skillgraft.skills import extract as skill_extract

VOCAB, VLM_EXTRA = 64, 4


# ----------------------------------------------------------------------------- fixtures and helpers
def tokenizer_json(n: int, extra: tuple[str, ...] = (), swap: tuple[int, int] | None = None) -> str:
    """A word-level tokenizer.json: 4 specials + words up to ``n`` ids, then ``extra`` added tokens."""
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(n - 4)]
    if swap:
        a, b = swap
        words[a], words[b] = words[b], words[a]
    added = [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(extra)]
    return json.dumps({"version": "1.0", "added_tokens": added,
                       "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"}})


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """One small LLaVA triple with tokenizers, shared (read-only) by the module; every test checks it is untouched."""
    t = build_llava_triple(tmp_path_factory.mktemp("hostile"), vocab=VOCAB, vlm_extra_rows=VLM_EXTRA)
    (t.vlm / "tokenizer.json").write_text(tokenizer_json(VOCAB, ("<i0>", "<i1>", "<i2>", "<image>")))
    for d in (t.base, t.expert):
        (d / "tokenizer.json").write_text(tokenizer_json(VOCAB))
    return t


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file, directory and link under ``roots``: a content hash, 'dir' or the link target."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(autouse=True)
def shared_inputs_untouched(w):
    before = snapshot(w.root)
    yield
    assert snapshot(w.root) == before, "an input checkpoint was modified"


def sg(capsys, *args) -> tuple[int, str, str]:
    """Run the command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def merge(w, out, *extra) -> list:
    return ["inject", w.vlm, w.expert, "--base", w.base, "-o", out, "-q", *extra]


def leftovers(out: Path) -> list[str]:
    """OUT itself and any hidden sibling a run left next to it."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def refused(capsys, args, fragment: str, *, inputs=(), out=None) -> str:
    """Run ``args``; assert the contract of a refusal; return the error line."""
    inputs = [Path(p) for p in inputs]
    before = snapshot(*inputs)
    had_out = out is not None and Path(out).exists()
    code, _, err = sg(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    if out is not None:
        left = leftovers(Path(out))
        assert left == ([Path(out).name] if had_out else []), left
    assert snapshot(*inputs) == before, "an input was modified"
    return lines[0]


def copy_ck(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes, n: int | None = None) -> None:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)


def report_of(out: Path) -> dict:
    return json.loads((out / "skillgraft_report.json").read_text())


# ----------------------------------------------------------------------------- 1. output safety
def test_force_refuses_a_user_directory(w, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2")
    refused(capsys, merge(w, mine, "--force"), "did not write", inputs=[mine], out=mine)


def test_force_refuses_the_parent_of_the_inputs(w, capsys):
    refused(capsys, merge(w, w.root, "--force"), "contains the VLM", out=w.root)


def test_force_refuses_the_vlm_itself(w, capsys):
    refused(capsys, merge(w, w.vlm, "--force"), "is the VLM", out=w.vlm)


def test_refuses_an_output_inside_an_input(w, capsys):
    refused(capsys, merge(w, w.expert / "merged"), "lies inside the expert", out=w.expert / "merged")


def test_force_refuses_a_directory_holding_the_recipe(w, tmp_path, capsys):
    d = tmp_path / "recipes"
    d.mkdir()
    recipe = d / "r.yaml"
    recipe.write_text(yaml.safe_dump({"vlm": str(w.vlm), "base": str(w.base), "experts": [{"model": str(w.expert)}]}))
    refused(capsys, ["inject", "--recipe", recipe, "-o", d, "--force", "-q"], "recipe", inputs=[d], out=d)


@pytest.mark.parametrize("force", [True, False])
def test_refuses_the_current_directory(w, tmp_path, capsys, monkeypatch, force):
    cwd = tmp_path / "work"
    cwd.mkdir()
    if force:
        (cwd / "notes.md").write_text("mine")
    monkeypatch.chdir(cwd)
    refused(capsys, merge(w, ".", *(["--force"] if force else [])), "current directory", inputs=[cwd])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_force_refuses_a_parent_of_the_current_directory(w, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    refused(capsys, merge(w, "..", "--force"), "current directory", inputs=[tmp_path / "a"])


def test_force_refuses_the_home_directory(w, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    refused(capsys, merge(w, "~", "--force"), "home directory", inputs=[home])


@pytest.mark.skipif(not os.path.ismount("/proc"), reason="needs /proc as a mount point")
def test_output_that_is_a_mount_point(w, capsys):
    refused(capsys, merge(w, "/proc", "--force"), "mount point")


def test_output_that_is_a_file(w, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("mine")
    refused(capsys, merge(w, f, "--force"), "not a directory", inputs=[f])
    refused(capsys, merge(w, f / "out"), "not a directory", inputs=[f])


def test_nonempty_output_without_force(w, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(capsys, merge(w, out), "--force", inputs=[out], out=out)


def test_force_replaces_a_previous_skillgraft_output(w, tmp_path, capsys):
    out = tmp_path / "out"
    assert sg(capsys, *merge(w, out, "--scale", "0.5"))[0] == 0
    first = report_of(out)["experts"][0]["scale"]
    code, _, err = sg(capsys, *merge(w, out, "--scale", "0.25", "--force"))
    assert code == 0, err
    assert (first, report_of(out)["experts"][0]["scale"]) == (0.5, 0.25)
    assert leftovers(out) == ["out"]


def test_force_refuses_a_previous_output_holding_user_files(w, tmp_path, capsys):
    out = tmp_path / "out"
    assert sg(capsys, *merge(w, out))[0] == 0
    (out / "my_eval.json").write_text('{"mme": 1500}')
    refused(capsys, merge(w, out, "--force"), "my_eval.json", inputs=[out], out=out)


def test_second_run_to_the_same_output_fails_fast(w, tmp_path, capsys, monkeypatch):
    """While one run merges into OUT, a second one is refused at once; the first finishes normally."""
    out = tmp_path / "out"
    started, release = threading.Event(), threading.Event()
    real_run = pipeline.run

    def slow_run(*a, **k):
        started.set()
        assert release.wait(60)
        return real_run(*a, **k)

    monkeypatch.setattr(pipeline, "run", slow_run)
    result: dict = {}

    def first():
        from skillgraft.api import ExpertSpec, Recipe, inject

        result["r"] = inject(Recipe(vlm=str(w.vlm), base=str(w.base), experts=[ExpertSpec(model=str(w.expert))]),
                             out, progress=False)

    th = threading.Thread(target=first)
    th.start()
    try:
        assert started.wait(60)
        line = refused(capsys, merge(w, out), "another skillgraft run")
        assert str(os.getpid()) in line
    finally:
        release.set()
        th.join(60)
    assert result["r"].out_dir == out and (out / "model.safetensors").is_file()
    assert leftovers(out) == ["out"]


def test_concurrent_processes_one_wins(w, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "skillgraft", *map(str, merge(w, out))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = [(p.wait(120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(c for c, _ in res)
    assert codes == [0, 2], res
    err = next(e for c, e in res if c == 2)
    assert "Traceback" not in err and ("another skillgraft run" in err or "--force" in err), err
    assert set(load_weights(out)) and leftovers(out) == ["out"]


def test_files_that_appear_during_the_run_are_kept(w, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_run = pipeline.run

    def run_then_user_writes(*a, **k):
        stats = real_run(*a, **k)
        out.mkdir()
        (out / "notes.txt").write_text("written while skillgraft ran")
        return stats

    monkeypatch.setattr(pipeline, "run", run_then_user_writes)
    code, _, err = sg(capsys, *merge(w, out))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "left untouched" in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name not in ("out",) and not p.name.startswith(".")]
    assert len(kept) == 1 and str(kept[0]) in lines[0]
    assert (kept[0] / "model.safetensors").is_file() and (kept[0] / "skillgraft_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dry_run_checks_the_output(w, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(capsys, merge(w, out, "--dry-run"), "--force", inputs=[out], out=out)
    refused(capsys, merge(w, w.vlm, "--dry-run", "--force"), "is the VLM")
    refused(capsys, merge(w, tmp_path / "new", "--dry-run", "--shard-size", "0"), "shard size", out=tmp_path / "new")


# ----------------------------------------------------------------------------- 1b. skill commands claim OUT as inject does
@pytest.fixture(scope="module")
def skill(w, tmp_path_factory):
    """A skill of the shared expert (outside the shared tree): the input of ``skill export-lora``."""
    out = tmp_path_factory.mktemp("skill") / "skill"
    assert cli.main(["skill", "extract", str(w.expert), "--base", str(w.base), "-o", str(out), "-q",
                     "--format", "lowrank", "--rank", "2"]) == 0
    return out


def skill_cmd(w, skill, cmd, out, *extra) -> list:
    """The arguments of ``cmd`` (inject, skill extract or skill export-lora) writing ``out``."""
    if cmd == "inject":
        return merge(w, out, *extra)
    if cmd == "extract":
        return ["skill", "extract", w.expert, "--base", w.base, "-o", out, "-q", *extra]
    return ["skill", "export-lora", skill, "--vlm", w.vlm, "-o", out, "-q", *extra]


SKILL_CMDS = ["extract", "export-lora"]


@pytest.mark.parametrize("cmd", SKILL_CMDS)
def test_skill_commands_refuse_an_output_in_or_over_an_input(w, skill, tmp_path, capsys, monkeypatch, cmd):
    inputs = [skill]
    if cmd == "extract":
        refused(capsys, skill_cmd(w, skill, cmd, w.expert / "skill"), "lies inside the expert", out=w.expert / "skill")
        refused(capsys, skill_cmd(w, skill, cmd, w.base, "--force"), "is the base", out=w.base)
        refused(capsys, skill_cmd(w, skill, cmd, w.root, "--force"), "contains the expert", out=w.root)
    else:
        refused(capsys, skill_cmd(w, skill, cmd, skill / "adapter"), "lies inside the skill", inputs=inputs,
                out=skill / "adapter")
        refused(capsys, skill_cmd(w, skill, cmd, w.vlm / "adapter"), "lies inside the VLM", inputs=inputs,
                out=w.vlm / "adapter")
        refused(capsys, skill_cmd(w, skill, cmd, skill, "--force"), "is the skill", inputs=inputs, out=skill)
        refused(capsys, skill_cmd(w, skill, cmd, skill.parent, "--force"), "contains the skill", inputs=inputs,
                out=skill.parent)
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "notes.md").write_text("mine")
    monkeypatch.chdir(cwd)
    refused(capsys, skill_cmd(w, skill, cmd, ".", "--force"), "current directory", inputs=[cwd, *inputs])
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    refused(capsys, skill_cmd(w, skill, cmd, "~", "--force"), "home directory", inputs=[home, *inputs])


@pytest.mark.parametrize("cmd", SKILL_CMDS)
def test_skill_commands_force_replaces_their_own_output_only(w, skill, tmp_path, capsys, cmd):
    out = tmp_path / "out"
    first, second = (["--format", "full"], ["--format", "bitdelta"]) if cmd == "extract" else \
        (["--scale", "0.5"], ["--scale", "0.25"])
    assert sg(capsys, *skill_cmd(w, skill, cmd, out, *first))[0] == 0
    before = snapshot(out)
    refused(capsys, skill_cmd(w, skill, cmd, out, *second), "--force", inputs=[skill, out], out=out)
    code, _, err = sg(capsys, *skill_cmd(w, skill, cmd, out, *second, "--force"))
    assert code == 0, err
    assert snapshot(out) != before and leftovers(out) == ["out"]
    if cmd == "extract":
        assert json.loads((out / "skill.json").read_text())["format"] == "bitdelta"
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "skill.json", "skill.safetensors"]
    else:
        assert report_of(out)["scale"] == 0.25
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "skillgraft_report.json"]
    (out / "my_eval.json").write_text('{"mme": 1500}')
    refused(capsys, skill_cmd(w, skill, cmd, out, *first, "--force"), "my_eval.json", inputs=[skill, out], out=out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(capsys, skill_cmd(w, skill, cmd, mine, "--force"), "did not write", inputs=[skill, mine], out=mine)


@pytest.mark.parametrize("cmd", SKILL_CMDS)
def test_skill_commands_lock_the_output(w, skill, tmp_path, capsys, cmd):
    out = tmp_path / "out"
    lock = tmp_path / ".out.skillgraft-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run writing OUT holds it
        os.write(fd, b"4242")
        refused(capsys, skill_cmd(w, skill, cmd, out), "another skillgraft run (pid 4242)", inputs=[skill], out=None)
        assert not out.exists()
    finally:
        os.close(fd)
        lock.unlink()


@pytest.mark.parametrize("cmd", SKILL_CMDS)
def test_skill_commands_leave_nothing_half_written(w, skill, tmp_path, capsys, monkeypatch, cmd):
    """A failure once the weights are written leaves no OUT, no temporary, no lock; a previous output is kept."""
    def fail(*a, **k):
        raise SkillgraftError("disk full (simulated)")

    out = tmp_path / "out"
    assert sg(capsys, *skill_cmd(w, skill, cmd, out))[0] == 0
    before = snapshot(out)
    monkeypatch.setattr(*((skill_extract, "skill_card", fail) if cmd == "extract" else (skill_export, "_card", fail)))
    refused(capsys, skill_cmd(w, skill, cmd, tmp_path / "new"), "disk full", inputs=[skill], out=tmp_path / "new")
    refused(capsys, skill_cmd(w, skill, cmd, out, "--force"), "disk full", inputs=[skill, out], out=out)
    assert snapshot(out) == before


@pytest.mark.parametrize("cmd", ["inject", *SKILL_CMDS])
def test_stale_temporary_of_a_killed_run_is_removed(w, skill, tmp_path, capsys, cmd):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = tmp_path / f".out.skillgraft-tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a checkpoint")
    code, _, err = sg(capsys, *skill_cmd(w, skill, cmd, out))
    assert code == 0, err
    assert not stale.exists() and "stale" in err and stale.name in err
    assert leftovers(out) == ["out"]


# ----------------------------------------------------------------------------- 2. finite numbers
@pytest.mark.parametrize("flags", [
    ["--scale", "nan"], ["--scale", "inf"], ["--scale=-inf"], ["--scale", "1e308"], ["--scale", "0.5,nan"],
    ["--schedule", "nan,1"], ["--schedule", "1,inf"], ["--density", "nan"], ["--density", "inf"],
    ["--method", "della", "--param", "epsilon=nan"], ["--method", "della", "--param", "epsilon=.inf"],
    ["--scale", "nan", "--dry-run"],
])
def test_non_finite_or_huge_numbers_on_the_command_line(w, tmp_path, capsys, flags):
    refused(capsys, merge(w, tmp_path / "out", *flags), "finite", out=tmp_path / "out")


@pytest.mark.parametrize("edit", [
    {"scale": float("nan")}, {"scale": float("inf")}, {"scale": 1e308}, {"scale": [1.0, float("nan")]},
    {"vlm_weight": float("nan")}, {"vlm_density": float("nan")}, {"schedule": [1.0, float("inf")]},
])
def test_non_finite_or_huge_numbers_in_a_recipe(w, tmp_path, capsys, edit):
    expert = {"model": str(w.expert)}
    top = {"vlm": str(w.vlm), "base": str(w.base), "experts": [expert]}
    (expert if "scale" in edit else top).update(edit)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(top))  # YAML writes .nan / .inf
    refused(capsys, ["inject", "--recipe", path, "-o", tmp_path / "out"], "finite", out=tmp_path / "out")


def test_non_finite_numbers_through_the_python_api(w, tmp_path):
    from skillgraft.api import ExpertSpec, Recipe, inject

    with pytest.raises(ValueError, match="finite"):
        ExpertSpec(model=str(w.expert), scale=float("nan"))
    recipe = Recipe(vlm=str(w.vlm), base=str(w.base), experts=[ExpertSpec(model=str(w.expert))])
    with pytest.raises(ValueError, match="finite"):
        recipe.vlm_weight = float("inf")
    sneaked = Recipe.model_construct(**{**dict(recipe), "schedule": [float("nan")]})
    with pytest.raises(SkillgraftError, match="finite"):
        inject(sneaked, tmp_path / "out", progress=False)
    with pytest.raises(SkillgraftError, match="shard size"):
        inject(recipe, tmp_path / "out", shard_size=0, progress=False)
    assert leftovers(tmp_path / "out") == []


def test_shard_size_zero(w, tmp_path, capsys):
    refused(capsys, merge(w, tmp_path / "out", "--shard-size", "0"), "shard size", out=tmp_path / "out")


@pytest.fixture
def poisoned_expert(w, tmp_path):
    """(expert dir, tensor name): a copy of the expert with one weight made NaN."""
    e = copy_ck(w.expert, tmp_path / "expert")
    sd = load_file(e / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name][3, 5] = float("nan")
    save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    return e, name


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_expert_weights(w, tmp_path, capsys, value):
    e = copy_ck(w.expert, tmp_path / "expert")
    sd = load_file(e / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float(value)
    save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out", "-q"], "layers.1.mlp.up_proj",
                   inputs=[e], out=tmp_path / "out")
    assert "model.safetensors" in line


def test_float16_overflow(w, tmp_path, capsys):
    e = copy_ck(w.expert, tmp_path / "expert")
    sd = load_file(e / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = 60000.0  # x scale 2 = 120000 > float16's 65504
    save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out", "-q", "--scale", "2",
                     "--dtype", "float16"], "layers.0.mlp.down_proj", inputs=[e], out=tmp_path / "out")


def test_report_is_strict_json(tmp_path):
    from skillgraft.report import write_json

    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), -float("inf")], "c": {"d": 1.5}})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert data == {"a": "nan", "b": ["inf", "-inf"], "c": {"d": 1.5}}


# ----------------------------------------------------------------------------- 3. safetensors headers
def _by_offset(h: dict) -> list[str]:
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _negative_begin(h, d):  # the first tensor's bytes would be the end of the header itself
    k = _by_offset(h)[0]
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b - 64, e - 64]
    return h, d, None


def _overlap(h, d):  # two tensors of one size share their bytes
    sizes: dict = {}
    for k in _by_offset(h):
        b, e = h[k]["data_offsets"]
        if e - b in sizes:
            h[k]["data_offsets"] = list(h[sizes[e - b]]["data_offsets"])
            return h, d, None
        sizes[e - b] = k
    raise AssertionError("no two tensors of one size")


def _trailing_bytes(h, d):
    return h, d + b"\0" * 16, None


def _wrong_shape(h, d):
    k = _by_offset(h)[-1]
    h[k]["shape"] = [3, 3]
    return h, d, None


def _truncated(h, d):
    return h, d[:-100], None


def _unknown_dtype(h, d):
    h[_by_offset(h)[0]]["dtype"] = "Q7"
    return h, d, None


def _header_past_the_end(h, d):
    return h, d, 10**7


def _negative_dim(h, d):
    k = _by_offset(h)[0]
    h[k]["shape"] = [-1, *h[k]["shape"][1:]]
    return h, d, None


@pytest.mark.parametrize("mutate,fragment", [
    (_negative_begin, "data_offsets"), (_overlap, "overlap"), (_trailing_bytes, "cover"), (_wrong_shape, "shape"),
    (_truncated, "truncated"), (_unknown_dtype, "unknown dtype 'Q7'"), (_header_past_the_end, "header"),
    (_negative_dim, "shape"),
])
def test_malformed_safetensors_expert(w, tmp_path, capsys, mutate, fragment):
    e = copy_ck(w.expert, tmp_path / "expert")
    h, d = read_st(e / "model.safetensors")
    write_st(e / "model.safetensors", *mutate(h, d))
    line = refused(capsys, ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out"], fragment,
                   inputs=[e], out=tmp_path / "out")
    assert "model.safetensors" in line


# ----------------------------------------------------------------------------- 4. paths
def _sharded_elsewhere(w, tmp_path, name_of) -> Path:
    """An expert copy whose weights sit outside it, named by its index through ``name_of(elsewhere_file)``."""
    e = copy_ck(w.expert, tmp_path / "ck" / "expert")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "x.safetensors"
    (e / "model.safetensors").rename(target)
    shard = name_of(e, target)
    names = list(load_file(target))
    (e / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    return e


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_naming_a_shard_outside_the_checkpoint(w, tmp_path, capsys, how):
    def name_of(e, target):
        if how == "dotdot":
            return "../../elsewhere/x.safetensors"
        if how == "absolute":
            return str(target)
        (e / "model-00001-of-00001.safetensors").symlink_to(target)
        return "model-00001-of-00001.safetensors"

    e = _sharded_elsewhere(w, tmp_path, name_of)
    args = ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out"]
    for extra in ([], ["--dry-run"]):
        refused(capsys, args + extra, "outside the checkpoint", inputs=[tmp_path / "ck", tmp_path / "elsewhere"],
                out=tmp_path / "out")


@pytest.mark.parametrize("weight_map,fragment", [
    ('"model.safetensors"', "weight_map"), ('{"a": 1}', "weight_map"), ('[]', "weight_map"), (None, "not valid JSON"),
])
def test_malformed_index(w, tmp_path, capsys, weight_map, fragment):
    e = copy_ck(w.expert, tmp_path / "expert")
    text = "{not json" if weight_map is None else f'{{"weight_map": {weight_map}}}'
    (e / "model.safetensors.index.json").write_text(text)
    refused(capsys, ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out"], fragment,
            inputs=[e], out=tmp_path / "out")


def test_side_file_symlinks_leaving_the_checkpoint_are_skipped(w, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    v = copy_ck(w.vlm, tmp_path / "vlm")
    (v / "notes.txt").symlink_to(secret)
    (v / "alias.json").symlink_to("tokenizer_config.json")  # a link inside the checkpoint is followed
    (v / "gone.txt").symlink_to(tmp_path / "nothing-here")
    os.mkfifo(v / "pipe")  # copying it would block forever
    out = tmp_path / "out"
    code, _, err = sg(capsys, "inject", v, w.expert, "--base", w.base, "-o", out, "-q")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and "notes.txt" in err
    assert (out / "alias.json").read_text() == (v / "tokenizer_config.json").read_text()
    assert not (out / "alias.json").is_symlink()
    skipped = {s["name"]: s["reason"] for s in report_of(out)["skipped_files"]}
    assert sorted(skipped) == ["gone.txt", "notes.txt", "pipe"] and "outside" in skipped["notes.txt"]
    assert not (out / "pipe").exists() and not (out / "gone.txt").exists()


# ----------------------------------------------------------------------------- 5. structure and lineage
@pytest.mark.parametrize("config,fragment", [
    (None, "config.json"), ("[1, 2]", "config.json"), ('{"model_type": "llava", "text_config": "llama"}', "text_config"),
    ("{oops", "not valid JSON"),
])
def test_vlm_config(w, tmp_path, capsys, config, fragment):
    v = copy_ck(w.vlm, tmp_path / "vlm")
    if config is None:
        (v / "config.json").unlink()
    else:
        (v / "config.json").write_text(config)
    refused(capsys, ["inject", v, w.expert, "--base", w.base, "-o", tmp_path / "out"], fragment,
            inputs=[v], out=tmp_path / "out")


def test_expert_config_that_is_a_list(w, tmp_path, capsys):
    e = copy_ck(w.expert, tmp_path / "expert")
    (e / "config.json").write_text("[]")
    refused(capsys, ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out"], "config.json",
            inputs=[e], out=tmp_path / "out")


@pytest.fixture
def qwen_expert(w, tmp_path):
    """The expert relabelled as a Qwen2 model (same shapes) with Qwen2's q_proj bias added."""
    e = copy_ck(w.expert, tmp_path / "qwen")
    cfg = json.loads((e / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (e / "config.json").write_text(json.dumps(cfg))
    sd = load_file(e / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    return e


def test_expert_of_another_architecture(w, tmp_path, capsys, qwen_expert):
    args = ["inject", w.vlm, qwen_expert, "--base", w.base, "-o", tmp_path / "out", "-q"]
    refused(capsys, args, "--allow-arch-mismatch", inputs=[qwen_expert], out=tmp_path / "out")
    code, _, err = sg(capsys, *args, "--allow-arch-mismatch")
    assert code == 0, err
    assert "'llama'" in err and "'qwen2'" in err and "model.layers.0.self_attn.q_proj.bias" in err


@pytest.mark.parametrize("fmt", ["tokenizer.json", "vocab.json"])
def test_expert_whose_token_ids_differ(w, tmp_path, capsys, fmt):
    e = copy_ck(w.expert, tmp_path / "expert")
    if fmt == "vocab.json":  # GPT-2 style files; the VLM's and base's tokenizer.json are compared with it
        (e / "tokenizer.json").unlink()
        vocab = json.loads(tokenizer_json(VOCAB, swap=(10, 11)))["model"]["vocab"]
        (e / "vocab.json").write_text(json.dumps(vocab))
    else:
        (e / "tokenizer.json").write_text(tokenizer_json(VOCAB, swap=(10, 11)))
    args = ["inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out", "-q"]
    line = refused(capsys, args, "token ids differ", inputs=[e], out=tmp_path / "out")
    assert "id 10" in line and "'w6'" in line and "'w7'" in line
    refused(capsys, [*args, "--dry-run"], "token ids differ", inputs=[e])
    refused(capsys, [*args, "--exclude", "attention"], "token ids differ", inputs=[e])
    code, _, err = sg(capsys, *args, "--allow-vocab-mismatch")
    assert code == 0, err
    assert "token ids differ" in err  # still said, as a warning
    code, _, err = sg(capsys, "inject", w.vlm, e, "--base", w.base, "--exclude", "embed,lm_head", "--dry-run")
    assert code == 0, err


def test_missing_tokenizer_is_a_warning(w, tmp_path, capsys):
    e = copy_ck(w.expert, tmp_path / "expert")
    (e / "tokenizer.json").unlink()
    code, _, err = sg(capsys, "inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert "warning:" in err and "tokenizer" in err and "expert" in err


def test_unrelated_weights_in_any_tensor_are_noticed(w, tmp_path, capsys):
    e = copy_ck(w.expert, tmp_path / "expert")
    sd = load_file(e / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"
    g = torch.Generator().manual_seed(0)
    sd[name] = torch.randn(sd[name].shape, generator=g) * sd[name].std()
    save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    code, _, err = sg(capsys, "inject", w.vlm, e, "--base", w.base, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert "expert looks unrelated to the base" in err and "layers.0.mlp.gate_proj" in err


# ----------------------------------------------------------------------------- 6. one line, always
def _sweep_args(w, out, *extra):
    return ["sweep", w.vlm, w.expert, "--base", w.base, "--vary", "scale=0.5", "-o", out, "-q", "--eval", "command",
            "--eval-metric", "general=general", "--target", "general", *extra]


def test_corrupt_sweep_store(w, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.db").write_bytes(b"this is not a database" * 100)
    cmd = f"{sys.executable} -c pass {{model}}"
    line = refused(capsys, _sweep_args(w, out, "--eval-command", cmd), "sweep.db", inputs=[out])
    assert "move it away" in line


def test_evaluator_failing_on_the_baseline(w, tmp_path, capsys):
    script = tmp_path / "ev.py"
    script.write_text("import sys\nprint('loading', sys.argv[1], file=sys.stderr)\nprint('CUDA out of memory', file=sys.stderr)\nsys.exit(3)\n")
    out = tmp_path / "sweep"
    line = refused(capsys, _sweep_args(w, out, "--eval-command", f"{sys.executable} {script} {{model}}"), "baseline",
                   inputs=[script], out=out)
    assert "CUDA out of memory" in line and "exited 3" in line


def test_evaluator_failing_on_every_point(w, tmp_path, capsys):
    script = tmp_path / "ev.py"
    script.write_text("import sys, json\n"
                      "if 'skillgraft-sweep' in sys.argv[1]: print('bad point', file=sys.stderr); sys.exit(1)\n"
                      "print(json.dumps({'general': 1.0}))\n")
    out = tmp_path / "sweep"
    line = refused(capsys, _sweep_args(w, out, "--eval-command", f"{sys.executable} {script} {{model}}"),
                   "every trial failed", inputs=[script])
    assert "ta scale=0.5" in line and "bad point" in line


def test_missing_ray_leaves_no_sweep_directory(w, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "sweep"
    refused(capsys, _sweep_args(w, out, "--eval-command", f"{sys.executable} -c pass {{model}}", "--ray-address", "auto"),
            "ray", out=out)


@pytest.fixture
def bin_checkpoints(tmp_path):
    """An unsafe torch file (it pickles a class) and a benign legacy (non-zip) one, each an LLM's pytorch_model.bin."""
    unsafe, legacy = tmp_path / "unsafe", tmp_path / "legacy"
    for d in (unsafe, legacy):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    torch.save({"w": subprocess.Popen}, unsafe / "pytorch_model.bin")
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, legacy / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    return unsafe, legacy


def test_eval_on_unsafe_and_legacy_bin(bin_checkpoints, capsys):
    unsafe, legacy = bin_checkpoints
    refused(capsys, ["eval", unsafe, "-q"], "weights_only", inputs=[unsafe])
    line = refused(capsys, ["eval", legacy, "-q"], "legacy", inputs=[legacy])
    assert "torch.save" in line


def test_inject_with_a_legacy_bin_expert(w, bin_checkpoints, tmp_path, capsys):
    _, legacy = bin_checkpoints
    line = refused(capsys, ["inject", w.vlm, legacy, "--base", w.base, "-o", tmp_path / "out"], "legacy",
                   inputs=[legacy], out=tmp_path / "out")
    assert "cannot be read safely" not in line


@pytest.mark.parametrize("limit", ["-3", "0"])
def test_eval_limit_must_be_positive(w, capsys, limit):
    refused(capsys, ["eval", w.vlm, "--limit", limit, "-q"], "--limit")


def test_unknown_device(w, tmp_path, capsys):
    refused(capsys, merge(w, tmp_path / "out", "--device", "tpu9"), "device", out=tmp_path / "out")


def test_expert_that_is_a_file(w, tmp_path, capsys):
    f = tmp_path / "expert.safetensors"
    shutil.copy(w.expert / "model.safetensors", f)
    refused(capsys, ["inject", w.vlm, f, "--base", w.base, "-o", tmp_path / "out"], "directory",
            inputs=[f], out=tmp_path / "out")


# ----------------------------------------------------------------------------- 7. sweeps and commands
@pytest.mark.parametrize("vary,fragment", [
    (["scale=0:1e9:1e-9"], "points"),
    (["scale=0:1:0.01", "density=0.01:1:0.01"], "10,000"),
])
def test_grids_too_large_are_refused_before_they_are_built(w, tmp_path, capsys, vary, fragment):
    args = ["sweep", w.vlm, w.expert, "--base", w.base, "--method", "dare", "-o", tmp_path / "s", "-q"]
    for v in vary:
        args += ["--vary", v]
    refused(capsys, args, fragment, out=tmp_path / "s")


@pytest.mark.parametrize("flags,fragment", [
    (["--min-retention", "nan"], "--min-retention"), (["--ray-cpus-per-trial", "nan"], "--ray-cpus-per-trial"),
    (["--ray-workers", "0"], "--ray-workers"), (["--limit", "-3"], "--limit"), (["--trials", "0"], "--trials"),
    (["--vary", "scale=0:inf:0.1"], "finite"), (["--vary", "density=0,1"], "densities"),
])
def test_sweep_numbers(w, tmp_path, capsys, flags, fragment):
    args = ["sweep", w.vlm, w.expert, "--base", w.base, "-o", tmp_path / "s", "-q", *flags]
    refused(capsys, args, fragment, out=tmp_path / "s")


def test_eval_command_runs_without_a_shell(tmp_path):
    from skillgraft.evaluate import CommandEvaluator

    model = tmp_path / "a b'; touch PWNED; echo '$(touch PWNED2)"
    model.mkdir()
    script = tmp_path / "argv.py"
    script.write_text("import json, sys\nprint(json.dumps({'n': len(sys.argv) - 1, 'model': sys.argv[1], 'kw': sys.argv[2]}))\n")
    ev = CommandEvaluator(f"{sys.executable} {script} {{model}} --out={{out}}", None, {"n": "n"})
    assert ev.evaluate_dir(model) == {"n": 2.0}
    # a shell is an explicit opt-in; the paths reach it as variables, so quoting them cannot break out
    for template in ("'{model}'", '"{model}"', "{model}"):
        ev = CommandEvaluator(f"cd {template} && {sys.executable} {script} . x | cat", None, {"n": "n"}, shell=True)
        assert ev.evaluate_dir(model) == {"n": 2.0}
    assert not list(tmp_path.rglob("PWNED*"))
    with pytest.raises(SkillgraftError, match="quote"):
        CommandEvaluator("python 'unclosed {model}", None, {"n": "n"})
    with pytest.raises(SkillgraftError, match="not found"):
        CommandEvaluator("no-such-evaluator-program {model}", None, {"n": "n"})
