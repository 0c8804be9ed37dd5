"""``skill info`` and ``skill list``: what a skill (or LoRA adapter) is, and a folder of them as a library."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from .card import human_bytes, overall_error, settings_text
from .detect import expert_kind
from .lora import LoraReader
from .reader import SkillReader


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files directly in ``path`` (a skill or adapter directory)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())


def skill_info(path: str | Path) -> dict[str, Any]:
    """A summary of a skill or PEFT LoRA adapter directory (opens and checks it; reads no values)."""
    p = Path(path)
    if not p.is_dir():
        raise SkillgraftError(f"skill directory not found: {p}")
    kind = expert_kind(p)
    size = dir_bytes(p)
    if kind == "skill":
        with SkillReader(p) as r:
            meta = r.meta
            expert, base = meta.get("expert") or {}, meta["base"]
            lm_bytes, lm_numel = expert.get("lm_bytes"), expert.get("lm_numel")
            tensors = meta["tensors"]
            return {
                "path": str(p), "kind": "skill", "format": r.format, "settings": meta.get("settings") or {},
                "format_version": meta.get("skillgraft_skill"), "size_bytes": size, "weights_bytes": meta.get("bytes"),
                "expert": expert.get("id"), "expert_dtype": expert.get("dtype"), "expert_lm_bytes": lm_bytes,
                "ratio_to_expert_lm": size / lm_bytes if lm_bytes else None,
                "ratio_to_expert_lm_bf16": size / (2 * lm_numel) if lm_numel else None,
                "base": base.get("id"), "base_model_type": base.get("model_type"), "decoder_layers": base.get("n_layers"),
                "tensors": len(tensors), "stored_as": dict(Counter(t["kind"] for t in tensors.values())),
                "rel_error": overall_error(tensors),
                "max_rel_error": max((t.get("rel_error") or 0.0 for t in tensors.values()), default=0.0),
                "fingerprint_tensors": sorted((meta.get("fingerprint") or {}).get("tensors", {})),
            }
    if kind == "lora":
        with LoraReader(p, None, require_base=False) as r:
            d = r.describe()
            return {"path": str(p), "kind": "lora", "format": "lora", "size_bytes": size,
                    "base": d["base_model_name_or_path"], "r": d["r"], "lora_alpha": d["lora_alpha"],
                    "use_rslora": d["use_rslora"], "tensors": len(r.names), "targets": d["targets"],
                    "saves_whole_modules": sorted(set(r.saved_modules))}
    raise SkillgraftError(f"{p} is neither a skill (skill.json) nor a PEFT adapter (adapter_config.json)")


def format_info(info: dict[str, Any]) -> str:
    """``skill info`` as text."""
    if info["kind"] == "lora":
        lines = [
            f"{info['path']}: PEFT LoRA adapter, r {info['r']}, alpha {info['lora_alpha']}"
            + (" (rsLoRA)" if info["use_rslora"] else ""),
            f"  size      {human_bytes(info['size_bytes'])}",
            f"  base      {info['base']}",
            f"  tensors   {info['tensors']} deltas over {len(info['targets'])} modules",
        ]
        return "\n".join(lines)
    ratio = info["ratio_to_expert_lm"]
    lines = [
        f"{info['path']}: skill, {settings_text(info['format'], info['settings'])}",
        f"  size      {human_bytes(info['size_bytes'])}"
        + (f" = {ratio:.4f} of the expert's language model ({human_bytes(info['expert_lm_bytes'])}, "
           f"{info['expert_dtype']}); {info['ratio_to_expert_lm_bf16']:.4f} of it in bfloat16" if ratio else ""),
        f"  expert    {info['expert']}",
        f"  base      {info['base']} ({info['base_model_type']}, {info['decoder_layers']} decoder layers)",
        f"  tensors   {info['tensors']} (" + ", ".join(f"{n} {k}" for k, n in info["stored_as"].items()) + ")",
        f"  error     relative reconstruction error {info['rel_error']:.4f} overall, {info['max_rel_error']:.4f} at worst",
    ]
    return "\n".join(lines)


def list_skills(folder: str | Path) -> list[dict[str, Any]]:
    """Every skill and LoRA adapter directly under ``folder`` (a library), sorted by name.

    A damaged entry is listed with its error instead of stopping the listing.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SkillgraftError(f"skill library not found: {root}")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if expert_kind(d) == "checkpoint":
            continue
        try:
            out.append(skill_info(d))
        except SkillgraftError as e:
            out.append({"path": str(d), "kind": expert_kind(d), "error": str(e)})
    return out


def format_list(items: list[dict[str, Any]]) -> str:
    rows = [("name", "format", "size", "base")]
    for it in items:
        name = Path(it["path"]).name
        if "error" in it:
            rows.append((name, it["kind"], "-", f"damaged: {it['error']}"))
        elif it["kind"] == "lora":
            rows.append((name, f"lora r{it['r']}", human_bytes(it["size_bytes"]), str(it["base"])))
        else:
            rows.append((name, settings_text(it["format"], it["settings"]), human_bytes(it["size_bytes"]), str(it["base"])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]).rstrip() for r in rows)
