"""``skill export-lora``: a skill (or LoRA adapter) as a PEFT LoRA adapter on a VLM's own modules.

The adapter's targets are the module names of the VLM as transformers loads it (found by
building the model on the meta device, no weights), mapped to the skill's plain causal-LM
names by the same planner ``inject`` uses: the VLM's LM prefix, Mllama's cross-attention
layers skipped and later layers renumbered, vocabulary rows the skill does not cover left at
zero. The merge scale is folded into ``lora_B`` (``lora_alpha = r``: PEFT's scaling is 1), so

    PeftModel.from_pretrained(vlm_model, ADAPTER)

computes what ``skillgraft inject VLM SKILL --method ta --scale S`` writes: linear and embedding
deltas as LoRA factors (a ``lowrank`` skill's own, an adapter's own, or a truncated SVD of
another format at the rank or energy asked), bias deltas as ``lora_B.bias`` (``lora_bias``), and
1-D tensors (norm weights) as ``modules_to_save`` holding the VLM's value plus the scaled delta.
A tied LM head gets the embedding's delta too, as in the merged checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import SkillgraftError
from ..io.outdir import MARKER, OutputDir, local_inputs
from ..io.reader import CheckpointReader, TensorIndex
from ..io.resolve import resolve_checkpoint
from ..mapping.plan import build_plan
from ..report import write_json
from ..version import __version__
from . import compress as C
from .detect import expert_kind, open_expert
from .experts import OpenedExperts, check_lineage

ADAPTER_WEIGHTS = "adapter_model.safetensors"
log = logging.getLogger("skillgraft")


class ModuleView(TensorIndex):
    """The reader interface over a model's parameters (no values): names, shapes, dtypes, config.

    Tied parameters are listed once, under their first name; ``aliases`` maps the others to it.
    """

    format = "memory"

    def __init__(self, model: torch.nn.Module, root: Path):
        self.root = root
        self.config: dict[str, Any] = model.config.to_dict()
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self.aliases: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                self.aliases[name] = first[id(p)]
                continue
            first[id(p)] = name
            self._shape[name], self._dtype[name] = tuple(p.shape), p.dtype

    def get(self, name: str) -> torch.Tensor:
        raise RuntimeError("a module view holds no values")

    get_rows = get

    def close(self) -> None:
        pass


def meta_model(vlm_dir: Path) -> torch.nn.Module:
    """The VLM's transformers model (its ``architectures[0]`` class) on the meta device: names, no weights."""
    import transformers  # deferred: transformers, not loaded by a merge

    try:
        config = transformers.AutoConfig.from_pretrained(str(vlm_dir))
    except Exception as e:  # unknown model_type, broken config: the user's to fix
        raise SkillgraftError(f"vlm {vlm_dir}: transformers cannot read its config ({str(e).splitlines()[0]})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SkillgraftError(f"vlm {vlm_dir}: its config names no model class transformers knows "
                              f"(architectures {getattr(config, 'architectures', None)}); a LoRA adapter "
                              f"targets the modules of that class")
    with torch.device("meta"):
        return cls._from_config(config)


@dataclass
class ExportResult:
    out_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]


