"""Label-free choice of the merge scale (``skillgraft tune``): candidates applied in place to the VLM,
scored on unlabelled image prompts (retention of the VLM's own answers) and text prompts (uptake of
the expert's answers), the pick written like ``inject``."""

from .objective import DEFAULT_CONFIDENCE, DEFAULT_MIN_RETENTION, Candidate, Reference
from .run import DEFAULT_BUDGET, DEFAULT_GROUPS, DEFAULT_RANGE, TuneResult, TuneSettings, layer_groups, tune

__all__ = ["DEFAULT_BUDGET", "DEFAULT_CONFIDENCE", "DEFAULT_GROUPS", "DEFAULT_MIN_RETENTION", "DEFAULT_RANGE", "Candidate", "Reference",
           "TuneResult", "TuneSettings", "layer_groups", "tune"]
