"""What ``tune`` writes beside the checkpoint: ``skillgraft_tune.json`` (every candidate and the pick),
``skillgraft_tune.md`` (the curve as a table and how to reproduce), and optionally a PNG of the curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..extras import pyplot
from ..recipe import Recipe
from ..report import write_json
from ..version import __version__
from .objective import Candidate, Reference, z_of

JSON_NAME = "skillgraft_tune.json"
MD_NAME = "skillgraft_tune.md"
PNG_NAME = "skillgraft_tune.png"


def _scales(c: Candidate) -> str:
    return " ".join(f"{x:.3f}" for x in c.scales)


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(data: dict[str, Any], cands: list[Candidate], chosen: Candidate) -> str:
    head = "| scale(s) | stage | est. retention | std. error | answers kept | uptake | expert answers matched | feasible |"
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cands, key=lambda c: (len(c.scales), c.scales)):
        mark = " **(pick)**" if c is chosen else ""
        partial = "image_prompts_scored" in c.extra
        ret = f"<= {c.retention:.3f}" if partial else f"{c.retention:.3f}"
        rows.append(f"| {_scales(c)}{mark} | {c.stage} | {ret} | {'-' if partial else f'{c.retention_se:.3f}'} | "
                    f"{c.kept:.3f} | {_opt(c.uptake)} | {_opt(c.expert_match)} | {'yes' if c.feasible else 'no'} |")
    s = data["search"]
    o = data["objective"]
    bound = (f"; its {100 * o['confidence']:g}% lower bound {chosen.retention_lcb:.3f} clears the minimum "
             f"{o['min_retention']:g}" if chosen.retention_lcb is not None else f"; the minimum is {o['min_retention']:g}")
    scale = data["chosen"]["scale"]
    scale_text = f"{scale:g}" if isinstance(scale, float) else "per layer " + ",".join(f"{x:g}" for x in scale)
    return f"""# skillgraft tune

Chosen scale: **{scale_text}** (method {data['method']}), from {data['probes']['n_image']} image prompts
and {data['probes']['n_text']} text prompts, no labels.

- estimated retention of the VLM's own answers: {chosen.retention:.3f} +- {chosen.retention_se:.3f} (standard error){bound}
- uptake of the expert's answers (share of the NLL gap closed): {chosen.uptake:.3f}
- candidates scored: {len(cands)} (budget {s['budget']}{', per layer group too' if s['per_layer'] else ''}), scale range {s['range'][0]:g}:{s['range'][1]:g}
- time: {data['seconds']['total_s']:.1f} s ({data['seconds']['setup_s']:.1f} s setup, {data['seconds']['search_s']:.1f} s search, {data['seconds']['inject_s']:.1f} s inject)

Retention: the VLM's confidence-weighted share of its own greedy answers to the image prompts that a
candidate leaves unchanged; a candidate is feasible when the estimate less {o['z']:.2f} standard errors
over the prompts (a one-sided {100 * o['confidence']:g}% bound) is at least {o['min_retention']:g}. Uptake: how
far a candidate moves from the VLM towards the expert in the likelihood of the expert's greedy answers
to the text prompts. The pick is the feasible candidate
with the most uptake. A candidate is scored only as far as needed: once its retention cannot reach the
bound, the remaining image prompts are skipped ("<=": the bound it could still have reached, prompts
not scored counted as kept) and its uptake is not measured ("-").

{chr(10).join(rows)}

Reproduce the weights: `skillgraft inject --recipe skillgraft_recipe.yaml -o OUT`.
"""


def plot_curve(cands: list[Candidate], chosen: Candidate, min_retention: float, path: Path) -> Path:
    plt = pyplot("tune plots")
    g = sorted((c for c in cands if len(c.scales) == 1), key=lambda c: c.scale)
    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
    ax.plot([c.scale for c in g], [c.retention for c in g], "o-", ms=3, label="est. retention")
    u = [c for c in g if c.uptake is not None]
    ax.plot([c.scale for c in u], [c.uptake for c in u], "s-", ms=3, label="uptake")
    ax.axhline(min_retention, color="grey", lw=0.8, ls=":")
    ax.axvline(chosen.scale, color="black", lw=0.8, ls="--", label="pick")
    ax.set_xlabel("scale")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(out: Path, *, recipe: Recipe, chosen: Candidate, candidates: list[Candidate], ref: Reference,
                  settings: Any, groups: list[list[int]], probes: dict[str, Any], timings: dict[str, float],
                  inject_report: dict[str, Any], plot: bool = False) -> dict[str, Any]:
    """Write the JSON record and the markdown report (and the PNG when ``plot``) into ``out``."""
    e = recipe.experts[0]
    data = {
        "skillgraft_version": __version__,
        "vlm": recipe.vlm,
        "expert": e.model,
        "base": recipe.base,
        "method": recipe.method,
        "density": e.density,
        "mode": recipe.mode,
        "objective": {
            "retention": "sum_i c_i kept_i / sum_i c_i over the image prompts (c_i: the VLM's probability of "
                         "its greedy answer; kept_i: the candidate's greedy answer is unchanged)",
            "uptake": "(nll_VLM - nll_candidate) / (nll_VLM - nll_expert) per token of the expert's greedy "
                      "answers to the text prompts",
            "min_retention": settings.min_retention,
            "confidence": settings.confidence,
            "z": z_of(settings.confidence),
            "feasible": "retention - z * se >= min_retention (se: the estimate's standard error over the prompts)",
            "pick": "the feasible candidate with the most uptake",
        },
        "probes": {**probes, "max_new_tokens": settings.max_new_tokens, "raw_prompts": settings.raw_prompts},
        "reference": {"vlm_mean_confidence": float(ref.confidence.mean()), "vlm_text_nll": ref.vlm_text_nll,
                      "expert_text_nll": ref.expert_text_nll},
        "search": {"range": list(settings.scale_range), "budget": settings.budget, "per_layer": settings.per_layer,
                   "layer_groups": groups if settings.per_layer else None},
        "chosen": {"scale": e.scale, **chosen.to_dict()},
        "candidates": [c.to_dict() for c in candidates],
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "inject": {"counts": inject_report.get("counts"), "seconds": inject_report.get("seconds")},
    }
    (out / JSON_NAME).write_text(json.dumps(data, indent=1))
    (out / MD_NAME).write_text(markdown(data, candidates, chosen))
    written = [JSON_NAME, MD_NAME]
    if plot:
        plot_curve(candidates, chosen, settings.min_retention, out / PNG_NAME)
        written.append(PNG_NAME)
    # the output's report lists every file skillgraft wrote, so that a later --force may replace them
    report_path = out / "skillgraft_report.json"
    if report_path.is_file():
        merged = json.loads(report_path.read_text())
        merged["files"] = sorted(set(merged.get("files") or []) | set(written))
        write_json(report_path, merged)
    return data
