"""PEFT LoRA adapters as experts, and skills exported as PEFT LoRA adapters on a VLM.

The references are PEFT's own: ``merge_and_unload()`` of an adapter (the merged expert, injected
with its base) and ``PeftModel.from_pretrained(vlm, adapter)`` (its logits against those of the
checkpoint ``inject`` writes).
"""

from __future__ import annotations

import json

import pytest
import torch
import vlm_factories as vf
from conftest import build_llava_triple, load_weights
from test_skills import assert_user_error, run_cli

from skillgraft.api import (
    ExpertSpec,
    Recipe,
    SkillSettings,
    extract_skill,
    inject,
    skill_info,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install peft")


def make_adapter(base_dir, out, seed=0, **config):
    """A PEFT LoRA adapter on the base LLM with random non-zero factors; returns its merge_and_unload() dir too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    pm = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    merged = out.parent / f"{out.name}-merged"
    pm.merge_and_unload().save_pretrained(str(merged))
    return out, merged


def _inject(vlm, expert, out, base=None, scale=1.0, **kw):
    recipe = Recipe(vlm=str(vlm), base=str(base) if base else None, experts=[ExpertSpec(model=str(expert), scale=scale)], **kw)
    return inject(recipe, out, progress=False)


def _same(a, b, atol=2e-6):
    A, B = load_weights(a), load_weights(b)
    assert A.keys() == B.keys()
    bad = [k for k in A if not torch.allclose(A[k].float(), B[k].float(), atol=atol, rtol=1e-5)]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return build_llava_triple(tmp_path_factory.mktemp("lora_llava"), hidden=32, layers=2)


# ------------------------------------------------------------------ adapters as experts


def test_lora_with_embedding_and_saved_head_equals_peft_merge(triple, tmp_path):
    adapter, merged = make_adapter(triple.base, tmp_path / "ad", r=4, lora_alpha=8,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj", "embed_tokens"], modules_to_save=["lm_head"])
    a = _inject(triple.vlm, adapter, tmp_path / "a", base=triple.base, scale=0.8)
    b = _inject(triple.vlm, merged, tmp_path / "b", base=triple.base, scale=0.8)
    _same(a.out_dir, b.out_dir)
    src = a.report["expert_sources"]["ad"]
    assert src["kind"] == "lora" and src["base_model_name_or_path"] == str(triple.base)
    # whole saved modules need the base: one clear error without it
    assert_user_error(run_cli("inject", triple.vlm, adapter, "-o", tmp_path / "c"), "give the base")
    assert not (tmp_path / "c").exists()


def test_rslora_patterns_need_no_base(triple, tmp_path):
    adapter, merged = make_adapter(triple.base, tmp_path / "rs", seed=1, r=4, lora_alpha=6, use_rslora=True,
                                   target_modules="all-linear", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"]
    a = _inject(triple.vlm, adapter, tmp_path / "a", scale=1.3)  # no base
    b = _inject(triple.vlm, merged, tmp_path / "b", base=triple.base, scale=1.3)
    _same(a.out_dir, b.out_dir)
    counts = a.report["counts"]
    assert counts["copied"] > 0 and "no expert changes it (task vectors leave it as is)" in a.report["copied_by_reason"]


def test_lora_bias_on_a_qwen2_vl(tmp_path):
    b = vf.build("qwen2_vl", tmp_path / "q")
    adapter, merged = make_adapter(b.base, tmp_path / "bias", seed=2, r=2, lora_alpha=4,
                                   target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    x = _inject(b.vlm, adapter, tmp_path / "x")
    y = _inject(b.vlm, merged, tmp_path / "y", base=b.base)
    _same(x.out_dir, y.out_dir)


def test_adapters_and_skills_compose(triple, tmp_path):
    ad1, m1 = make_adapter(triple.base, tmp_path / "one", seed=3, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    ad2, m2 = make_adapter(triple.base, tmp_path / "two", seed=4, r=3, lora_alpha=3, target_modules=["v_proj", "down_proj"])
    skill = tmp_path / "skill"
    extract_skill(str(triple.expert), str(triple.base), skill, SkillSettings(format="lowrank", rank=4), progress=False)
    recipe = Recipe(vlm=str(triple.vlm), experts=[ExpertSpec(model=str(ad1), scale=0.5), ExpertSpec(model=str(ad2), scale=1.5),
                                                  ExpertSpec(model=str(skill), scale=0.3)])
    out = inject(recipe, tmp_path / "out", progress=False).out_dir
    O, V = load_weights(out), load_weights(triple.vlm)
    B, M1, M2 = (load_weights(x) for x in (triple.base, m1, m2))
    from skillgraft.skills import SkillReader

    with SkillReader(skill) as sr:
        for n in sr.names:
            vk = "language_model." + n
            rows = sr.shape(n)[0]
            want = V[vk].clone()
            want[:rows] += 0.5 * (M1[n] - B[n]) + 1.5 * (M2[n] - B[n]) + 0.3 * sr.get(n)
            assert torch.allclose(O[vk], want, atol=2e-6), n


def _edit_config(adapter, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_bad_adapters_give_one_error_line(triple, tmp_path):
    from safetensors.torch import load_file, save_file

    def fresh(name):
        ad, _ = make_adapter(triple.base, tmp_path / name, r=2, lora_alpha=2, target_modules=["q_proj"])
        return ad

    dora = tmp_path / "dora"
    make_adapter(triple.base, dora, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    assert_user_error(run_cli("inject", triple.vlm, dora, "-o", tmp_path / "o"), "DoRA")
    ia3 = fresh("ia3")
    _edit_config(ia3, peft_type="IA3")
    assert_user_error(run_cli("inject", triple.vlm, ia3, "-o", tmp_path / "o"), "'IA3' adapter")
    missing = fresh("missing")
    (missing / "adapter_model.safetensors").unlink()
    assert_user_error(run_cli("inject", triple.vlm, missing, "-o", tmp_path / "o"), "adapter_model.safetensors is missing")
    rank = fresh("rank")
    _edit_config(rank, r=3)
    assert_user_error(run_cli("inject", triple.vlm, rank, "-o", tmp_path / "o"), "wrong shapes")
    shapes = fresh("shapes")
    sd = load_file(shapes / "adapter_model.safetensors")
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], 5)
    save_file(sd, shapes / "adapter_model.safetensors")
    assert_user_error(run_cli("inject", triple.vlm, shapes, "-o", tmp_path / "o"), "do not multiply")
    stray = fresh("stray")
    sd = load_file(stray / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.mlp.mystery"] = torch.zeros(3)
    save_file(sd, stray / "adapter_model.safetensors")
    assert_user_error(run_cli("inject", triple.vlm, stray, "-o", tmp_path / "o"), "neither a LoRA factor")
    assert not (tmp_path / "o").exists()
    info = skill_info(fresh("ok"))
    assert info["kind"] == "lora" and info["r"] == 2 and info["base"] == str(triple.base)


# ------------------------------------------------------------------ export-lora


def _vlm_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "mllama"])
def test_export_lora_reproduces_the_merged_model(tmp_path, family):
    b = vf.build(family, tmp_path / family)
    skill = tmp_path / "skill"
    extract_skill(str(b.expert), str(b.base), skill, SkillSettings(format="lowrank", rank=3), progress=False)
    merged = _inject(b.vlm, skill, tmp_path / "merged", scale=0.7).out_dir
    p = run_cli("skill", "export-lora", skill, "--vlm", b.vlm, "--scale", "0.7", "-o", tmp_path / "adapter")
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 3
    if family == "mllama":  # cross-attention layers (1 and 4 of the VLM's 6) are not targeted
        layers = {int(t.split("layers.")[1].split(".")[0]) for t in cfg["target_modules"] if "layers." in t}
        assert layers == {0, 2, 3, 5}
    batch = b.inputs()
    want = _vlm_logits(b.family.vlm_cls.from_pretrained(merged).eval(), batch)
    vlm = b.family.vlm_cls.from_pretrained(b.vlm).eval()
    before = _vlm_logits(vlm, batch)
    model = peft.PeftModel.from_pretrained(vlm, str(tmp_path / "adapter")).eval()
    got = _vlm_logits(model, batch)
    assert (want - before).abs().max() > 1e-3  # the skill changes the logits
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_export_lora_factorises_other_formats_and_adapters(tmp_path):
    b = vf.build("llava", tmp_path / "llava")
    bit = tmp_path / "bit"
    extract_skill(str(b.expert), str(b.base), bit, SkillSettings(format="bitdelta"), progress=False)
    assert_user_error(run_cli("skill", "export-lora", bit, "--vlm", b.vlm, "-o", tmp_path / "x"), "give a rank")
    full_rank = run_cli("skill", "export-lora", bit, "--vlm", b.vlm, "--energy", "1.0", "-o", tmp_path / "x")
    assert full_rank.returncode == 0, full_rank.stderr
    merged = _inject(b.vlm, bit, tmp_path / "m").out_dir
    batch = b.inputs()
    want = _vlm_logits(b.family.vlm_cls.from_pretrained(merged).eval(), batch)
    got = _vlm_logits(peft.PeftModel.from_pretrained(b.family.vlm_cls.from_pretrained(b.vlm).eval(),
                                                     str(tmp_path / "x")).eval(), batch)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4)
    # an LLM adapter re-targeted onto the VLM's own module names
    adapter, _ = make_adapter(b.base, tmp_path / "llm-adapter", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    assert run_cli("skill", "export-lora", adapter, "--vlm", b.vlm, "--scale", "2", "-o", tmp_path / "y").returncode == 0
    merged = _inject(b.vlm, adapter, tmp_path / "m2", scale=2.0).out_dir
    want = _vlm_logits(b.family.vlm_cls.from_pretrained(merged).eval(), batch)
    got = _vlm_logits(peft.PeftModel.from_pretrained(b.family.vlm_cls.from_pretrained(b.vlm).eval(),
                                                     str(tmp_path / "y")).eval(), batch)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------ sweeps


@pytest.mark.parametrize("method,density", [("ta", 1.0), ("dare", 0.5)])
def test_inplace_sweep_point_equals_inject_with_adapter_and_skill(triple, tmp_path, method, density):
    from contextlib import ExitStack

    from transformers import LlavaForConditionalGeneration

    from skillgraft.api import prepare
    from skillgraft.sweep.inplace import InPlaceModel

    adapter, _ = make_adapter(triple.base, tmp_path / "ad", seed=5, r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"])
    skill = tmp_path / "skill"
    extract_skill(str(triple.expert), str(triple.base), skill, SkillSettings(format="sparse", density=0.2), progress=False)
    recipe = Recipe(vlm=str(triple.vlm), method=method, seed=3,
                    experts=[ExpertSpec(model=str(adapter), scale=0.9, density=density),
                             ExpertSpec(model=str(skill), scale=0.6, density=density)])
    model = LlavaForConditionalGeneration.from_pretrained(str(triple.vlm), dtype="auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ExitStack() as stack:
        prep = prepare(recipe, stack)
        assert prep.plan.base is None
        ip = InPlaceModel(model, prep.plan, cache_taus=True)
        ip.apply(prep.settings)
        merged = {k: v.clone() for k, v in model.state_dict().items()}
        ip.restore()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    ref = LlavaForConditionalGeneration.from_pretrained(str(inject(recipe, tmp_path / "o", progress=False).out_dir),
                                                        dtype="auto").state_dict()
    assert all(torch.equal(merged[k], ref[k]) for k in merged)
