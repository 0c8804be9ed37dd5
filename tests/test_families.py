"""Per-family test bed for the injection engine.

For every VLM family, a tiny (VLM, base LLM, expert LLM) triple is built with the real
transformers classes (``tests/vlm_factories.py``), then injected with Task Arithmetic:

(a) every non-LM tensor of the output is bit-identical to the VLM's,
(b) every merged LM tensor equals ``theta_V + scale * (theta_E - theta_B)`` on the rows the
    vocabularies share, VLM-only rows are copied,
(c) the report explains every tensor and lists nothing unmatched,

and the output loads with the VLM's own transformers class and runs a forward pass with an
image. Every on-disk layout transformers can load is covered (the one ``save_pretrained``
writes, the hub "legacy" one and the transformers-5 module names).

Which VLM tensor is LM, and which base/expert tensor it comes from, is decided here by an
independent name table (below), not by skillgraft's mapping code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import vlm_factories as vf
from skillgraft import api as inject_mod
from skillgraft.mapping.families import FAMILIES as SUPPORTED
from skillgraft.recipe import ExpertSpec, Recipe

SCALE = 0.7
ATOL = 1e-6
RTOL = 1e-5

# --------------------------------------------------------------------------------------
# independent name mapping: VLM checkpoint key -> causal-LM key
# --------------------------------------------------------------------------------------

_LLAVA_STYLE = {
    "legacy": [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")],
    "v5": [("model.language_model.", "model."), ("lm_head.", "lm_head.")],
}
_QWEN2_STYLE = {
    "legacy": [("model.", "model."), ("lm_head.", "lm_head.")],
    "v5": [("model.language_model.", "model."), ("lm_head.", "lm_head.")],
}
_TEXT_MODEL_STYLE = {"v5": [("model.text_model.", "model."), ("lm_head.", "lm_head.")]}

LM_PREFIXES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "llava": _LLAVA_STYLE,
    "llava_next": _LLAVA_STYLE,
    "llava_next_video": _LLAVA_STYLE,
    "llava_onevision": _LLAVA_STYLE,
    "gemma3": _LLAVA_STYLE,
    "mistral3": _LLAVA_STYLE,
    "internvl": _LLAVA_STYLE,
    "paligemma": _LLAVA_STYLE,
    "aya_vision": _LLAVA_STYLE,
    "mllama": _LLAVA_STYLE,
    "qwen2_vl": _QWEN2_STYLE,
    "qwen2_5_vl": _QWEN2_STYLE,
    "qwen3_vl": {"v5": [("model.language_model.", "model."), ("lm_head.", "lm_head.")]},
    "idefics2": _TEXT_MODEL_STYLE,
    "idefics3": _TEXT_MODEL_STYLE,
    "smolvlm": _TEXT_MODEL_STYLE,
}
# families whose save_pretrained output uses the v5 names for the LM (no legacy layout exists)
_SAVED_IS_V5 = {"qwen3_vl", "idefics2", "idefics3", "smolvlm"}

# Mllama: 6 text layers, 1 and 4 are cross-attention; LLM layer i -> i-th self-attention layer
MLLAMA_TEXT_LAYERS = 6
MLLAMA_CROSS = {1, 4}
MLLAMA_VLM_TO_LLM = {j: i for i, j in enumerate(j for j in range(MLLAMA_TEXT_LAYERS) if j not in MLLAMA_CROSS)}


def _layout_kind(family: str, layout: str) -> str:
    if layout in ("saved", "sharded"):
        return "v5" if family in _SAVED_IS_V5 else "legacy"
    return layout if layout in LM_PREFIXES[family] else "v5"


def llm_key(family: str, layout: str, vlm_key: str) -> str | None:
    """The base/expert tensor name a VLM tensor derives from, or None if it is not LM."""
    for src, dst in LM_PREFIXES[family][_layout_kind(family, layout)]:
        if vlm_key.startswith(src):
            rest = vlm_key[len(src):]
            if family == "mllama":
                m = re.match(r"layers\.(\d+)\.(.*)", rest)
                if m:
                    j = int(m.group(1))
                    if j in MLLAMA_CROSS:
                        return None  # cross-attention layer: VLM-only
                    rest = f"layers.{MLLAMA_VLM_TO_LLM[j]}.{m.group(2)}"
            return dst + rest
    return None


# --------------------------------------------------------------------------------------
# fixtures: build once per family, layout copies share base/expert
# --------------------------------------------------------------------------------------

CASES = [(f, lay) for f in vf.FAMILY_NAMES for lay in vf.distinct_layouts(f)]
CASE_IDS = [f"{f}-{lay}" for f, lay in CASES]


@pytest.fixture(scope="module")
def fam_store(tmp_path_factory):
    return {"root": tmp_path_factory.mktemp("families"), "built": {}, "out": {}}


def _built(store, family: str, layout: str = "saved") -> vf.Built:
    key = (family, layout)
    if key not in store["built"]:
        if layout == "saved":
            store["built"][key] = vf.build(family, store["root"] / family)
        else:
            store["built"][key] = _built(store, family, "saved").with_layout(layout)
    return store["built"][key]


def _inject(store, family: str, layout: str, scale: float = SCALE):
    key = (family, layout, scale)
    if key not in store["out"]:
        if layout == "sharded":
            b = _built(store, family, "saved")
            if (family, "sharded") not in store["built"]:
                store["built"][(family, "sharded")] = vf.relayout(b, "saved", max_shard_size="40KB")
            b = store["built"][(family, "sharded")]
        else:
            b = _built(store, family, layout)
        out = store["root"] / "out" / f"{family}-{layout}-{scale}"
        out.parent.mkdir(exist_ok=True)
        recipe = Recipe(vlm=str(b.vlm), base=str(b.base), experts=[ExpertSpec(model=str(b.expert), scale=scale)],
                        method="ta")
        result = inject_mod.inject(recipe, out, force=False, progress=False)
        store["out"][key] = (b, result)
    return store["out"][key]


# --------------------------------------------------------------------------------------
# expectations
# --------------------------------------------------------------------------------------


def _expected(family: str, layout: str, V: dict, B: dict, E: dict, scale: float):
    """-> (expected tensors, {vlm key: (llm key, rows or None)} for LM tensors)."""
    exp, lm = {}, {}
    for k, v in V.items():
        lk = llm_key(family, layout, k)
        if lk is None or lk not in B:
            exp[k] = v
            continue
        b, e = B[lk], E[lk]
        assert b.shape == e.shape
        assert v.shape[1:] == b.shape[1:], (k, v.shape, b.shape)
        x = v.clone()
        if v.ndim and v.shape[0] != b.shape[0]:
            r = min(v.shape[0], b.shape[0])
            x[:r] = v[:r] + scale * (e[:r] - b[:r])
            lm[k] = (lk, [0, r])
        else:
            x = v + scale * (e - b)
            lm[k] = (lk, None)
        exp[k] = x
    return exp, lm


def _check_merge(family: str, layout: str, scale: float, store):
    b, result = _inject(store, family, layout, scale)
    V = vf.read_safetensors(b.vlm)
    B = vf.read_safetensors(b.base)
    E = vf.read_safetensors(b.expert)
    O = vf.read_safetensors(result.out_dir)
    exp, lm = _expected(family, layout, V, B, E, scale)

    # the factory must have produced a meaningful case: LM tensors exist and all base tensors are used
    assert lm, f"{family}/{layout}: no LM tensor found by the test's own mapping"
    used = {lk for lk, _ in lm.values()}
    assert used == set(B), f"{family}/{layout}: base tensors not mapped: {sorted(set(B) - used)[:5]}"

    assert set(O) == set(V), (
        f"{family}/{layout}: output names differ from the VLM's: missing {sorted(set(V) - set(O))[:5]}, "
        f"extra {sorted(set(O) - set(V))[:5]}"
    )
    bad_copy, bad_merge = [], []
    for k, v in V.items():
        o = O[k]
        assert o.dtype == v.dtype and o.shape == v.shape, (k, o.dtype, v.dtype, o.shape, v.shape)
        if k in lm:
            if not torch.allclose(o, exp[k], atol=ATOL, rtol=RTOL):
                err = (o - exp[k]).abs().max().item()
                moved = (o - v).abs().max().item()
                bad_merge.append(f"{k} <- {lm[k][0]} rows {lm[k][1]}: max|out-expected|={err:.3g}, "
                                 f"max|out-vlm|={moved:.3g}")
            elif lm[k][1] is not None:
                r = lm[k][1][1]
                assert torch.equal(o[r:], v[r:]), f"{k}: VLM-only rows [{r}:] not copied bit for bit"
        elif not torch.equal(o, v):
            bad_copy.append(k)
    assert not bad_copy, f"{family}/{layout}: (a) non-LM tensors changed: {bad_copy[:10]}"
    assert not bad_merge, f"{family}/{layout}: (b) merged tensors wrong:\n  " + "\n  ".join(bad_merge[:10])
    return b, result, V, lm


def _check_report(family: str, layout: str, result, V: dict, lm: dict):
    rep = result.report
    on_disk = json.loads((Path(result.out_dir) / "skillgraft_report.json").read_text())
    assert on_disk == json.loads(json.dumps(rep)), "report on disk differs from result.report"
    assert rep["unmatched"]["vlm"] == [], f"{family}/{layout}: (c) unexplained VLM tensors {rep['unmatched']['vlm']}"
    unrelated = [w for w in rep.get("warnings", []) if "unrelated" in w]
    assert not unrelated, f"{family}/{layout}: engine thinks the triple is unrelated: {unrelated}"
    tensors = rep["tensors"]
    assert set(tensors) == set(V), (
        f"{family}/{layout}: report tensors != VLM tensors: missing {sorted(set(V) - set(tensors))[:5]}, "
        f"extra {sorted(set(tensors) - set(V))[:5]}"
    )
    wrong = []
    for k in V:
        t = tensors[k]
        if k in lm:
            lk, rows = lm[k]
            got = (t["action"], t.get("expert_name"), t.get("rows"))
            if got != ("merge", lk, rows):
                wrong.append(f"{k}: expected (merge, {lk}, {rows}), got {got}")
        elif t["action"] != "copy":
            wrong.append(f"{k}: expected copy, got {t['action']} from {t.get('expert_name')}")
        if not t.get("reason"):
            wrong.append(f"{k}: no reason given")
    assert not wrong, f"{family}/{layout}: report entries wrong:\n  " + "\n  ".join(wrong[:10])
    n_sliced = sum(1 for _, rows in lm.values() if rows is not None)
    want = {"merged": len(lm), "row_sliced": n_sliced, "copied": len(V) - len(lm), "total": len(V)}
    got = {k: rep["counts"].get(k) for k in want}
    assert got == want, f"{family}/{layout}: counts {got}, expected {want}"


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,layout", CASES, ids=CASE_IDS)
def test_factory_checkpoint_loads(family, layout, fam_store):
    """Sanity of the test bed itself: transformers loads this layout back to the same weights."""
    b = _built(fam_store, family, layout)
    model, info = b.family.vlm_cls.from_pretrained(b.vlm, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in b.v5_state.items())
    if layout != "saved":  # the layout really differs from what save_pretrained wrote
        saved = set(vf.read_safetensors(_built(fam_store, family).vlm))
        assert set(vf.read_safetensors(b.vlm)) != saved


@pytest.mark.parametrize("family,layout", CASES, ids=CASE_IDS)
def test_inject_ta(family, layout, fam_store):
    """(a) non-LM bit-identical, (b) LM = V + scale*(E - B) on shared rows, (c) report complete."""
    _, result, V, lm = _check_merge(family, layout, SCALE, fam_store)
    _check_report(family, layout, result, V, lm)


@pytest.mark.parametrize("family,layout", CASES, ids=CASE_IDS)
def test_output_loads_and_runs(family, layout, fam_store):
    b, result = _inject(fam_store, family, layout)
    out = Path(result.out_dir)
    model, info = b.family.vlm_cls.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    batch = vf.inputs(out, model=model, family=b.family)  # uses the tokenizer copied into out/
    logits = vf.forward(model, batch)
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()
    # the merge changed the model: logits differ from the VLM's
    vlm = b.family.vlm_cls.from_pretrained(b.vlm).eval()
    assert not torch.allclose(vf.forward(vlm, batch), logits)


@pytest.mark.parametrize("family", vf.FAMILY_NAMES)
def test_output_has_vlm_side_files(family, fam_store):
    b, result = _inject(fam_store, family, "saved")
    out = Path(result.out_dir)
    for f in sorted(b.vlm.iterdir()):
        if f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json"):
            continue
        assert (out / f.name).is_file(), f"{family}: {f.name} not copied to the output"
        if f.name == "config.json":
            src, dst = json.loads(f.read_text()), json.loads((out / f.name).read_text())
            for key in ("model_type", "architectures"):
                assert dst.get(key) == src.get(key), (key, dst.get(key), src.get(key))
        elif f.name != "generation_config.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f"{family}: {f.name} differs from the VLM's"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert (out / "skillgraft_report.json").is_file()


@pytest.mark.parametrize("family", vf.FAMILY_NAMES)
def test_inject_ta_scale_one(family, fam_store):
    """The default scale (1.0) on the layout save_pretrained writes."""
    _, result, V, lm = _check_merge(family, "saved", 1.0, fam_store)
    _check_report(family, "saved", result, V, lm)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_inject_sharded_vlm(family, fam_store):
    """A VLM saved in several shards with a model.safetensors.index.json, as on the hub."""
    b, result = _inject(fam_store, family, "sharded")
    assert len(list(b.vlm.glob("*.safetensors"))) > 1 and (b.vlm / "model.safetensors.index.json").is_file()
    _, result, V, lm = _check_merge(family, "sharded", SCALE, fam_store)
    _check_report(family, "sharded", result, V, lm)
    model, info = b.family.vlm_cls.from_pretrained(result.out_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.isfinite(vf.forward(model.eval(), vf.inputs(result.out_dir, model=model, family=b.family))).all()


@pytest.mark.parametrize("family", ["llava", "gemma3", "mllama"])
def test_inject_bf16(family, tmp_path):
    """bf16 checkpoints (as on the hub): dtype kept, merge computed to bf16 rounding, copies exact."""
    b = vf.build(family, tmp_path / "in", dtype=torch.bfloat16)
    recipe = Recipe(vlm=str(b.vlm), base=str(b.base), experts=[ExpertSpec(model=str(b.expert), scale=SCALE)],
                    method="ta")
    result = inject_mod.inject(recipe, tmp_path / "out", force=False, progress=False)
    V = vf.read_safetensors(b.vlm)
    B = vf.read_safetensors(b.base)
    E = vf.read_safetensors(b.expert)
    O = vf.read_safetensors(result.out_dir)
    assert set(O) == set(V)
    assert all(v.dtype == torch.bfloat16 for v in V.values())
    f32 = {k: v.float() for k, v in V.items()}
    exp, lm = _expected(family, "saved", f32, {k: v.float() for k, v in B.items()},
                        {k: v.float() for k, v in E.items()}, SCALE)
    assert lm
    for k, v in V.items():
        assert O[k].dtype == torch.bfloat16, (k, O[k].dtype)
        if k in lm:
            want = exp[k].to(torch.bfloat16).float()
            # within one bf16 ulp of the float32 result rounded to bf16
            tol = want.abs() * 2.0**-7 + 1e-6
            assert ((O[k].float() - want).abs() <= tol).all(), k
            assert not torch.equal(O[k], v), f"{k}: merged tensor unchanged"
        else:
            assert torch.equal(O[k], v), f"{k}: not copied bit for bit"
    _check_report(family, "saved", result, V, lm)
    model = b.family.vlm_cls.from_pretrained(result.out_dir, dtype=torch.float32).eval()
    assert torch.isfinite(vf.forward(model, vf.inputs(result.out_dir, model=model, family=b.family))).all()


def test_every_supported_family_is_tested():
    """Each family skillgraft lists has a factory here and an entry in the test's own name table."""
    assert set(SUPPORTED) == set(vf.FAMILIES) == set(LM_PREFIXES)


