"""Every method's output, bit for bit: hashes of merged checkpoints against stored reference hashes.

The fixtures are written with seeded ``torch.Generator`` draws and ``safetensors`` directly (no model
class is instantiated, so a new transformers release cannot change them): a LLaVA-layout VLM (four
image-token rows more than the base), a Llama-layout base and two experts. The "large" triple has an
embedding and LM head of 4.3M entries, more than one engine row block, so block-wise seeding and
streaming are covered as well.

The reference hashes in ``data/bit_identity.json`` were recorded with the same recipes; a change that
alters any output bit of any method fails here. Regenerate only for a deliberate change of results:

    SKILLGRAFT_RECORD_HASHES=1 python -m pytest tests/test_bit_identity.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from skillgraft.api import inject
from skillgraft.recipe import Recipe

DATA = Path(__file__).parent / "data" / "bit_identity.json"
RECORD = os.environ.get("SKILLGRAFT_RECORD_HASHES") == "1"


def _llama_names(layers: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (hidden // 2, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (hidden // 2, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["norm.weight"] = (hidden,)
    return shapes


def _write(d: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    return d


def build_fixture(root: Path, *, vocab: int, hidden: int, inter: int, layers: int, dtype: torch.dtype) -> dict[str, Path]:
    """base, expert-a, expert-b (Llama layout) and a LLaVA-layout VLM, all base + seeded deltas."""
    g = torch.Generator().manual_seed(1234)
    shapes = _llama_names(layers, hidden, inter)
    base_lm = {k: torch.randn(s, generator=g) * (1.0 if "norm" in k else 0.05) for k, s in shapes.items()}
    base_lm["embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g) * 0.05
    base_lm["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.05

    def derived(scale: float) -> dict[str, torch.Tensor]:
        return {k: v + scale * torch.randn(v.shape, generator=g) * 0.05 for k, v in base_lm.items()}

    def causal(lm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {(k if k == "lm_head.weight" else "model." + k): v.to(dtype) for k, v in lm.items()}

    llama_cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                 "num_hidden_layers": layers, "vocab_size": vocab}
    out = {"base": _write(root / "base", causal(base_lm), llama_cfg)}
    out["expert-a"] = _write(root / "expert-a", causal(derived(0.1)), llama_cfg)
    out["expert-b"] = _write(root / "expert-b", causal(derived(0.08)), llama_cfg)
    vlm_lm = derived(0.12)
    vlm: dict[str, torch.Tensor] = {}
    for k, v in vlm_lm.items():
        if k in ("embed_tokens.weight", "lm_head.weight"):  # four image-token rows the base never had
            v = torch.cat([v, torch.randn(4, hidden, generator=g) * 0.05])
        name = "language_model.lm_head.weight" if k == "lm_head.weight" else "language_model.model." + k
        vlm[name] = v.to(dtype)
    vlm["vision_tower.patch_embedding.weight"] = (torch.randn(8, 3, 2, 2, generator=g) * 0.1).to(dtype)
    vlm["multi_modal_projector.linear_1.weight"] = (torch.randn(hidden, 8, generator=g) * 0.1).to(dtype)
    vlm_cfg = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
               "text_config": {**llama_cfg, "vocab_size": vocab + 4}}
    out["vlm"] = _write(root / "vlm", vlm, vlm_cfg)
    return out


# name -> (fixture, recipe fields); experts are given by fixture key
CASES: dict[str, tuple[str, dict]] = {
    "ta": ("small", dict(method="ta", experts=[("expert-a", 1.0, 1.0)])),
    "ta_0.7": ("small", dict(method="ta", experts=[("expert-a", 0.7, 1.0)])),
    "ta_two_experts": ("small", dict(method="ta", experts=[("expert-a", 0.8, 1.0), ("expert-b", 0.4, 1.0)])),
    "ta_scale_schedule": ("small", dict(method="ta", experts=[("expert-a", [0.0, 1.0, 0.5], 1.0)])),
    "ta_recipe_schedule_exclude": ("small", dict(method="ta", experts=[("expert-a", 1.0, 1.0)],
                                                 schedule=[1.0, 0.2], exclude=["embed"])),
    "ta_symmetric": ("small", dict(method="ta", mode="symmetric", vlm_weight=0.9, experts=[("expert-a", 0.6, 1.0)])),
    "ta_lambda": ("small", dict(method="ta", parameters={"lambda": 0.5}, experts=[("expert-a", 1.0, 1.0)])),
    "ta_float16": ("small", dict(method="ta", dtype="float16", experts=[("expert-a", 1.0, 1.0)])),
    "ta_float32": ("small_bf16", dict(method="ta", dtype="float32", experts=[("expert-a", 1.0, 1.0)])),
    "ta_bf16": ("small_bf16", dict(method="ta", experts=[("expert-a", 0.9, 1.0)])),
    "ties": ("small", dict(method="ties", experts=[("expert-a", 1.0, 0.5)])),
    "ties_two_normalize": ("small", dict(method="ties", parameters={"normalize": True},
                                         experts=[("expert-a", 1.0, 0.5), ("expert-b", 0.7, 0.3)])),
    "ties_symmetric_unweighted": ("small", dict(method="ties", mode="symmetric", vlm_density=0.6,
                                                parameters={"sign_from": "unweighted", "normalize": "count"},
                                                experts=[("expert-a", 1.0, 0.4)])),
    "ties_count": ("small", dict(method="ties", parameters={"sign_from": "count"},
                                 experts=[("expert-a", 1.0, 0.5), ("expert-b", -0.5, 0.5)])),
    "dare": ("small", dict(method="dare", experts=[("expert-a", 1.0, 0.5)])),
    "dare_seed1": ("small", dict(method="dare", seed=1, experts=[("expert-a", 1.0, 0.5)])),
    "dare_l1": ("small", dict(method="dare", parameters={"rescale": "l1"}, experts=[("expert-a", 1.0, 0.3)])),
    "dare_bernoulli": ("small", dict(method="dare", parameters={"sampler": "bernoulli"},
                                     experts=[("expert-a", 1.0, 0.5)])),
    "dare_norescale": ("small", dict(method="dare", parameters={"rescale": False}, experts=[("expert-a", 1.0, 0.5)])),
    "dare_ties": ("small", dict(method="dare_ties", experts=[("expert-a", 1.0, 0.5), ("expert-b", 0.5, 0.7)])),
    "dare_ties_symmetric": ("small", dict(method="dare_ties", mode="symmetric", vlm_density=0.8,
                                          experts=[("expert-a", 1.0, 0.5)])),
    "breadcrumbs": ("small", dict(method="breadcrumbs", parameters={"gamma": 0.05}, experts=[("expert-a", 1.0, 0.8)])),
    "breadcrumbs_ties": ("small", dict(method="breadcrumbs_ties", experts=[("expert-a", 1.0, 0.6), ("expert-b", 0.5, 0.6)])),
    "della": ("small", dict(method="della", parameters={"epsilon": 0.1}, experts=[("expert-a", 1.0, 0.5)])),
    "della_linear": ("small", dict(method="della_linear", experts=[("expert-a", 1.0, 0.5), ("expert-b", 0.5, 0.6)])),
    "della_l1": ("small", dict(method="della", parameters={"rescale": "l1"}, experts=[("expert-a", 1.0, 0.5)])),
    "consensus": ("small", dict(method="consensus", experts=[("expert-a", 1.0, 1.0), ("expert-b", 0.8, 1.0)])),
    "consensus_ties_symmetric": ("small", dict(method="consensus", mode="symmetric",
                                               parameters={"base": "ties", "k": 2},
                                               experts=[("expert-a", 1.0, 0.6)])),
    "tsv": ("small", dict(method="tsv", experts=[("expert-a", 1.0, 1.0), ("expert-b", 0.6, 1.0)])),
    "tsv_rank": ("small", dict(method="tsv", parameters={"rank": 3}, experts=[("expert-a", 1.0, 1.0)])),
    "iso_c": ("small", dict(method="iso_c", experts=[("expert-a", 1.0, 1.0), ("expert-b", 0.6, 1.0)])),
    "linear": ("small", dict(method="linear", experts=[("expert-a", 1.0, 1.0)])),
    "linear_two": ("small", dict(method="linear", vlm_weight=2.0, experts=[("expert-a", 1.0, 1.0), ("expert-b", 0.5, 1.0)])),
    "slerp": ("small", dict(method="slerp", experts=[("expert-a", 0.6, 1.0)])),
    "slerp_t": ("small", dict(method="slerp", parameters={"t": 0.3}, experts=[("expert-a", 1.0, 1.0)])),
    "model_stock": ("small", dict(method="model_stock", experts=[("expert-a", 1.0, 1.0), ("expert-b", 1.0, 1.0)])),
    "model_stock_symmetric_rows": ("small", dict(method="model_stock", mode="symmetric",
                                                 parameters={"filter_wise": True}, experts=[("expert-a", 1.0, 1.0)])),
    "layerswap": ("small", dict(method="layerswap", parameters={"first_k": 1, "last_k": 0},
                                experts=[("expert-a", 1.0, 1.0)])),
    # tensors of more than one engine row block
    "large_ta": ("large", dict(method="ta", experts=[("expert-a", 0.8, 1.0)])),
    "large_dare": ("large", dict(method="dare", seed=3, experts=[("expert-a", 1.0, 0.4)])),
    "large_dare_ties": ("large", dict(method="dare_ties", experts=[("expert-a", 1.0, 0.5), ("expert-b", 0.6, 0.5)])),
    "large_ties": ("large", dict(method="ties", experts=[("expert-a", 1.0, 0.3)])),
    "large_breadcrumbs_ties_symmetric": ("large", dict(method="breadcrumbs_ties", mode="symmetric",
                                                       experts=[("expert-a", 1.0, 0.5)])),
    "large_della": ("large", dict(method="della", experts=[("expert-a", 1.0, 0.5)])),
    "large_consensus": ("large", dict(method="consensus", experts=[("expert-a", 1.0, 1.0), ("expert-b", 0.8, 1.0)])),
    "large_linear": ("large", dict(method="linear", experts=[("expert-a", 0.5, 1.0)])),
}

FIXTURES = {
    "small": dict(vocab=64, hidden=16, inter=24, layers=3, dtype=torch.float32),
    "small_bf16": dict(vocab=64, hidden=16, inter=24, layers=3, dtype=torch.bfloat16),
    # 2100 x 2048 = 4.3M entries: the embedding and LM head span two engine row blocks
    "large": dict(vocab=2100, hidden=2048, inter=8, layers=1, dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bitid")
    return {name: build_fixture(root / name, **kw) for name, kw in FIXTURES.items()}


def weights_digest(out: Path) -> str:
    """sha256 over every output tensor's name, dtype, shape and bytes, in name order."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _recipe(paths: dict[str, Path], fields: dict) -> Recipe:
    fields = dict(fields)
    experts = [{"model": str(paths[k]), "scale": s, "density": d} for k, s, d in fields.pop("experts")]
    return Recipe(vlm=str(paths["vlm"]), base=str(paths["base"]), experts=experts, **fields)


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return json.loads(DATA.read_text()) if DATA.is_file() and not RECORD else {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Reductions (norms, SVDs) summed in one fixed order whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_recorded: dict[str, str] = {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_is_bit_identical(case, fixtures, reference, tmp_path):
    fixture, fields = CASES[case]
    res = inject(_recipe(fixtures[fixture], fields), tmp_path / "out", progress=False)
    digest = weights_digest(res.out_dir)
    if RECORD:
        _recorded[case] = digest
        DATA.parent.mkdir(exist_ok=True)
        DATA.write_text(json.dumps(dict(sorted({**json.loads(DATA.read_text() if DATA.is_file() else "{}"),
                                                   **_recorded}.items())), indent=1) + "\n")
        return
    assert case in reference, f"no reference hash for {case}; record with SKILLGRAFT_RECORD_HASHES=1"
    assert digest == reference[case], f"{case}: output differs from the recorded reference"
