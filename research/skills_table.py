"""The skill-format table of docs/skills.md, measured on the micro-world.

    python research/skills_table.py                  # rewrites the table in docs/skills.md
    python research/skills_table.py --limit 64       # a quicker, noisier run (printed only)

For each micro-world expert, a skill is extracted in every format x setting below (compressed
formats store bfloat16 values), injected into the micro-world VLM with TA at scale 1.0 and no
base, and the merged checkpoint is scored on the expert's scenario and on ``general``. The full
expert (``inject VLM EXPERT --base BASE``) and the VLM alone are the references; the shipped
LoRA expert is injected the same way. Sizes are bytes on disk: ``skill.safetensors`` (the task
vector) and the whole directory (plus ``skill.json`` and the card); ratios are to the expert's
language model in bfloat16 (2 bytes per parameter). Everything is seeded; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from skillgraft.api import ExpertSpec, Recipe, SkillSettings, extract_skill, inject
from skillgraft.evaluate import microworld as E
from skillgraft.microworld.scenarios import EXPERT_SCENARIO
from skillgraft.microworld.zoo import zoo_path
from skillgraft.skills.info import dir_bytes

BF16 = "bfloat16"
SETTINGS: list[tuple[str, SkillSettings]] = [
    ("full (float32)", SkillSettings(format="full")),
    ("full (bf16)", SkillSettings(format="full", dtype=BF16)),
    *[(f"lowrank r={r}", SkillSettings(format="lowrank", rank=r, dtype=BF16)) for r in (2, 4, 8, 16, 32)],
    *[(f"lowrank energy={e}", SkillSettings(format="lowrank", energy=e, dtype=BF16)) for e in (0.5, 0.8)],
    ("bitdelta", SkillSettings(format="bitdelta", dtype=BF16)),
    *[(f"sparse d={d}", SkillSettings(format="sparse", density=d, dtype=BF16)) for d in (0.01, 0.03, 0.1, 0.3)],
]
LORA = {"expert-multilingual": "expert-multilingual-lora"}
START, END = "<!-- skills-table:start -->", "<!-- skills-table:end -->"


def score(model_dir: Path, scenario: str, limit: int | None) -> dict[str, float]:
    r = E.evaluate(model_dir, scenarios=["general", scenario], limit=limit, progress=False)
    return {"general": 100 * r["general"], "scenario": 100 * r[scenario]}


def injected(vlm: Path, expert: Path, out: Path, base: Path | None = None) -> Path:
    recipe = Recipe(vlm=str(vlm), base=str(base) if base else None, experts=[ExpertSpec(model=str(expert), scale=1.0)],
                    method="ta")
    inject(recipe, out, force=True, progress=False)
    return out


def measure(limit: int | None, work: Path) -> dict[str, Any]:
    vlm, base = zoo_path("vlm"), zoo_path("base")
    results: dict[str, Any] = {"limit": limit, "experts": {}}
    vlm_scores = {sc: score(vlm, sc, limit) for sc in sorted(set(EXPERT_SCENARIO.values()))}
    results["vlm"] = vlm_scores
    for ex, sc in EXPERT_SCENARIO.items():
        t0 = time.perf_counter()
        exp_dir = zoo_path(ex)
        lm_numel = 0  # from the skills
        rows = []
        full = score(injected(vlm, exp_dir, work / "merged", base), sc, limit)
        for label, st in SETTINGS:
            skill = work / "skill"
            if skill.exists():
                shutil.rmtree(skill)
            meta = extract_skill(str(exp_dir), str(base), skill, st, progress=False).meta
            lm_numel = meta["expert"]["lm_numel"]
            s = score(injected(vlm, skill, work / "merged"), sc, limit)
            rows.append({"setting": label, "weights_bytes": (skill / "skill.safetensors").stat().st_size,
                         "dir_bytes": dir_bytes(skill), **s,
                         "rel_error": _overall(meta["tensors"])})
        if ex in LORA:
            ad = zoo_path(LORA[ex])
            s = score(injected(vlm, ad, work / "merged"), sc, limit)
            rows.append({"setting": "LoRA expert (PEFT, r=8)", "weights_bytes": (ad / "adapter_model.safetensors").stat().st_size,
                         "dir_bytes": dir_bytes(ad), **s, "rel_error": None, "other_expert": True})
        results["experts"][ex] = {"scenario": sc, "lm_numel": lm_numel, "full_expert": full, "rows": rows,
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{ex}: {results['experts'][ex]['seconds']} s", flush=True)
    return results


def _overall(tensors: dict[str, Any]) -> float:
    from skillgraft.skills.card import overall_error

    return overall_error(tensors)


def table(results: dict[str, Any]) -> str:
    out = []
    for ex, r in results["experts"].items():
        sc, bf16 = r["scenario"], 2 * r["lm_numel"]
        v = results["vlm"][sc]
        full_gain = r["full_expert"]["scenario"] - v["scenario"]
        out += [
            f"**{ex}** ({sc}; expert's LM {r['lm_numel']:,} parameters = {bf16 / 1e3:.0f} KB in bfloat16; "
            f"VLM alone: {sc} {v['scenario']:.1f}, general {v['general']:.1f}; full expert injected: "
            f"{sc} {r['full_expert']['scenario']:.1f} (gain {full_gain:+.1f}), general {r['full_expert']['general']:.1f})",
            "",
            "| format / setting | skill.safetensors | ratio (bf16 LM) | whole dir | ratio | rel. error | "
            f"{sc} | gain | % of full gain | general | general vs full |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            gain = row["scenario"] - v["scenario"]
            keep = 100 * gain / full_gain if full_gain else float("nan")
            goal = (row["dir_bytes"] <= bf16 / 16 and keep >= 90 and abs(row["general"] - r["full_expert"]["general"]) <= 2)
            err = "" if row["rel_error"] is None else f"{row['rel_error']:.3f}"
            out.append(
                f"| {row['setting']}{' **(goal met)**' if goal else ''} | {row['weights_bytes'] / 1e3:.1f} KB | "
                f"{row['weights_bytes'] / bf16:.4f} | {row['dir_bytes'] / 1e3:.1f} KB | {row['dir_bytes'] / bf16:.4f} | "
                f"{err} | {row['scenario']:.1f} | {gain:+.1f} | {keep:.0f}% | {row['general']:.1f} | "
                f"{row['general'] - r['full_expert']['general']:+.1f} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="items per scenario (default: all 256)")
    ap.add_argument("--doc", default="docs/skills.md", help="markdown file whose table is rewritten")
    ap.add_argument("--json", default="docs/skills_results.json", help="where the measured figures go")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="skillgraft-skills-"))
    try:
        results = measure(args.limit, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = table(results)
    print(md)
    if args.limit is None:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        doc = Path(args.doc)
        text = doc.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            doc.write_text(head + START + "\n" + md + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
