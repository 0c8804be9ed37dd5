"""The reader interface of a task vector: a checkpoint whose tensors ARE deltas tau = theta_E - theta_B.

Skills and LoRA adapters present themselves to the planner and the engine through this
interface (the one :class:`skillgraft.io.reader.CheckpointReader` has), over the language model
in plain causal-LM names, with ``holds_deltas = True``: every tensor comes back in float32 and
is added as it is, with no base subtracted. A tensor the delta does not touch (a module a LoRA
adapter does not target) is a zero delta; the planner asks for it with :meth:`zero_name`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError
from ..mapping.layout import LMLayout
from .naming import PLAIN_LAYOUT, plain_name


def read_json_mapping(path: Path, where: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line error naming ``where`` (a skill or an adapter)."""
    if not path.is_file():
        raise SkillgraftError(f"{where}: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SkillgraftError(f"{where}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SkillgraftError(f"{where}: {path.name} is not a mapping")
    return data


class DeltaReader:
    """Base of the task-vector readers; subclasses fill ``_shapes`` and implement ``_rows``."""

    holds_deltas = True
    format = "delta"
    kind = "delta"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.config: dict[str, Any] = {}
        self.lm_layout: LMLayout = PLAIN_LAYOUT
        self.n_layers: int | None = None
        self.notes: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._zeros: dict[str, tuple[int, ...]] = {}

    # -- the CheckpointReader interface ------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes or name in self._zeros

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else self._zeros[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * 4

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name, None)

    def get_rows(self, name: str, rows: int | None) -> torch.Tensor:
        """The first ``rows`` rows (all when None) of the delta ``name``, float32; only those rows are computed."""
        if name in self._zeros:
            shape = self._zeros[name]
            n = shape[0] if rows is None or not shape else min(rows, shape[0])
            return torch.zeros((n, *shape[1:]) if shape else ())
        shape = self._shapes[name]
        if rows is not None and shape and rows >= shape[0]:
            rows = None
        out = self._rows(name, rows)
        flat = out.reshape(-1)
        for i in range(0, flat.numel(), 1 << 22):  # checked in 4M-entry chunks: no tensor-sized mask
            if not bool(torch.isfinite(flat[i : i + (1 << 22)]).all()):
                raise SkillgraftError(f"{self.root}: {name} holds non-finite values (inf or NaN); the {self.kind} is corrupt")
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a task vector adds ---------------------------------------------------------
    def zero_name(self, rel: str, shape: tuple[int, ...]) -> str:
        """A name under which this reader serves a zero delta of ``shape`` for LM-relative ``rel``."""
        name = plain_name(rel)
        if name in self._shapes:
            return name
        self._zeros[name] = tuple(shape)
        return name

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B, A)`` in float32 with ``B @ A`` equal to the delta ``name``, when it is stored low-rank."""
        return None

    def describe(self) -> dict[str, Any]:
        """What this task vector is, for reports (kind, format, base, ...)."""
        return {"kind": self.kind}

    def _rows(self, name: str, rows: int | None) -> torch.Tensor:
        raise NotImplementedError
