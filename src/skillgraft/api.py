"""The Python API: plan and run an injection from a recipe, push it to the hub, sweep its settings.

    from skillgraft import inject, Recipe, ExpertSpec
    inject(Recipe(vlm="vlm/", base="base/", experts=[ExpertSpec(model="expert/", scale=0.8)]), "out/")

Warnings go to the ``skillgraft`` logger (``logging``); failures raise ``skillgraft.SkillgraftError``
with a one-line message.

Skills (an expert's task vector stored on its own, or a PEFT LoRA adapter) are experts too:

    from skillgraft import SkillSettings, extract_skill
    extract_skill("expert/", "base/", "skill/", SkillSettings(format="lowrank", rank=64))
    inject(Recipe(vlm="vlm/", experts=[ExpertSpec(model="skill/")]), "out/")   # no base needed

Without labels, look at a pair and let unlabelled prompts choose the scale:

    from skillgraft.api import inspect, inspect_table, tune
    print(inspect_table(inspect("vlm/", "expert/", "base/")))                   # data-free diagnostics
    tune(Recipe(vlm="vlm/", base="base/", experts=[ExpertSpec(model="expert/")]),
         "image_prompts.jsonl", "text_prompts.txt", "tuned/")                    # scale from unlabelled prompts
"""

from .convert.mergekit import convert_mergekit
from .io.push import push_to_hub
from .pipeline import (
    DEFAULT_SHARD_SIZE,
    InjectResult,
    Prepared,
    check_device,
    inject,
    memory_notes,
    plan_only,
    prepare,
    recipe_with_absolute_paths,
)
from .recipe import ExpertSpec, Recipe
from .skills import SkillSettings, export_lora, extract_skill, list_skills, skill_info
from .sweep.runner import SweepConfig, SweepResult, run_sweep
from .analysis import Inspection
from .analysis import inspect_pair as inspect
from .analysis import plot as inspect_plot
from .analysis import table as inspect_table
from .analysis import write_json as inspect_json
from .tune import TuneResult, TuneSettings, tune

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ExpertSpec",
    "InjectResult",
    "Inspection",
    "Prepared",
    "Recipe",
    "SkillSettings",
    "SweepConfig",
    "SweepResult",
    "check_device",
    "convert_mergekit",
    "export_lora",
    "extract_skill",
    "inject",
    "inspect",
    "inspect_json",
    "inspect_plot",
    "inspect_table",
    "list_skills",
    "memory_notes",
    "plan_only",
    "prepare",
    "push_to_hub",
    "recipe_with_absolute_paths",
    "run_sweep",
    "skill_info",
    "tune",
    "TuneResult",
    "TuneSettings",
]
