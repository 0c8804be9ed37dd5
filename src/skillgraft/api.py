"""The Python API: plan and run an injection from a recipe.

    from skillgraft.api import inject
    from skillgraft.recipe import Recipe, ExpertSpec
    inject(Recipe(vlm="vlm/", base="base/", experts=[ExpertSpec(model="expert/", scale=0.8)]), "out/")
"""

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

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ExpertSpec",
    "InjectResult",
    "Prepared",
    "Recipe",
    "check_device",
    "inject",
    "memory_notes",
    "plan_only",
    "prepare",
    "recipe_with_absolute_paths",
]
