"""Lineage check before a merge: do the expert and the VLM really derive from the base?

Task-vector merging assumes ``theta_k - theta_B`` is a fine-tune's small delta. Fine-tunes move
weights by a few percent; an unrelated model of the same shape sits about sqrt(2) of a tensor's norm
away. The check reads the first rows (at most ``SAMPLE_ELEMENTS`` values) of every merged tensor
from every checkpoint, so a single swapped or randomised tensor of any kind is noticed, with memory
bounded by the sample size whatever the model.
"""

from __future__ import annotations

import math

import torch

from .plan import Plan

UNRELATED_DELTA = 0.7  # relative delta norm above which weights look unrelated to the base
SAMPLE_ELEMENTS = 1 << 14  # values read per tensor and checkpoint


def _sample_rows(shape: tuple[int, ...], limit: int | None) -> int | None:
    """How many leading rows of a tensor of ``shape`` make a sample of about SAMPLE_ELEMENTS values."""
    if not shape:
        return None
    per_row = math.prod(shape[1:]) or 1
    rows = max(1, SAMPLE_ELEMENTS // per_row)
    return min(rows, shape[0], limit if limit is not None else shape[0])


def _read(reader, name: str, rows: int | None) -> torch.Tensor:
    return (reader.get(name) if rows is None else reader.get_rows(name, rows)).float()


def unrelated_weights_check(plan: Plan) -> list[str]:
    """One warning per checkpoint (VLM or expert) whose delta to the base looks unlike a fine-tune's,
    naming the tensor where it is largest. Nothing without a base."""
    if plan.base is None:
        return []
    worst: dict[str, tuple[float, str]] = {}
    for e in plan.entries:
        if e.action != "merge" or e.base_name is None:
            continue
        rows = _sample_rows(e.shape, e.rows)
        b = _read(plan.base.reader, e.base_name, rows)
        ref = float(torch.linalg.vector_norm(b))
        if not ref > 0:  # a zero (or non-finite) base tensor gives no scale to judge by
            continue
        pairs = [("vlm", plan.vlm.reader, e.name)] + [
            (ck.label, ck.reader, n) for ck, n in zip(plan.experts, e.expert_names)
        ]
        for label, reader, name in pairs:
            rel = float(torch.linalg.vector_norm(_read(reader, name, rows) - b)) / ref
            if rel > worst.get(label, (-1.0, ""))[0]:
                worst[label] = (rel, e.lm_name or e.name)
    return [
        f"{label} looks unrelated to the base: relative delta norm {rel:.2f} on {name} "
        f"(fine-tunes are usually below 0.1); is --base the model it was derived from?"
        for label, (rel, name) in worst.items()
        if rel > UNRELATED_DELTA
    ]