def _factors(reader: Any, name: str, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    f = reader.factors(name)
    if f is not None:
        return f
    if rank is None and energy is None:
        raise SkillgraftError(f"{reader.root} stores {name} as {getattr(reader, 'format', 'full')}, not low-rank: "
                              f"give a rank or an energy fraction to factorise it into LoRA factors")
    return C.lowrank_factors(reader.get(name), rank=rank, energy=energy)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (vocabulary rows the skill does not cover)."""
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _whole_value(vr: CheckpointReader, ce: Any, sr: Any, dname: str, scale: float, name: str) -> torch.Tensor:
    """What ``inject`` writes for one tensor: the VLM's value plus the scaled delta on the shared rows."""
    if ce is None:
        raise SkillgraftError(f"{name}: no counterpart in the VLM checkpoint {vr.root}")
    value = vr.get(ce.name).float()
    n = ce.rows if ce.rows is not None else (value.shape[0] if value.dim() else None)
    d = sr.get_rows(dname, n) * scale
    if value.dim():
        value[:n] += d[:n]
    else:
        value += d
    return value.to(vr.dtype(ce.name))


def export_lora(
    skill: str | Path,
    vlm: str | Path,
    out: str | Path,
    *,
    scale: float = 1.0,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
    ignore_lineage: bool = False,
    on_warning: Any = None,
) -> ExportResult:
    """Write a PEFT LoRA adapter for ``vlm`` that adds ``scale`` times the skill's task vector.

    ``out`` is claimed before any work as ``inject`` claims it (``io.outdir.OutputDir``): it must not
    be, hold or lie inside the skill or the VLM, and ``force`` replaces only a previous skillgraft
    output (the adapter's ``skillgraft_report.json`` lists its files).
    Warnings go to ``on_warning(message)`` when given, else to the ``skillgraft`` logger."""
    skill_dir = Path(skill)
    if not skill_dir.is_dir() or expert_kind(skill_dir) == "checkpoint":
        raise SkillgraftError(f"{skill_dir} is not a skill directory (skill.json) or a PEFT LoRA adapter")
    if not math.isfinite(scale):
        raise SkillgraftError(f"scale must be a finite number, got {scale}")
    if rank is not None and rank < 1:
        raise SkillgraftError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise SkillgraftError(f"energy must be in (0, 1], got {energy}")
    out = Path(out)
    with ExitStack() as stack:
        refs = [("skill", skill_dir), ("VLM", vlm)]
        claim = stack.enter_context(OutputDir(out, force, inputs=local_inputs(refs), log=on_warning or log.warning))
        vlm_dir = resolve_checkpoint(str(vlm), "vlm")
        claim.check_inputs([("VLM", vlm_dir)])
        sr = stack.enter_context(open_expert(skill_dir, None))
        vr = stack.enter_context(CheckpointReader(vlm_dir))
        cplan = build_plan(vr, [("skill", sr)], None, allow_unmatched=True)
        opened = OpenedExperts([("skill", sr)], None, {"skill": sr.describe()}, {"skill": sr})
        warnings = check_lineage(opened, cplan.vlm, ignore=ignore_lineage)
        model = meta_model(vlm_dir)
        view = ModuleView(model, vlm_dir)
        mplan = build_plan(view, [("skill", sr)], None, allow_unmatched=True)
        in_ckpt = {e.lm_name: e for e in cplan.entries if e.action == "merge"}
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        saved: list[str] = []
        biases: dict[str, torch.Tensor] = {}
        by_rel_module: dict[str, str] = {}
        merges = [e for e in mplan.entries if e.action == "merge" and e.expert_names[0] in sr.names]  # not zero deltas
        # PEFT's lora_bias (how a bias delta rides along) is one switch for every target and is refused for
        # embedding layers: with bias deltas, an embedding delta is saved whole instead
        with_bias = any(e.name.endswith(".bias") and len(e.shape) == 1 and
                        isinstance(model.get_submodule(e.name.rsplit(".", 1)[0]), torch.nn.Linear) for e in merges)
        for e in merges:
            dname = e.expert_names[0]
            module_name, param = e.name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            rows = e.shape[0] if e.shape else 0
            key = f"base_model.model.{module_name}"
            whole_embedding = with_bias and isinstance(module, torch.nn.Embedding)
            if whole_embedding:
                warnings.append(f"{module_name} is saved whole ({math.prod(e.shape)} values): PEFT's lora_bias, needed "
                                f"for the skill's bias deltas, does not support embedding layers")
            if whole_embedding or len(e.shape) <= 1 and not (param == "bias" and isinstance(module, torch.nn.Linear)):
                saved.append(module_name)
                tensors[f"{key}.{param}"] = _whole_value(vr, in_ckpt.get(e.lm_name), sr, dname, scale, e.name)
            elif param == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and len(e.shape) == 2:
                b, a = _factors(sr, dname, rank, energy)
                b = _pad_rows(b * scale, rows)
                if isinstance(module, torch.nn.Embedding):  # PEFT: delta = (lora_embedding_B @ lora_embedding_A)^T
                    tensors[f"{key}.lora_embedding_A"] = b.T.contiguous()
                    tensors[f"{key}.lora_embedding_B"] = a.T.contiguous()
                else:
                    tensors[f"{key}.lora_A.weight"] = a.contiguous()
                    tensors[f"{key}.lora_B.weight"] = b.contiguous()
                ranks[module_name] = a.shape[0]
                by_rel_module[e.lm_name] = module_name
            elif param == "bias" and isinstance(module, torch.nn.Linear):
                biases[module_name] = _pad_rows(sr.get(dname) * scale, rows)
            else:
                raise SkillgraftError(f"{e.name} ({type(module).__name__}) cannot be expressed as a LoRA adapter")
        # a tied head shares the embedding's weight: the merged checkpoint changes both uses of it
        for alias, target in view.aliases.items():
            rel = mplan.vlm.layout.lm_name(target)
            src_module = by_rel_module.get(rel) if rel else None
            alias_module, param = alias.rsplit(".", 1)
            if src_module is None or param != "weight" or not isinstance(model.get_submodule(alias_module), torch.nn.Linear):
                continue
            src = f"base_model.model.{src_module}"
            b = tensors[f"{src}.lora_embedding_A"].T if f"{src}.lora_embedding_A" in tensors else tensors[f"{src}.lora_B.weight"]
            a = tensors[f"{src}.lora_embedding_B"].T if f"{src}.lora_embedding_B" in tensors else tensors[f"{src}.lora_A.weight"]
            tensors[f"base_model.model.{alias_module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{alias_module}.lora_B.weight"] = b.contiguous()
            ranks[alias_module] = a.shape[0]
        for module_name, bias in biases.items():  # a bias delta rides on lora_B.bias of a (zero) LoRA
            key = f"base_model.model.{module_name}"
            if module_name not in ranks:
                mod = model.get_submodule(module_name)
                tensors[f"{key}.lora_A.weight"] = torch.zeros(1, mod.in_features)
                tensors[f"{key}.lora_B.weight"] = torch.zeros(mod.out_features, 1)
                ranks[module_name] = 1
            tensors[f"{key}.lora_B.bias"] = bias
        if biases:
            for module_name in ranks:
                key = f"base_model.model.{module_name}.lora_B.bias"
                if key not in tensors and f"base_model.model.{module_name}.lora_B.weight" in tensors:
                    tensors[key] = torch.zeros(tensors[f"base_model.model.{module_name}.lora_B.weight"].shape[0])
        if not ranks and not saved:
            raise SkillgraftError("the skill changes none of the VLM's language-model modules; nothing to export")
        r_default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
        pattern = {m: r for m, r in ranks.items() if r != r_default}
        config = {
            "peft_type": "LORA",
            "base_model_name_or_path": str(vlm),
            "r": r_default,
            "lora_alpha": r_default,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks),
            "modules_to_save": sorted(set(saved)) or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": bool(biases),
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "task_type": None,
        }
        summary = {"skill": str(skill_dir), "vlm": str(vlm), "scale": scale, "targets": len(ranks),
                   "modules_to_save": len(set(saved)), "ranks": dict(Counter(ranks.values())),
                   "lineage": opened.sources["skill"].get("lineage_distance"), "warnings": warnings + mplan.warnings,
                   "created_with": f"skillgraft {__version__}"}
        with claim.stage() as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            (tmp / "README.md").write_text(_card(summary))
            # the record that makes OUT skillgraft's own output (--force may replace it)
            write_json(tmp / MARKER, {"skillgraft_version": __version__, "command": "skill export-lora", **summary,
                                      "files": [ADAPTER_WEIGHTS, "adapter_config.json", "README.md"]})
    for w in summary["warnings"]:
        (on_warning or log.warning)(w)
    return ExportResult(out, config, summary)


def _card(s: dict[str, Any]) -> str:
    return f"""---
library_name: peft
base_model: {s['vlm']}
tags:
- skillgraft
- lora
---

# LoRA adapter: skill `{s['skill']}` on `{s['vlm']}`

Written by {s['created_with']} (`skill export-lora`): the skill's task vector at scale {s['scale']}, on the
language-model modules of the VLM ({s['targets']} LoRA targets, ranks {s['ranks']}; {s['modules_to_save']} small
modules saved whole). Loaded with PEFT it computes what `skillgraft inject VLM SKILL --scale {s['scale']}` writes:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(vlm_model, "THIS_DIRECTORY")
```
"""
