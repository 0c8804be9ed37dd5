"""Which skill each micro-world expert teaches: the one table the zoo, the demo and sweeps read."""

from __future__ import annotations

import json
from pathlib import Path

# zoo expert name -> the micro-world scenario (evaluation suite) its fine-tune teaches
EXPERT_SCENARIO: dict[str, str] = {
    "expert-multilingual": "cross_lingual",
    "expert-instruct": "instruction",
    "expert-math": "math",
}
EXPERT_NAMES: tuple[str, ...] = tuple(EXPERT_SCENARIO)


def scenario_of(expert_dir: str | Path) -> str | None:
    """The scenario a micro-world expert checkpoint teaches (its ``microworld.json``, else its name)."""
    p = Path(expert_dir)
    name = p.name
    meta = p / "microworld.json"
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
        except ValueError:
            m = {}
        if isinstance(m, dict):
            if m.get("scenario"):
                return str(m["scenario"])
            name = m.get("model", name)
    return EXPERT_SCENARIO.get(name)


def scenarios_taught(expert_dirs: list[str]) -> list[str] | None:
    """The scenarios the experts teach, in order without repeats; None unless every one is a micro-world expert."""
    found = [scenario_of(d) for d in expert_dirs]
    if not found or any(s is None for s in found):
        return None
    return list(dict.fromkeys(found))
