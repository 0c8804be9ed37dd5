"""Build a synthetic triple for benchmarks: a base LLM, an expert, and the VLM's language model.

The VLM's language model and the expert are the base plus small independent deltas (a fine-tune's
scale), so sparsifying methods see realistic task vectors. Weights are seeded random bf16 values,
generated and written in row chunks (memory stays small whatever the widths), as sharded
safetensors with an index and a config.json, the way ``save_pretrained`` lays them out, so both
mergekit and skillgraft read them. No weights are downloaded.

- ``--arch llama`` (default: hidden 2048, MLP 5632, 19 layers, vocab 32000 -> 0.97B parameters):
  ``base/``, ``vlm/`` (an LLM standing for the VLM's language model) and ``expert/``.
- ``--arch qwen2`` adds Qwen2's q/k/v biases; with ``--qwen2-vl`` the ``vlm/`` directory is a
  Qwen2-VL checkpoint (the same language-model shards, hard-linked, plus a vision tower under
  ``visual.``) and ``vlm-llm/`` is its language model alone, for tools that cannot read a VLM.

    python bench/make_synthetic.py /tmp/sg-1b                                     # ~5.8 GB
    python bench/make_synthetic.py /tmp/sg-72b --arch qwen2 --qwen2-vl --hidden 8192 \\
        --intermediate 29568 --layers 1 --heads 64 --kv-heads 8 --vocab 152064      # ~20 GB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from skillgraft.io.writer import ShardedWriter, TensorSpec  # noqa: E402

CHUNK = 1 << 24  # entries generated at a time


def layer_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    hidden, inter = args.hidden, args.intermediate
    kv = args.kv_heads * (hidden // args.heads)
    out = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if args.arch == "qwen2":
        out.update({"self_attn.q_proj.bias": (hidden,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    return out


def tensor_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    for i in range(args.layers):
        for k, s in layer_shapes(args).items():
            shapes[f"model.layers.{i}.{k}"] = s
    shapes["model.norm.weight"] = (args.hidden,)
    shapes["lm_head.weight"] = (args.vocab, args.hidden)
    return shapes


def vision_shapes(hidden: int, width: int = 1280, depth: int = 1) -> dict[str, tuple[int, ...]]:
    """A small Qwen2-VL vision tower (``visual.``): patch embedding, ``depth`` blocks, the merger."""
    shapes: dict[str, tuple[int, ...]] = {"visual.patch_embed.proj.weight": (width, 3, 2, 14, 14)}
    for i in range(depth):
        p = f"visual.blocks.{i}."
        shapes.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,), p + "attn.qkv.weight": (3 * width, width),
                       p + "attn.qkv.bias": (3 * width,), p + "attn.proj.weight": (width, width),
                       p + "attn.proj.bias": (width,), p + "norm2.weight": (width,), p + "norm2.bias": (width,),
                       p + "mlp.fc1.weight": (4 * width, width), p + "mlp.fc1.bias": (4 * width,),
                       p + "mlp.fc2.weight": (width, 4 * width), p + "mlp.fc2.bias": (width,)})
    shapes.update({"visual.merger.ln_q.weight": (width,), "visual.merger.ln_q.bias": (width,),
                   "visual.merger.mlp.0.weight": (4 * width, 4 * width), "visual.merger.mlp.0.bias": (4 * width,),
                   "visual.merger.mlp.2.weight": (hidden, 4 * width), "visual.merger.mlp.2.bias": (hidden,)})
    return shapes


def config(args: argparse.Namespace) -> dict:
    arch = "Qwen2ForCausalLM" if args.arch == "qwen2" else "LlamaForCausalLM"
    return {
        "architectures": [arch], "model_type": args.arch, "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def vl_config(args: argparse.Namespace) -> dict:
    text = config(args)
    return {**text, "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "vision_config": {"depth": 1, "embed_dim": 1280, "hidden_size": args.hidden, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2}}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def tensor_chunks(name: str, shape: tuple[int, ...], salt: int, seed: int, delta: float):
    """Row chunks of the bf16 tensor ``name``: base values (salt 0) or base + delta * noise (salt > 0)."""
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if shape else 1
    step = max(1, CHUNK // per_row)
    std = 0.1 if name.endswith("norm.weight") else 0.02
    center = 1.0 if name.endswith("norm.weight") else 0.0
    for i, r in enumerate(range(0, rows, step)):
        n = min(step, rows - r)
        chunk_shape = (n, *shape[1:]) if shape else ()
        b = center + std * torch.randn(chunk_shape, generator=torch.Generator().manual_seed(_seed(seed, 0, name, i)))
        b = b.to(torch.bfloat16)
        if salt:
            noise = torch.randn(chunk_shape, generator=torch.Generator().manual_seed(_seed(seed, salt, name, i)))
            b = (b.float() + delta * std * noise).to(torch.bfloat16)
        yield b


def write_model(out: Path, shapes: dict[str, tuple[int, ...]], cfg: dict, salt: int, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()]
    writer = ShardedWriter(out, specs, int(args.shard_size * 1e9))
    for name, shape in shapes.items():
        for block in tensor_chunks(name, shape, salt, args.seed, args.delta):
            writer.write_block(name, block)
    writer.finish()
    if len(writer.files) == 1:  # always an index, as save_pretrained writes for sharded models
        os.rename(out / "model.safetensors", out / "model-00001-of-00001.safetensors")
        index = {"metadata": {"total_size": writer.total_bytes},
                 "weight_map": {s.name: "model-00001-of-00001.safetensors" for s in specs}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def write_qwen2_vl(llm: Path, out: Path, args: argparse.Namespace) -> None:
    """A Qwen2-VL checkpoint: the language model's shards hard-linked, plus a vision shard."""
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        os.link(llm / f, out / f)
    vis = vision_shapes(args.hidden)
    tmp = out / "_vision"
    write_model(tmp, vis, {}, 1, args)
    name = "model-vision.safetensors"
    os.rename(tmp / "model-00001-of-00001.safetensors", out / name)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    index["weight_map"].update({n: name for n in vis})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(vl_config(args), indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--qwen2-vl", action="store_true", help="also write vlm/ as a Qwen2-VL checkpoint (needs --arch qwen2)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--delta", type=float, default=0.05, help="task-vector std relative to the weights' std")
    ap.add_argument("--shard-size", type=float, default=5.0, help="GB per shard")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.qwen2_vl and args.arch != "qwen2":
        ap.error("--qwen2-vl needs --arch qwen2")
    labels = ("base", "vlm-llm" if args.qwen2_vl else "vlm", "expert") + (("vlm",) if args.qwen2_vl else ())
    for label in labels:
        d = args.out / label
        if d.exists() and any(d.iterdir()):
            ap.error(f"{d} exists and is not empty; pick another directory (this script never overwrites)")
    shapes = tensor_shapes(args)
    n_params = sum(math.prod(s) for s in shapes.values())
    for label, salt in (("base", 0), (labels[1], 1), ("expert", 2)):
        write_model(args.out / label, shapes, config(args), salt, args)
        print(f"wrote {args.out / label}: {n_params / 1e9:.3f}B parameters, bf16", flush=True)
    if args.qwen2_vl:
        write_qwen2_vl(args.out / "vlm-llm", args.out / "vlm", args)
        print(f"wrote {args.out / 'vlm'}: Qwen2-VL, the language model of vlm-llm/ plus a vision tower", flush=True)


if __name__ == "__main__":
    main()
