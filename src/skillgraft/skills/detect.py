"""What an EXPERT directory holds (a checkpoint, a skill, a LoRA adapter), and a reader for it.

A skill directory has ``skill.json``; a PEFT adapter has ``adapter_config.json``; anything else
is read as a full checkpoint. Where a merge has a base and an expert is a task vector,
:class:`ThetaView` presents it as the full expert ``theta_B + tau`` the planner and the engine
already know how to use (symmetric mode, interpolation methods, mixing with full experts).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch

from ..io.reader import CheckpointReader
from ..mapping.layout import detect_layout
from .lora import LoraReader
from .naming import SKILL_JSON, plain_name
from .reader import SkillReader

ExpertKind = Literal["checkpoint", "skill", "lora"]


def expert_kind(path: str | Path) -> ExpertKind:
    """``skill`` (``skill.json``), ``lora`` (``adapter_config.json``) or ``checkpoint``."""
    p = Path(path)
    if (p / SKILL_JSON).is_file():
        return "skill"
    if (p / "adapter_config.json").is_file():
        return "lora"
    return "checkpoint"


def open_expert(path: str | Path, base: CheckpointReader | None = None) -> Any:
    """A reader for an EXPERT directory: a CheckpointReader, or a task-vector reader (``holds_deltas``).

    ``base`` is used by LoRA adapters that save whole modules (their delta is taken against it).
    """
    kind = expert_kind(path)
    if kind == "skill":
        return SkillReader(path)
    if kind == "lora":
        return LoraReader(path, base)
    return CheckpointReader(path)


class ThetaView:
    """A task vector seen as the full expert ``theta_B + tau`` (float32), in the base's names.

    Tensors the task vector does not touch are the base's own; a task vector covering fewer
    vocabulary rows than the base changes only those rows.
    """

    holds_deltas = False
    format = "theta"

    def __init__(self, delta: Any, base: CheckpointReader):
        self.delta = delta
        self.base = base
        self.root = delta.root
        self.config = base.config
        layout = detect_layout(base, "base")
        self._delta_name: dict[str, str] = {}
        for name in base.names:
            rel = layout.lm_name(name)
            if rel is not None and plain_name(rel) in delta and base.dtype(name).is_floating_point:
                self._delta_name[name] = plain_name(rel)

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self._delta_name else self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name, None)

    def get_rows(self, name: str, rows: int | None) -> torch.Tensor:
        b = self.base.get_rows(name, rows)
        dn = self._delta_name.get(name)
        if dn is None:
            return b
        out = b.float()
        d = self.delta.get_rows(dn, rows if rows is not None else out.shape[0] if out.dim() else None)
        if out.dim() == 0:
            return out + d
        n = min(out.shape[0], d.shape[0])
        out[:n] += d[:n]
        return out

    def close(self) -> None:
        self.delta.close()

    def __enter__(self) -> ThetaView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
