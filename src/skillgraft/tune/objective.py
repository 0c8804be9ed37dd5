"""The label-free objective of ``tune``: most uptake of the expert's skill, subject to retention of the
VLM's own answers.

*Retention* estimates the fraction of the VLM's own accuracy a candidate keeps on the image prompts,
without labels: each prompt's greedy answer counts with the VLM's own probability of it (its
confidence ``c_i``), and a candidate keeps that weight only where its greedy answer is unchanged::

    retention = sum_i c_i * kept_i / sum_i c_i

If the VLM's confidence is calibrated, ``c_i`` is the chance its answer is right, so this is the
expected share of its right answers that survive; an answer the candidate changes is counted as
lost (a lower estimate: a changed answer is sometimes a fix). A candidate is *feasible* when the
estimate clears ``min_retention`` (default 0.95, the sweep's own retention bound) with a margin for
its sampling error: the N prompts are a sample of the VLM's use, and the estimate from them has a
standard error ``se`` (a ratio estimator's, by the delta method, over the prompts)::

    se = sqrt(N / (N - 1) * sum_i (c_i * (kept_i - retention))^2) / sum_i c_i

A candidate is feasible when the one-sided lower confidence bound ``retention - z * se`` is at least
``min_retention``, with ``z`` the normal quantile of ``confidence`` (default 0.8413: ``z = 1``, one
standard error; 0.5: ``z = 0``, the estimate itself must clear the bound). The margin is data-dependent: it is small where the answers a candidate
changes are few or ones the VLM was unsure of, large where it changes confident answers.

*Uptake* is the share of the gap between the VLM and the expert that a candidate closes on the text
prompts, in the negative log-likelihood of the expert's greedy answers (the expert as teacher)::

    uptake = (nll_VLM - nll_candidate) / (nll_VLM - nll_expert)

The pick is the feasible candidate with the most uptake (the smaller scale on a tie).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import torch

from ..errors import SkillgraftError
from .signals import Score

DEFAULT_MIN_RETENTION = 0.95
DEFAULT_CONFIDENCE = 0.8413  # one standard error (z = 1.00)


def z_of(confidence: float) -> float:
    """The one-sided normal quantile of ``confidence`` (0.5 -> 0, 0.8413 -> 1, 0.95 -> 1.645)."""
    return NormalDist().inv_cdf(confidence)


@dataclass(frozen=True)
class Reference:
    """What candidates are measured against, computed once from the VLM and the expert."""

    confidence: torch.Tensor  # [N image prompts] the VLM's probability of its own greedy answer
    vlm_text_nll: float       # the VLM's NLL per token of the expert's answers
    expert_text_nll: float    # the expert's NLL per token of its own answers

    def __post_init__(self) -> None:
        if not self.vlm_text_nll > self.expert_text_nll:
            raise SkillgraftError(
                "the expert's answers to the text prompts are no likelier under the expert than under the VLM "
                f"(NLL per token {self.expert_text_nll:.3f} vs {self.vlm_text_nll:.3f}); the text prompts do not "
                "exercise the expert's skill, or the VLM already has it"
            )

    @classmethod
    def from_scores(cls, vlm_image: Score, vlm_text: Score, expert_text: Score) -> "Reference":
        return cls(torch.exp(-vlm_image.nll), vlm_text.mean_nll, expert_text.mean_nll)

    def retention(self, image: Score) -> float:
        """The estimate; prompts not scored (a partial score) count as kept, so for a partial score
        this is an upper bound, and a candidate whose bound is already below the minimum is out."""
        c = self.confidence
        n = image.kept.shape[0]
        kept = (c[:n] * image.kept).sum() + c[n:].sum()
        return float(kept / c.sum().clamp(min=1e-12))

    def retention_se(self, image: Score) -> float:
        """The standard error of ``retention`` over the scored prompts (delta method for a ratio of
        means): how far the estimate from these prompts may sit from its value over prompts like them."""
        n = image.kept.shape[0]
        if n < 2:
            return 0.0
        c = self.confidence[:n].double()
        k = image.kept.double()
        r = (c * k).sum() / c.sum().clamp(min=1e-12)
        var = n / (n - 1) * (c * (k - r)).square().sum() / c.sum().clamp(min=1e-12).square()
        return math.sqrt(float(var))

    def uptake(self, text: Score) -> float:
        return (self.vlm_text_nll - text.mean_nll) / (self.vlm_text_nll - self.expert_text_nll)


@dataclass
class Candidate:
    """One scored merge: a scale per layer group (one group: a global scale)."""

    scales: tuple[float, ...]
    retention: float
    uptake: float | None  # not measured for an infeasible candidate (it cannot be picked)
    feasible: bool
    kept: float = 1.0                  # share of the VLM's answers unchanged (unweighted)
    expert_match: float | None = None  # share of the expert's answers reproduced on the text prompts
    image_nll: float | None = None
    text_nll: float | None = None
    stage: str = ""
    seconds: float = 0.0
    retention_se: float = 0.0          # standard error of the estimate over the image prompts
    retention_lcb: float | None = None  # the lower bound the feasibility rule used (None: the estimate itself)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The global scale (the first group's for a per-group candidate)."""
        return self.scales[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        d.pop("extra")
        return {**d, **self.extra}


def lower_bound(ref: Reference, image: Score, z: float) -> float:
    """The one-sided lower confidence bound ``retention - z * se`` of a complete score."""
    return ref.retention(image) - z * ref.retention_se(image) if z else ref.retention(image)


def candidate(scales: tuple[float, ...], ref: Reference, image: Score, text: Score | None, min_retention: float,
              stage: str = "", seconds: float = 0.0, z: float = 0.0) -> Candidate:
    """A scored candidate; ``text`` may be None for one that fails the retention bound. Feasible: a
    complete score whose lower bound ``retention - z * se`` is at least ``min_retention``."""
    r = ref.retention(image)
    partial = image.kept.shape[0] < ref.confidence.shape[0]
    se = 0.0 if partial else ref.retention_se(image)
    lcb = r - z * se
    return Candidate(tuple(scales), r, ref.uptake(text) if text is not None else None,
                     lcb >= min_retention and not partial, image.kept_rate,
                     text.kept_rate if text is not None else None, image.mean_nll,
                     text.mean_nll if text is not None else None, stage, seconds, se,
                     None if partial or not z else lcb,
                     {"image_prompts_scored": image.kept.shape[0]} if partial else {})


def best(cands: list[Candidate]) -> Candidate | None:
    """The feasible candidate with the most uptake; on a tie the one with the smaller total scale."""
    ok = [c for c in cands if c.feasible and c.uptake is not None]
    if not ok:
        return None
    return max(ok, key=lambda c: (c.uptake, -sum(c.scales)))
