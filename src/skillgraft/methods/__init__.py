"""Merge methods as compositions of pure tensor functions, and the registry that names them.

A method is a sparsifier x a sign rule x a combiner with typed parameters (``base.py``); the
registry is one explicit tuple (``registry.py``): adding a task-vector method is one entry there.

Modes (chosen per recipe; the engine does the bookkeeping, the methods only see task vectors):

- ``inject`` (default): ``theta_out = theta_V + M({(tau_E, lambda_E, p_E)})``. The VLM is kept whole;
  only the experts' deltas are trimmed / dropped / elected.
- ``symmetric``: ``theta_out = theta_B + M({(tau_V, w_V, p_V)} + {(tau_E, lambda_E, p_E)})``. The VLM's
  delta is one more task vector, trimmed and elected like the experts (Bring-Reason-to-Vision,
  DiM3-style merges, and every mergekit merge with the base model as ``base_model``).

Worked example (one entry per position, TIES, density 0.5, weights 1, normalize off)::

    theta_B = [0, 0, 0, 0]   tau_V = [ 4, -1,  2, 0.5]   tau_E = [-3, 2, 0.2, 1]

    inject:    trim(tau_E) = [-3, 2, 0, 0]      (top 2 of 4 by magnitude)
               elect over the one expert: every kept entry agrees
               theta_out = theta_V + [-3, 2, 0, 0] = [1, 1, 2, 0.5]
    symmetric: trim(tau_V) = [4, 0, 2, 0]     trim(tau_E) = [-3, 2, 0, 0]
               elected sign of the sum [1, 2, 2, 0] -> [+, +, +, +]
               agreeing: position 0 keeps only V's 4 (E's -3 disagrees), position 1 only E's 2
               theta_out = theta_B + [4, 2, 2, 0] = [4, 2, 2, 0]

In inject mode the VLM's own fine-tuning (its -1 and 0.5) survives untouched; in symmetric mode
the VLM's small entries are trimmed away and, where the expert disagrees in sign, the larger mass
wins (position 0: the VLM's 4 beats the expert's -3).
"""

from __future__ import annotations

from .base import Method, TensorMerge
from .params import ParamSpec, Schedule
from .registry import REGISTRY

METHODS: dict[str, Method] = {m.name: m for m in REGISTRY}

__all__ = ["METHODS", "Method", "ParamSpec", "Schedule", "TensorMerge", "get_method"]


def get_method(name: str) -> Method:
    """The registered method called ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
