"""Open a recipe's experts for planning: full checkpoints, skills and LoRA adapters alike.

Task-vector experts (skills, adapters) need no base for methods that only use deltas in inject
mode: the plan then has no base and every expert's tensors are added as they are. Where a base
is planned with (symmetric mode, a mix with full experts) or a method interpolates whole weights,
each task vector is presented as ``theta_B + tau`` (:class:`~skillgraft.skills.detect.ThetaView`).
Skills are checked for lineage against the VLM's language model by their base fingerprint.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from ..io.reader import CheckpointReader
from ..mapping.plan import Checkpoint
from ..methods import Method
from ..io.reader import holds_deltas
from .detect import ThetaView, expert_kind, open_expert
from .fingerprint import LINEAGE_LIMIT, lineage_distance
from .naming import rel_name


@dataclass
class OpenedExperts:
    """Readers for the planner, the base to plan with (or None), and what each expert is."""

    readers: list[tuple[str, Any]]
    base: CheckpointReader | None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_vectors: dict[str, Any] = field(default_factory=dict)  # label -> the unwrapped skill/adapter reader
    notes: list[str] = field(default_factory=list)


def deltas_only(paths: dict[str, Path]) -> bool:
    """True when every expert directory is a skill or a LoRA adapter."""
    return bool(paths) and all(expert_kind(p) != "checkpoint" for p in paths.values())


def open_experts(paths: dict[str, Path], base_path: Path | None, method: Method, mode: str,
                 stack: ExitStack) -> OpenedExperts:
    """Open every expert (label -> directory), with the base where one is given or needed."""
    kinds = {lbl: expert_kind(p) for lbl, p in paths.items()}
    any_tv = any(k != "checkpoint" for k in kinds.values())
    all_tv = all(k != "checkpoint" for k in kinds.values())
    base = stack.enter_context(CheckpointReader(base_path)) if base_path is not None else None
    if method.kind == "delta":
        plan_base = None if all_tv and mode == "inject" else base
    else:
        plan_base = None
        if any_tv and base is None:
            tv = next(lbl for lbl, k in kinds.items() if k != "checkpoint")
            raise SkillgraftError(
                f"method {method.name} interpolates whole weights, but expert {tv} is a "
                f"{'skill' if kinds[tv] == 'skill' else 'LoRA adapter'} (a task vector): give the base model "
                f"so that the expert's weights can be rebuilt, or use a task-vector method (ta, dare, ties, ...)"
            )
    out = OpenedExperts([], plan_base)
    for lbl, p in paths.items():
        reader = stack.enter_context(open_expert(p, base))
        if holds_deltas(reader):
            out.task_vectors[lbl] = reader
            out.sources[lbl] = reader.describe()
            out.notes += reader.notes
            if plan_base is not None or method.kind != "delta":
                reader = ThetaView(reader, base)
        else:
            out.sources[lbl] = {"kind": "checkpoint"}
        out.readers.append((lbl, reader))
    return out


def check_lineage(opened: OpenedExperts, vlm: Checkpoint, *, ignore: bool = False) -> list[str]:
    """Compare each skill's base fingerprint with the VLM's LM; refuse a skill from another base.

    Records the distance in ``opened.sources``; returns warnings (fingerprints that could not be
    compared, or a refusal overridden by ``ignore``).
    """
    warnings: list[str] = []
    for lbl, reader in opened.task_vectors.items():
        fp = getattr(reader, "fingerprint", None)
        if not fp or not fp.get("tensors"):
            continue

        def lookup(plain: str):
            name = vlm.source_for(rel_name(plain))
            if name is None:
                return None
            return vlm.reader.shape(name), (lambda n, name=name: vlm.reader.get_rows(name, n))

        dist, per = lineage_distance(fp, lookup)
        limit = float(fp.get("limit", LINEAGE_LIMIT))
        opened.sources[lbl].update(lineage_distance=None if dist is None else round(dist, 6),
                                   lineage_per_tensor={k: round(v, 6) for k, v in per.items()})
        if dist is None:
            warnings.append(f"skill {lbl}: no fingerprint tensor of its base matches the VLM's language model; "
                            f"lineage not checked")
        elif dist > limit:
            msg = (f"skill {lbl} was extracted from another base: the VLM's language model is at relative distance "
                   f"{dist:.3f} from the skill's base on its fingerprint rows (limit {limit:.2f}; a VLM built on "
                   f"that base stays far below)")
            if not ignore:
                raise SkillgraftError(msg + "; if you are sure, skip this check with ignore_lineage=True",
                                      cli=msg + "; if you are sure, skip this check with --ignore-lineage")
            warnings.append(msg + "; merging anyway as asked")
    return warnings