def test_vocab_and_tying_cases_covered():
    """The test bed exercises row slicing, tied and untied embeddings, and Mllama's layer remap."""
    assert {f for f, fam in vf.FAMILIES.items() if fam.tied} >= {"gemma3", "paligemma", "aya_vision"}
    assert any(not fam.tied for fam in vf.FAMILIES.values())
    assert vf.FAMILIES["mllama"].layer_map is not None


# --------------------------------------------------------------------------------------
# LLM as the target: plain LLM merge, every tensor is LM
# --------------------------------------------------------------------------------------


def _llm_triple(root: Path, tied: bool):
    import transformers as tf

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    if tied:
        cls, mk = tf.GemmaForCausalLM, vf._gemma
    else:
        cls, mk = tf.LlamaForCausalLM, vf._llama
    base = cls(mk(vf.BASE_VOCAB)).eval()
    bsd = base.state_dict()
    expert = cls(mk(vf.BASE_VOCAB))
    expert.load_state_dict({k: vf._perturb(v, vf.EXPERT_NOISE, g) for k, v in bsd.items()})
    target = cls(mk(vf.BASE_VOCAB + 4)).eval()  # a chat fine-tune that added 4 tokens
    with torch.no_grad():
        for k, t in target.state_dict().items():
            r = min(t.shape[0], bsd[k].shape[0])
            t[:r].copy_(vf._perturb(bsd[k][:r], vf.VLM_NOISE, g))
    tok_small, tok_big = vf.make_tokenizer([]), vf.make_tokenizer(["<a>", "<b>", "<c>", "<d>"])
    for name, m, tok in (("base", base, tok_small), ("expert", expert, tok_small), ("target", target, tok_big)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return cls


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llm_target(tied, tmp_path):
    cls = _llm_triple(tmp_path, tied)
    recipe = Recipe(vlm=str(tmp_path / "target"), base=str(tmp_path / "base"),
                    experts=[ExpertSpec(model=str(tmp_path / "expert"), scale=SCALE)], method="ta")
    result = inject_mod.inject(recipe, tmp_path / "out", force=False, progress=False)
    V = vf.read_safetensors(tmp_path / "target")
    B = vf.read_safetensors(tmp_path / "base")
    E = vf.read_safetensors(tmp_path / "expert")
    O = vf.read_safetensors(result.out_dir)
    assert set(O) == set(V) == set(B)
    for k, v in V.items():
        r = min(v.shape[0], B[k].shape[0])
        x = v.clone()
        x[:r] = v[:r] + SCALE * (E[k][:r] - B[k][:r])
        assert torch.allclose(O[k], x, atol=ATOL, rtol=RTOL), k
        assert torch.equal(O[k][r:], v[r:]), k
    rep = result.report
    assert rep["unmatched"]["vlm"] == []
    n_sliced = sum(1 for k, v in V.items() if v.shape[0] != B[k].shape[0])
    assert n_sliced == (1 if tied else 2)
    assert rep["counts"]["merged"] == rep["counts"]["total"] == len(V)
    assert rep["counts"]["copied"] == 0
    assert rep["counts"]["row_sliced"] == n_sliced
    for k in V:
        assert rep["tensors"][k]["action"] == "merge" and rep["tensors"][k]["expert_name"] == k, rep["tensors"][k]
    model = cls.from_pretrained(result.out_dir).eval()
    ids = torch.tensor([[1, 10, 11, 12, vf.BASE_VOCAB + 2]])
    logits = vf.forward(model, {"input_ids": ids})
    assert logits.shape == (1, 5, vf.BASE_VOCAB + 4) and torch.isfinite(logits).all()
