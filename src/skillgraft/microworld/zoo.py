"""The shipped micro-world checkpoints (package data under `skillgraft/microworld/zoo/<name>/`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SkillgraftError

ZOO_NAMES: tuple[str, ...] = ("base", "expert-multilingual", "expert-instruct", "expert-math", "vlm")
ZOO_ADAPTERS: tuple[str, ...] = ("expert-multilingual-lora",)  # PEFT LoRA adapters of base
ZOO_DIR = Path(__file__).resolve().parent / "zoo"


def zoo_path(name: str) -> Path:
    """Directory of a shipped checkpoint or adapter, e.g. `zoo_path("vlm")`."""
    if name not in ZOO_NAMES + ZOO_ADAPTERS:
        raise SkillgraftError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO_NAMES + ZOO_ADAPTERS)}")
    d = ZOO_DIR / name
    if not (d / ("adapter_config.json" if name in ZOO_ADAPTERS else "config.json")).is_file():
        raise SkillgraftError(
            f"shipped checkpoint {name!r} is missing at {d}; rebuild it with `skillgraft zoo build --out DIR`"
        )
    return d
