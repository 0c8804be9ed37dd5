"""Build a synthetic Llama-layout triple for benchmarks: base, "VLM language model", expert.

About 1B parameters each in bfloat16 (default: hidden 2048, MLP 5632, 19 layers, vocab 32000 ->
0.97B), written as sharded safetensors with an index and a LlamaForCausalLM config.json, the way
``save_pretrained`` lays them out, so mergekit and skillgraft both read them. The VLM and the expert
are the base plus small independent deltas (a fine-tune's scale), so sparsifying methods see
realistic task vectors. No weights are downloaded; generation is seeded.

    python bench/make_synthetic.py /tmp/skillgraft-bench            # ~5.8 GB on disk
    python bench/make_synthetic.py /tmp/skillgraft-bench-small --layers 4  # a quick small triple
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def layer_shapes(hidden: int, inter: int, n_heads: int, n_kv: int) -> dict[str, tuple[int, ...]]:
    head = hidden // n_heads
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (n_kv * head, hidden),
        "self_attn.v_proj.weight": (n_kv * head, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def tensor_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    per_layer = layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    for i in range(args.layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    shapes["model.norm.weight"] = (args.hidden,)
    shapes["lm_head.weight"] = (args.vocab, args.hidden)
    return shapes


def config(args: argparse.Namespace) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_model(out: Path, tensors_fn, shapes: dict[str, tuple[int, ...]], cfg: dict, shard_bytes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = 2 * int(torch.Size(shapes[n]).numel())
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    weight_map = {}
    total = 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {n: tensors_fn(n) for n in group}
        total += sum(t.numel() * t.element_size() for t in data.values())
        save_file(data, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del data
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--delta", type=float, default=0.05, help="task-vector std relative to the weights' std")
    ap.add_argument("--shard-size", type=float, default=1.0, help="GB per shard")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    for label in ("base", "vlm", "expert"):
        d = args.out / label
        if d.exists() and any(d.iterdir()) and os.environ.get("PYTHONHASHSEED") != "0":
            ap.error(f"{d} exists and is not empty; pick another directory (this script never overwrites)")

    shapes = tensor_shapes(args)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    cfg = config(args)
    shard_bytes = int(args.shard_size * 1e9)

    def seeded(name: str, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((args.seed, salt, name)) & 0x7FFFFFFF)

    def base_tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * torch.randn(shape, generator=seeded(name, 0))).to(torch.bfloat16)
        return (0.02 * torch.randn(shape, generator=seeded(name, 0))).to(torch.bfloat16)

    def derived(salt: int):
        def fn(name: str) -> torch.Tensor:
            b = base_tensor(name).float()
            std = 0.1 if name.endswith("norm.weight") else 0.02
            d = args.delta * std * torch.randn(b.shape, generator=seeded(name, salt))
            return (b + d).to(torch.bfloat16)

        return fn

    # hash() of a tuple of str is salted per process; make it stable
    if os.environ.get("PYTHONHASHSEED") != "0":
        import subprocess
        import sys

        env = {**os.environ, "PYTHONHASHSEED": "0"}
        raise SystemExit(subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:])], env=env))

    for label, fn in (("base", base_tensor), ("vlm", derived(1)), ("expert", derived(2))):
        write_model(args.out / label, fn, shapes, cfg, shard_bytes)
        print(f"wrote {args.out / label}: {n_params / 1e9:.3f}B parameters, bf16")


if __name__ == "__main__":
    main()
