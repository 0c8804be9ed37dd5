"""Shared fixtures: tiny real checkpoints built with transformers (no hub, a second each)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# test helpers (toy_evaluator, vlm_factories) importable in the subprocesses and Ray workers tests start
_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)


@dataclass
class Triple:
    vlm: Path
    base: Path
    expert: Path
    root: Path


def _perturbed(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def build_llava_triple(
    root: Path,
    *,
    vocab: int = 64,
    vlm_extra_rows: int = 4,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bin_files: bool = False,
) -> Triple:
    """A base LLM, an expert fine-tuned from it (base + noise) and a LLaVA whose LM is base + other noise."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **text)).to(dtype)
    base.save_pretrained(root / "base")
    expert = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **text)).to(dtype)
    expert.load_state_dict(base.state_dict())
    _perturbed(expert, 0.01, seed + 1)
    expert.save_pretrained(root / "expert")
    vlm_vocab = vocab + vlm_extra_rows
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=14)
    vlm = LlavaForConditionalGeneration(
        LlavaConfig(text_config=LlamaConfig(vocab_size=vlm_vocab, **text), vision_config=vision,
                    image_token_index=vlm_vocab - 1)
    ).to(dtype)
    with torch.no_grad():
        sd = base.state_dict()
        lm = vlm.model.language_model
        for name, p in lm.named_parameters():
            src = sd["model." + name]
            p[: src.shape[0]].copy_(src) if name == "embed_tokens.weight" else p.copy_(src)
        vlm.lm_head.weight[:vocab].copy_(sd["lm_head.weight"])
        _perturbed(lm, 0.01, seed + 2)
    vlm.save_pretrained(root / "vlm")
    (root / "vlm" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (root / "vlm" / "chat_template.jinja").write_text("{{ messages }}")
    if bin_files:  # transformers 5 always writes safetensors; write the legacy pickle format by hand
        from safetensors.torch import load_file

        for d in ("vlm", "base", "expert"):
            st = root / d / "model.safetensors"
            torch.save(load_file(st), root / d / "pytorch_model.bin")
            st.unlink()
    return Triple(root / "vlm", root / "base", root / "expert", root)


@pytest.fixture(scope="session")
def llava_triple(tmp_path_factory: pytest.TempPathFactory) -> Triple:
    return build_llava_triple(tmp_path_factory.mktemp("llava"))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (single or sharded)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out
