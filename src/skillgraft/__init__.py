"""skillgraft: inject the skill of an expert LLM into a vision-language model by merging weights.

    from skillgraft import inject, Recipe, ExpertSpec
    inject(Recipe(vlm="vlm/", base="base/", experts=[ExpertSpec(model="expert/", scale=0.8)]), "out/")

The names below are imported on first use (PEP 562), so ``import skillgraft`` and
``skillgraft --version`` stay fast and never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "inject": "skillgraft.api",
    "plan_only": "skillgraft.api",
    "InjectResult": "skillgraft.api",
    "push_to_hub": "skillgraft.api",
    "Recipe": "skillgraft.recipe",
    "ExpertSpec": "skillgraft.recipe",
    "SkillgraftError": "skillgraft.errors",
    "convert_mergekit": "skillgraft.api",
    "run_sweep": "skillgraft.api",
    "SweepConfig": "skillgraft.api",
    "extract_skill": "skillgraft.api",
    "SkillSettings": "skillgraft.api",
    "export_lora": "skillgraft.api",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import (InjectResult, SkillSettings, SweepConfig, convert_mergekit, export_lora, extract_skill, inject,
                      plan_only, push_to_hub, run_sweep)
    from .errors import SkillgraftError
    from .recipe import ExpertSpec, Recipe


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'skillgraft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
