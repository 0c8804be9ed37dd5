"""Skill vectors: extraction in every format, injection without expert or base, lineage, bad skills.

The expected merge is computed here from the checkpoints' own tensors (``vf.read_safetensors``)
and skillgraft's output for ``inject VLM EXPERT --base BASE``; a full skill must give the same
checkpoint. Compressed formats are compared with the true task vector ``expert - base``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import vlm_factories as vf
from conftest import build_llava_triple, load_weights

from skillgraft import cli
from skillgraft.api import (
    ExpertSpec,
    Recipe,
    SkillSettings,
    extract_skill,
    inject,
    skill_info,
)
from skillgraft.errors import SkillgraftError
from skillgraft.skills import SkillReader, compress

SCALE = 0.7


def run_cli(*args) -> subprocess.CompletedProcess:
    """The command line, in this process (a subprocess would spend seconds importing torch)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def assert_user_error(p: subprocess.CompletedProcess, fragment: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert fragment in lines[0], lines[0]


def _inject(vlm, expert, out, base=None, scale=SCALE, **kw):
    recipe = Recipe(vlm=str(vlm), base=str(base) if base else None, experts=[ExpertSpec(model=str(expert), scale=scale)], **kw)
    return inject(recipe, out, progress=False)


def _true_deltas(expert, base) -> dict[str, torch.Tensor]:
    E, B = vf.read_safetensors(expert), vf.read_safetensors(base)
    return {k: E[k].float() - B[k].float() for k in E if E[k].is_floating_point()}


# ------------------------------------------------------------------ full skills == expert + base


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return tmp_path_factory.mktemp("skill_families")


@pytest.mark.parametrize("family", vf.FAMILY_NAMES)
def test_full_skill_injects_like_expert_and_base(families, family):
    b = vf.build(family, families / family)
    skill = families / f"{family}-skill"
    extract_skill(str(b.expert), str(b.base), skill, progress=False)
    via_expert = _inject(b.vlm, b.expert, families / f"{family}-e", base=b.base)
    via_skill = _inject(b.vlm, skill, families / f"{family}-s")  # no base
    O1, O2 = load_weights(via_expert.out_dir), load_weights(via_skill.out_dir)
    assert O1.keys() == O2.keys()
    for k in O1:
        assert O1[k].dtype == O2[k].dtype
        assert torch.allclose(O1[k].float(), O2[k].float(), atol=1e-6, rtol=1e-6), k
    assert via_skill.report["counts"] == via_expert.report["counts"]
    assert via_skill.report["expert_sources"][skill.name]["kind"] == "skill"
    assert via_skill.report["expert_sources"][skill.name]["lineage_distance"] < 0.1


def test_bf16_full_skill_within_one_rounding(tmp_path):
    b = vf.build("qwen2_vl", tmp_path / "q", dtype=torch.bfloat16)
    extract_skill(str(b.expert), str(b.base), tmp_path / "skill", progress=False)
    O1 = load_weights(_inject(b.vlm, b.expert, tmp_path / "e", base=b.base).out_dir)
    O2 = load_weights(_inject(b.vlm, tmp_path / "skill", tmp_path / "s").out_dir)
    V = load_weights(b.vlm)
    for k in O1:  # the delta itself is stored in bfloat16: one bfloat16 step of the result or of the delta apart
        assert O2[k].dtype == torch.bfloat16
        diff = (O1[k].float() - O2[k].float()).abs()
        step = 2 ** -7 * (O1[k].float().abs() + (O1[k].float() - V[k].float()).abs())
        assert bool((diff <= step + 1e-7).all()), k


# ------------------------------------------------------------------ compressed formats


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return build_llava_triple(tmp_path_factory.mktemp("skill_llava"), hidden=48, layers=2)


FORMAT_CASES = [
    ("lowrank-rank", SkillSettings(format="lowrank", rank=5)),
    ("lowrank-energy", SkillSettings(format="lowrank", energy=0.8)),
    ("lowrank-bf16", SkillSettings(format="lowrank", rank=8, dtype="bfloat16")),
    ("bitdelta", SkillSettings(format="bitdelta")),
    ("bitdelta-bf16", SkillSettings(format="bitdelta", dtype="bfloat16")),
    ("sparse", SkillSettings(format="sparse", density=0.1)),
    ("sparse-bf16", SkillSettings(format="sparse", density=0.3, dtype="bfloat16")),
]


@pytest.mark.parametrize("label,settings", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_compressed_format_reconstructs_within_recorded_error(triple, tmp_path, label, settings):
    out = tmp_path / label
    res = extract_skill(str(triple.expert), str(triple.base), out, settings, progress=False)
    true = _true_deltas(triple.expert, triple.base)
    kinds = set()
    with SkillReader(out) as r:
        for name, info in res.meta["tensors"].items():
            got = r.get(name)
            ref = true[name]
            assert got.shape == ref.shape and got.dtype == torch.float32
            err = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
            assert err <= info["rel_error"] * (1 + 1e-3) + 1e-6, (name, err, info["rel_error"])
            assert math.isclose(info["delta_norm"], float(torch.linalg.vector_norm(ref)), rel_tol=1e-4)
            kinds.add(info["kind"])
            # a leading block of rows is computed on its own and matches
            if got.dim() == 2:
                assert torch.allclose(r.get_rows(name, 3), got[:3], atol=1e-6)
    assert settings.format in kinds and (len(kinds) == 1 or kinds == {settings.format, "full"})
    info = skill_info(out)
    assert info["format"] == settings.format and info["size_bytes"] < 1.1 * info["expert_lm_bytes"]
    if settings.format == "lowrank" and settings.rank:
        ranks = {t["rank"] for t in res.meta["tensors"].values() if t["kind"] == "lowrank"}
        assert ranks == {settings.rank}
    # the skill injects without its expert and its base
    merged = _inject(triple.vlm, out, tmp_path / "merged")
    assert merged.report["counts"]["merged"] == 21


def test_lowrank_is_the_truncated_svd_and_energy_picks_the_rank():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 30, generator=g) @ torch.diag(torch.logspace(0, -3, 30)) @ torch.randn(30, 30, generator=g)
    b, a = compress.lowrank_factors(d, rank=4)
    s = torch.linalg.svdvals(d)
    err = float(torch.linalg.vector_norm(d - b @ a))
    assert math.isclose(err, float(s[4:].square().sum().sqrt()), rel_tol=1e-4)  # Eckart-Young
    b, a = compress.lowrank_factors(d, energy=0.9)
    r = a.shape[0]
    kept = s.square().cumsum(0) / s.square().sum()
    assert kept[r - 1] >= 0.9 - 1e-6 and (r == 1 or kept[r - 2] < 0.9)


def test_large_matrices_use_randomised_and_gram_paths(monkeypatch):
    g = torch.Generator().manual_seed(1)
    d = torch.randn(90, 6, generator=g) @ torch.randn(6, 60, generator=g) + 1e-3 * torch.randn(90, 60, generator=g)
    exact_b, exact_a = compress.lowrank_factors(d, rank=6)
    monkeypatch.setattr(compress, "EXACT_SVD_MAX", 16)
    for kw in ({"rank": 6}, {"energy": 0.999}):
        b, a = compress.lowrank_factors(d, **kw)
        assert a.shape[0] == 6
        assert torch.allclose(b @ a, exact_b @ exact_a, atol=1e-3)
    b, a = compress.lowrank_factors(d.T.contiguous(), energy=0.999)  # a wide matrix: the other Gram side
    assert a.shape[0] == 6 and torch.allclose(b @ a, (exact_b @ exact_a).T, atol=1e-3)


def test_bitdelta_scale_is_the_mean_absolute_row_and_signs_round_trip():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(7, 13, generator=g)
    packed = compress.pack_signs(d)
    assert packed.shape == (7, 2) and packed.dtype == torch.uint8
    assert torch.equal(compress.unpack_signs(packed, 13), torch.where(d >= 0, 1.0, -1.0))
    scale = compress.bitdelta_scales(d)
    approx = compress.bitdelta_rows(packed, scale, 13)
    # for a fixed sign pattern, no other per-row scale is closer in L2
    for f in (0.9, 1.1):
        worse = compress.bitdelta_rows(packed, scale * f, 13)
        assert float((d - approx).square().sum()) < float((d - worse).square().sum())


def test_sparse_keeps_the_largest_entries():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(9, 11, generator=g)
    rowptr, col, val = compress.sparse_rows(d, 0.2)
    k = int(0.2 * d.numel())
    assert val.numel() == k
    dense = compress.sparse_to_dense(rowptr, col, val, 11)
    kept = dense != 0
    assert kept.sum() == k and float(d.abs()[kept].min()) >= float(d.abs()[~kept].max())
    assert torch.equal(dense[kept], d[kept])


def test_large_skills_are_sharded(triple, tmp_path):
    out = tmp_path / "sharded"
    extract_skill(str(triple.expert), str(triple.base), out, shard_size="20KB", progress=False)
    assert (out / "skill.safetensors.index.json").is_file() and not (out / "skill.safetensors").exists()
    a = _inject(triple.vlm, out, tmp_path / "a")
    b = _inject(triple.vlm, triple.expert, tmp_path / "b", base=triple.base)
    A, B = load_weights(a.out_dir), load_weights(b.out_dir)
    assert all(torch.allclose(A[k], B[k], atol=1e-6) for k in A)


def test_skill_metadata(triple, tmp_path):
    res = extract_skill(str(triple.expert), str(triple.base), tmp_path / "s", progress=False)
    meta = json.loads((tmp_path / "s" / "skill.json").read_text())
    assert meta["skillgraft_skill"] == 1 and meta["format"] == "full"
    assert meta["base"]["model_type"] == "llama" and meta["base"]["n_layers"] == 2
    assert set(meta["base"]["shapes"]) == set(meta["tensors"]) == set(res.meta["tensors"])
    assert all(n.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head")) for n in meta["tensors"])
    fp = meta["fingerprint"]["tensors"]
    assert "model.embed_tokens.weight" in fp and len(fp) >= 3
    B = vf.read_safetensors(triple.base)
    for name, t in fp.items():  # the fingerprint holds the base's own values
        ref = B[name][t["rows"]][:, t["cols"]]
        assert torch.allclose(torch.tensor(t["values"]), ref, rtol=1e-6, atol=1e-9)
    assert (tmp_path / "s" / "README.md").read_text().startswith("---")


# ------------------------------------------------------------------ several skills, mixes, modes


def test_two_skills_compose_each_with_its_scale(triple, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    extract_skill(str(triple.expert), str(triple.base), s1, SkillSettings(format="lowrank", rank=3), progress=False)
    extract_skill(str(triple.expert), str(triple.base), s2, SkillSettings(format="bitdelta"), progress=False)
    recipe = Recipe(vlm=str(triple.vlm), experts=[ExpertSpec(model=str(s1), scale=0.4), ExpertSpec(model=str(s2), scale=-0.3)])
    O = load_weights(inject(recipe, tmp_path / "out", progress=False).out_dir)
    V = load_weights(triple.vlm)
    with SkillReader(s1) as r1, SkillReader(s2) as r2:
        for n in r1.names:
            vk = "language_model." + n  # the legacy LLaVA layout save_pretrained writes
            want = V[vk].clone()
            rows = r1.shape(n)[0]
            want[:rows] += 0.4 * r1.get(n) - 0.3 * r2.get(n)
            assert torch.allclose(O[vk], want, atol=1e-6), n


def test_skill_with_base_in_symmetric_mode_and_mixed_with_an_expert(triple, tmp_path):
    skill = tmp_path / "s"
    extract_skill(str(triple.expert), str(triple.base), skill, progress=False)
    for kw in ({"mode": "symmetric", "method": "ties", "parameters": {}}, {"method": "linear"}):
        a = _inject(triple.vlm, skill, tmp_path / f"a{len(kw)}", base=triple.base, **kw)
        b = _inject(triple.vlm, triple.expert, tmp_path / f"b{len(kw)}", base=triple.base, **kw)
        A, B = load_weights(a.out_dir), load_weights(b.out_dir)
        assert all(torch.allclose(A[k], B[k], atol=1e-5) for k in A), kw
    mixed = Recipe(vlm=str(triple.vlm), base=str(triple.base),
                   experts=[ExpertSpec(model=str(skill), scale=0.5), ExpertSpec(model=str(triple.expert), scale=0.5)])
    A = load_weights(inject(mixed, tmp_path / "mixed", progress=False).out_dir)
    B = load_weights(_inject(triple.vlm, triple.expert, tmp_path / "one", base=triple.base, scale=1.0).out_dir)
    assert all(torch.allclose(A[k], B[k], atol=1e-5) for k in A)


def test_skill_refuses_what_needs_the_base(triple, tmp_path):
    skill = tmp_path / "s"
    extract_skill(str(triple.expert), str(triple.base), skill, progress=False)
    assert_user_error(run_cli("inject", triple.vlm, skill, "--method", "linear", "-o", tmp_path / "o"), "interpolates whole")
    assert_user_error(run_cli("inject", triple.vlm, skill, "--mode", "symmetric", "-o", tmp_path / "o"), "symmetric mode")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ lineage


def test_skill_from_another_base_is_refused(triple, tmp_path):
    stranger = build_llava_triple(tmp_path / "stranger", hidden=48, layers=2, seed=7)  # another random base
    skill = tmp_path / "foreign"
    extract_skill(str(stranger.expert), str(stranger.base), skill, progress=False)
    p = run_cli("inject", triple.vlm, skill, "-o", tmp_path / "o", "-q")
    assert_user_error(p, "extracted from another base")
    dist = float(p.stderr.split("relative distance ")[1].split()[0])
    assert dist > 1.0
    assert not (tmp_path / "o").exists()
    p = run_cli("inject", triple.vlm, skill, "-o", tmp_path / "o", "-q", "--ignore-lineage")
    assert p.returncode == 0 and "another base" in p.stderr
    own = tmp_path / "own"
    extract_skill(str(triple.expert), str(triple.base), own, progress=False)
    assert run_cli("inject", triple.vlm, own, "-o", tmp_path / "o2", "-q").returncode == 0


# ------------------------------------------------------------------ bad skill directories


@pytest.fixture(scope="module")
def good_skill(triple, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "skill"
    extract_skill(str(triple.expert), str(triple.base), out, SkillSettings(format="lowrank", rank=3), progress=False)
    return out


def _damaged(good_skill, tmp_path, how):
    d = tmp_path / "bad"
    shutil.copytree(good_skill, d)
    how(d)
    return d


def _edit_json(fn):
    def edit(d):
        meta = json.loads((d / "skill.json").read_text())
        fn(meta)
        (d / "skill.json").write_text(json.dumps(meta))
    return edit


def _set_shape(meta):
    meta["tensors"]["model.layers.0.mlp.up_proj.weight"]["shape"] = [7, 7]


def _set_version(meta):
    meta["skillgraft_skill"] = 99


BAD = [
    ("no-weights", lambda d: (d / "skill.safetensors").unlink(), "skill.safetensors is missing"),
    ("truncated", lambda d: (d / "skill.safetensors").write_bytes((d / "skill.safetensors").read_bytes()[:5000]),
     "safetensors"),
    ("bad-json", lambda d: (d / "skill.json").write_text("{"), "not valid JSON"),
    ("wrong-shape", _edit_json(_set_shape), "has shape"),
    ("newer", _edit_json(_set_version), "upgrade skillgraft"),
]


@pytest.mark.parametrize("label,how,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_skill_directories_give_one_error_line(triple, good_skill, tmp_path, label, how, fragment):
    bad = _damaged(good_skill, tmp_path, how)
    assert_user_error(run_cli("inject", triple.vlm, bad, "-o", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()
    assert_user_error(run_cli("skill", "info", bad), fragment)


def test_bad_extract_arguments(triple, good_skill, tmp_path):
    assert_user_error(run_cli("skill", "extract", triple.expert, "--base", triple.base, "-o", tmp_path / "s",
                              "--format", "lowrank"), "rank or an energy")
    assert_user_error(run_cli("skill", "extract", triple.expert, "--base", triple.base, "-o", tmp_path / "s",
                              "--format", "sparse", "--density", "1.5"), "density")
    assert_user_error(run_cli("skill", "extract", triple.expert, "--base", triple.base, "-o", tmp_path / "s",
                              "--rank", "4"), "lowrank format")
    other = build_llava_triple(tmp_path / "deep", hidden=48, layers=3)
    assert_user_error(run_cli("skill", "extract", other.expert, "--base", triple.base, "-o", tmp_path / "s"),
                      "layer count mismatch")
    assert not (tmp_path / "s").exists()
    with pytest.raises(SkillgraftError, match="is a skill directory"):
        extract_skill(str(good_skill), str(triple.base), tmp_path / "x", progress=False)


# ------------------------------------------------------------------ info, list


def test_info_and_list(triple, good_skill, tmp_path):
    p = run_cli("skill", "info", good_skill)
    assert p.returncode == 0 and "lowrank rank 3" in p.stdout and "of the expert's language model" in p.stdout
    info = json.loads(run_cli("skill", "info", good_skill, "--json").stdout)
    assert info["kind"] == "skill" and info["tensors"] == 21 and 0 < info["ratio_to_expert_lm"] < 1
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copytree(good_skill, lib / "math-lr3")
    extract_skill(str(triple.expert), str(triple.base), lib / "math-bit", SkillSettings(format="bitdelta"), progress=False)
    (lib / "not-a-skill").mkdir()
    shutil.copytree(good_skill, lib / "broken")
    (lib / "broken" / "skill.safetensors").unlink()
    p = run_cli("skill", "list", lib)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].split()[:4] == ["name", "format", "size", "base"]
    assert lines[1].startswith("broken") and "damaged" in lines[1]
    assert lines[2].startswith("math-bit") and "bitdelta" in lines[2] and str(triple.base) in lines[2]
    assert lines[3].startswith("math-lr3") and "lowrank rank 3" in lines[3]


def test_skill_help_does_not_import_torch():
    code = ("import sys\nfrom skillgraft.cli import main\n"
            "for argv in (['skill', '--help'], ['skill', 'extract', '--help'], ['skill', 'export-lora', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
