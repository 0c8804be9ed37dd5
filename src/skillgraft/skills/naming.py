"""Skill tensor names: the plain causal-LM layout, and the suffixes of compressed parts.

A skill stores each task-vector tensor under the name a plain causal LM gives it
(``model.layers.3.mlp.up_proj.weight``, ``model.embed_tokens.weight``, ``lm_head.weight``),
whatever layout the expert had. Compressed tensors are stored as parts named
``<name>#<part>`` (``#B``/``#A``, ``#sign``/``#scale``, ``#rowptr``/``#col``/``#val``).
"""

from __future__ import annotations

from ..mapping.layout import HEAD, LMLayout

SKILL_JSON = "skill.json"
FORMAT_VERSION = 1  # of skill.json and the tensor naming; a reader refuses newer versions
PLAIN_PREFIX = "model."
PLAIN_LAYOUT = LMLayout("causal_lm", PLAIN_PREFIX, HEAD, how="skill (plain causal-LM names)")

PARTS: dict[str, tuple[str, ...]] = {
    "full": (),
    "lowrank": ("B", "A"),
    "bitdelta": ("sign", "scale"),
    "sparse": ("rowptr", "col", "val"),
}


def plain_name(rel: str) -> str:
    """LM-relative name (``layers.0.mlp.up_proj.weight``, ``lm_head.weight``) -> plain causal-LM name."""
    return rel if rel.split(".")[0] == "lm_head" else PLAIN_PREFIX + rel


def rel_name(plain: str) -> str:
    """Plain causal-LM name -> LM-relative name."""
    return plain.removeprefix(PLAIN_PREFIX)


def part_name(name: str, part: str) -> str:
    return f"{name}#{part}"
