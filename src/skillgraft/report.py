"""What a merge leaves next to its weights: the JSON report, the model card, the plan table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .version import __version__
from .io.resolve import Resolved, display_name
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


def _strict(x: Any) -> Any:
    """``x`` with every non-finite float spelled as a string ("nan", "inf", "-inf"): strict JSON has none."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as strict JSON (RFC 8259: no NaN or Infinity), readable by any parser."""
    path.write_text(json.dumps(_strict(data), indent=1, default=str, allow_nan=False))


CARD_TAGS = ["skillgraft", "merge", "cross-modal-skill-injection"]
# carried from the VLM's own card when it has them; the pipeline tag falls back to the config
_CARRIED = ("license", "license_name", "license_link", "pipeline_tag", "language")


def vlm_card_metadata(vlm_dir: Path) -> dict[str, Any]:
    """What the merged model's card inherits from the VLM: license and pipeline tag (and language),
    read from the VLM's own card front matter, else the pipeline tag implied by its config."""
    meta: dict[str, Any] = {}
    card = Path(vlm_dir) / "README.md"
    if card.is_file():
        try:
            front = yaml.safe_load(_front_matter(card.read_text(errors="replace"))) or {}
        except yaml.YAMLError:
            front = {}
        if isinstance(front, dict):
            meta = {k: front[k] for k in _CARRIED if front.get(k) not in (None, "", [])}
    if "pipeline_tag" not in meta:
        try:
            config = json.loads((Path(vlm_dir) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if isinstance(config, dict) and config:
            meta["pipeline_tag"] = "image-text-to-text" if config.get("vision_config") else "text-generation"
    return meta


def _front_matter(text: str) -> str:
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return ""
    for i, line in enumerate(lines[1:], 1):
        if line.strip() == "---":
            return "\n".join(lines[1:i])
    return ""


def card_metadata(resolved: dict[str, Resolved], vlm_meta: dict[str, Any]) -> dict[str, Any]:
    """The card's front matter as a dict: hub ids of the inputs (VLM first), the merge relation,
    the library, tags, and what is carried from the VLM's card."""
    hub_ids: list[str] = []
    order = ["vlm", *[k for k in resolved if k not in ("vlm", "base")], "base"]
    for role in order:
        r = resolved.get(role)
        if r is not None and r.repo_id and r.repo_id not in hub_ids:
            hub_ids.append(r.repo_id)
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta.update({k: vlm_meta[k] for k in _CARRIED if k in vlm_meta})
    meta["tags"] = list(CARD_TAGS)
    return meta


def model_card(recipe: Recipe, report: dict[str, Any], resolved: dict[str, Resolved] | None = None,
               vlm_meta: dict[str, Any] | None = None) -> str:
    """A README.md for the merged checkpoint that the hub reads: front matter (base models, merge
    relation, library, license and pipeline tag from the VLM) and a body with the inputs and their
    revisions, the method, the scales, the recipe and what was merged."""
    resolved = resolved or {}
    meta = card_metadata(resolved, vlm_meta or {})
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    c = report["counts"]
    roles = [("VLM", "vlm", recipe.vlm), *[(f"expert `{e.label}`", e.label, e.model) for e in recipe.experts]]
    if recipe.base is not None:
        roles.append(("base LLM", "base", recipe.base))
    inputs = "\n".join(_input_row(what, resolved.get(key), ref) for what, key, ref in roles)
    scales = "\n".join(
        f"| {e['label']} | {_num(e['scale'])} | {_num(e['density'])} |" for e in report["experts"]
    )
    params = json.dumps(recipe.parameters) if recipe.parameters else "defaults"
    name = display_name(recipe.vlm)
    return f"""---
{front}---

# {name} + {", ".join(e.label for e in recipe.experts)} (skillgraft merge)

The language model of the VLM below was merged with the expert LLM(s) below by skillgraft
{report['skillgraft_version']}, relative to the base LLM they both derive from: cross-modal skill
injection (Xu et al., *Investigating Cross-Modal Skill Injection: Scenarios, Methods, and
Hyperparameters*, ACL 2026). Everything that is not language model (vision tower, projector,
VLM-only vocabulary rows and layers) is the VLM's, bit for bit.

## Inputs

| role | checkpoint | revision |
|---|---|---|
{inputs}

## Method

**{recipe.method}** in **{recipe.mode}** mode, seed {recipe.seed}, output dtype {recipe.dtype};
method parameters: `{params}`.

| expert | scale | density |
|---|---|---|
{scales}

Tensors: {c['merged']} merged ({c['row_sliced']} on the overlapping vocabulary rows only), {c['copied']} copied
from the VLM, {c['total']} in all; {len(report.get('warnings') or [])} warning(s).
`skillgraft_report.json` lists what happened to every tensor.

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```

Reproduce with `skillgraft inject --recipe skillgraft_recipe.yaml -o OUT`.
"""


def _input_row(what: str, r: Resolved | None, ref: str) -> str:
    if r is not None and r.repo_id:
        link = f"[{r.repo_id}](https://huggingface.co/{r.repo_id})"
        return f"| {what} | {link} | `{r.commit or r.revision or 'main'}` |"
    return f"| {what} | `{ref}` | local directory |"


def _num(v: Any) -> str:
    if isinstance(v, list):
        return "per-layer schedule " + ", ".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


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
