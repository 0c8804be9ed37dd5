"""Evaluators: turn a model into named scores. See ``base`` for the interface.

- ``MicroworldEvaluator``: the micro-world suites, one score per scenario
- ``JsonlEvaluator``: your own ``{image, question, answer}`` file through transformers ``generate``
- ``CommandEvaluator``: an external harness (lmms-eval, VLMEvalKit) run on a merged checkpoint
- ``PythonEvaluator``: your own scorer object, ``module:factory``
"""

from __future__ import annotations

from typing import Any

from ..errors import SkillgraftError
from .base import Evaluator, MicroworldEvaluator, PythonEvaluator, load_model
from .command import CommandEvaluator
from .jsonl import JsonlEvaluator

EVALUATORS: dict[str, type[Evaluator]] = {
    c.kind: c for c in (MicroworldEvaluator, JsonlEvaluator, CommandEvaluator, PythonEvaluator)
}

__all__ = ["CommandEvaluator", "EVALUATORS", "Evaluator", "JsonlEvaluator", "MicroworldEvaluator",
           "PythonEvaluator", "load_model", "make_evaluator"]


def make_evaluator(spec: dict[str, Any]) -> Evaluator:
    """Rebuild an evaluator from its JSON-able ``spec`` (``{"kind": ..., ...}``)."""
    cls = EVALUATORS.get(spec.get("kind"))
    if cls is None:
        raise SkillgraftError(f"unknown evaluator {spec.get('kind')!r}; choose from {', '.join(EVALUATORS)}")
    return cls.from_spec(spec)
