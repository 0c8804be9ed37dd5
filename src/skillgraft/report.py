"""What a merge leaves next to its weights: the JSON report, the model card, the plan table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .version import __version__
from .mapping.plan import Plan
from .recipe import Recipe


def build_report(recipe: Recipe, plan: Plan, tensors: dict[str, dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """``skillgraft_report.json``: counts, layouts, every unmatched name, per-tensor statistics."""
    layouts = {
        ck.label: {"family": ck.layout.family, "lm_prefix": ck.layout.prefix, "lm_head": ck.layout.head,
                   "tied_embeddings": ck.layout.tied, "skip_layers": sorted(ck.layout.skip_layers), "detected": ck.layout.how}
        for ck in [plan.vlm, *plan.experts, *([plan.base] if plan.base else [])]
    }
    return {
        "skillgraft_version": __version__,
        "vlm": recipe.vlm,
        "base": recipe.base,
        "experts": [{"label": e.label, "model": e.model, "scale": e.scale, "density": e.density} for e in recipe.experts],
        "method": recipe.method,
        "mode": recipe.mode,
        "parameters": recipe.parameters,
        "seed": recipe.seed,
        "layouts": layouts,
        "decoder_layers": plan.n_layers,
        "counts": plan.counts(),
        "copied_by_reason": plan.copy_reasons(),
        "exclude": recipe.exclude,
        "unmatched": {"vlm": plan.unmatched_vlm, "unused_source_tensors": plan.unused},
        "warnings": plan.warnings,
        **extra,
        "tensors": tensors,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


def model_card(recipe: Recipe, report: dict[str, Any]) -> str:
    """A README.md for the merged checkpoint: inputs, method, scales and what was merged."""
    c = report["counts"]
    experts = "\n".join(f"| {e['label']} | `{e['model']}` | {e['scale']} | {e['density']} |" for e in report["experts"])
    base_models = [recipe.vlm, *(e.model for e in recipe.experts)]
    front = "---\nbase_model:\n" + "".join(f"- {m}\n" for m in base_models) + "tags:\n- skillgraft\n- merge\n---\n"
    return f"""{front}
# Merged with skillgraft {report['skillgraft_version']}

The language model of the VLM `{recipe.vlm}` was merged with the expert(s) below, relative to the
base LLM `{recipe.base}`, using **{recipe.method}** in **{recipe.mode}** mode (seed {recipe.seed}).
Everything that is not language model (vision tower, projector, VLM-only vocabulary rows and layers)
is copied from the VLM unchanged.

| expert | checkpoint | scale | density |
|---|---|---|---|
{experts}

Tensors: {c['merged']} merged ({c['row_sliced']} on the overlapping vocabulary rows only), {c['copied']} copied
from the VLM, {c['total']} in all. Method parameters: `{json.dumps(recipe.parameters)}`.

Reproduce with:

    skillgraft inject --recipe skillgraft_recipe.yaml -o OUT

`skillgraft_report.json` lists what happened to every tensor.
"""


def plan_table(plan: Plan, max_rows: int | None = None) -> str:
    """The plan as a plain-text table (``--dry-run``)."""
    rows = [("tensor", "action", "from", "rows", "reason")]
    for e in plan.entries:
        src = e.expert_names[0] if e.expert_names else ""
        rows.append((e.name, e.action, src, str(e.rows) if e.row_sliced else "", e.reason))
    shown = rows if max_rows is None else rows[: max_rows + 1]
    widths = [max(len(r[i]) for r in shown) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in shown]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if max_rows is not None and len(rows) - 1 > max_rows:
        lines.append(f"... {len(rows) - 1 - max_rows} more")
    c = plan.counts()
    lines.append(
        f"\n{c['total']} tensors: {c['merged']} merged ({c['row_sliced']} row-sliced), {c['copied']} copied "
        f"({', '.join(f'{n} {r}' for r, n in plan.copy_reasons().items()) or 'none'}); "
        f"{plan.n_layers} decoder layers; unmatched: {len(plan.unmatched_vlm)}"
    )
    return "\n".join(lines)
