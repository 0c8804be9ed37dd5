"""Synthetic Llama-layout checkpoints for benchmarks: a base, an expert and a target derived from it.

Sizes default to about 0.95B parameters (hidden 2048, 16 layers, MLP 5632, vocab 32000) in bf16,
written as sharded safetensors with a config that transformers recognises. Deltas are small
(1e-3 relative), as after fine-tuning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from skillgraft.io.writer import ShardedWriter, TensorSpec


def llama_shapes(hidden: int, layers: int, mlp: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)),
            (p + "mlp.up_proj.weight", (mlp, hidden)),
            (p + "mlp.down_proj.weight", (hidden, mlp)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def build(out: Path, *, hidden: int = 2048, layers: int = 16, mlp: int = 5632, vocab: int = 32000,
          dtype: torch.dtype = torch.bfloat16, shard_size: int = 2 * 10**9, seed: int = 0) -> dict[str, Path]:
    """Write base/, expert/ and target/ under ``out``; returns their paths."""
    shapes = llama_shapes(hidden, layers, mlp, vocab)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": vocab, "dtype": str(dtype).removeprefix("torch."),
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
    }
    dirs = {k: out / k for k in ("base", "expert", "target")}
    writers = {}
    for k, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        writers[k] = ShardedWriter(d, [TensorSpec(n, s, dtype) for n, s in shapes], shard_size)
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        base = torch.randn(shape, generator=g) * 0.02
        writers["base"].write(name, base.to(dtype))
        for k in ("expert", "target"):
            writers[k].write(name, (base + torch.randn(shape, generator=g) * 2e-5).to(dtype))
    for w in writers.values():
        w.finish()
    return dirs


def n_params(hidden: int = 2048, layers: int = 16, mlp: int = 5632, vocab: int = 32000) -> int:
    total = 0
    for _, shape in llama_shapes(hidden, layers, mlp, vocab):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    print(build(args.out, layers=args.layers), f"{n_params(layers=args.layers) / 1e9:.2f}B parameters each")
