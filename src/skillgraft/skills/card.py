"""The README.md card written next to a skill."""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def settings_text(fmt: str, settings: dict[str, Any]) -> str:
    """``lowrank rank 16 (bfloat16)``, ``sparse density 0.03``, ``full``..."""
    knobs = [f"{k} {v}" for k, v in settings.items() if k in ("rank", "energy", "density") and v is not None]
    dtype = settings.get("dtype")
    return " ".join([fmt, *knobs]) + (f" ({dtype})" if dtype and dtype != "auto" else "")


def overall_error(tensors: dict[str, dict[str, Any]]) -> float:
    """Relative reconstruction error over the whole task vector: sqrt(sum err^2) / sqrt(sum ||tau||^2)."""
    num = den = 0.0
    for t in tensors.values():
        d, e = t.get("delta_norm") or 0.0, t.get("rel_error") or 0.0
        num += (d * e) ** 2
        den += d * d
    return (num / den) ** 0.5 if den > 0 else 0.0


def skill_card(meta: dict[str, Any]) -> str:
    expert, base = meta["expert"], meta["base"]
    ratio = meta["bytes"] / expert["lm_bytes"] if expert.get("lm_bytes") else float("nan")
    worst = sorted(meta["tensors"].items(), key=lambda kv: -(kv[1].get("rel_error") or 0.0))[:5]
    rows = "\n".join(f"| `{n}` | {t['kind']} | {t.get('rel_error', 0):.4f} |" for n, t in worst)
    return f"""---
tags:
- skillgraft
- skill-vector
---

# Skill: `{expert['id']}` minus `{base['id']}`

A skill vector (task vector) extracted with {meta['created_with']}: the difference the expert's
fine-tuning made to its base, over the language model, stored as
**{settings_text(meta['format'], meta['settings'])}** in {human_bytes(meta['bytes'])}
({ratio:.3f} of the expert's language model, {human_bytes(expert['lm_bytes'])} in {expert['dtype']}).

- expert: `{expert['id']}` ({expert.get('model_type')})
- base: `{base['id']}` ({base.get('model_type')}, {base.get('n_layers')} decoder layers)
- tensors: {len(meta['tensors'])}, overall relative reconstruction error {overall_error(meta['tensors']):.4f}

Inject it into any VLM built on the same base (no expert and no base needed):

    skillgraft inject VLM {{this directory}} --scale 1.0 -o OUT

Or export it as a PEFT LoRA adapter on the VLM's own module names:

    skillgraft skill export-lora {{this directory}} --vlm VLM -o ADAPTER

`skill.json` holds per-tensor delta norms and reconstruction errors and a fingerprint of the base
(a few of its weights) against which a VLM's language model is checked before merging.

Largest relative reconstruction errors:

| tensor | stored as | relative error |
|---|---|---|
{rows}
"""
