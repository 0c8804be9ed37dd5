"""Every merge method, as one explicit tuple of compositions. Nothing registers itself at import time.

Adding a task-vector method is one entry: its name, summary, paper and parts, e.g. TIES::

    Method("ties", "TIES: trim by magnitude, elect sign, merge agreeing entries", PAPERS["ties"],
           sparsifier=MAGNITUDE, sign=TIES, combiner=DISJOINT),

A new part (a sparsifier, a combiner) is a small class with its ``ParamSpec`` s in ``sparsify.py``
or ``combine.py``; see ``base.py`` for the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Method, Parts, Switch
from .combine import DISJOINT, LINEAR, MODEL_STOCK, SLERP, SUM, TALL, TIES
from .params import ParamSpec, Schedule
from .sparsify import DARE, DELLA, MAGNITUDE, NONE, OUTLIERS, check_della
from .subspace import ISO_C, TSV

PAPERS = {
    "ta": "Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR 2023)",
    "ties": "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS 2023)",
    "dare": "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
    "Lunch (ICML 2024)",
    "breadcrumbs": "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks "
    "(ECCV 2024)",
    "della": "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    "consensus": "Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (ICML 2024)",
    "tsv": "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR 2025)",
    "iso_c": "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (ICML 2025)",
    "linear": "Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models (ICML 2022)",
    "slerp": "Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); as used by mergekit (Goddard et "
    "al. 2024, Arcee's MergeKit)",
    "model_stock": "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (ECCV 2024)",
    "layerswap": "Chen et al. 2025, Bring Reason to Vision: Understanding Perception and Reasoning through Model "
    "Merging (layer-swap baseline, after Bandarkar et al. 2024)",
}


def _della_range(weights: Sequence[float], densities: Sequence[float], params: dict[str, Any]) -> None:
    for p in densities:
        check_della(float(p), float(params["epsilon"]))


def _weights_not_zero(weights: Sequence[float], densities: Sequence[float], params: dict[str, Any]) -> None:
    if params.get("normalize", True) is True and sum(float(w) for w in weights) == 0.0:
        raise ValueError("linear: the weights sum to 0, cannot normalize (set normalize: false)")


def _slerp_weights(weights: Sequence[float], densities: Sequence[float], params: dict[str, Any]) -> None:
    if params.get("t") is None and len(weights) == 2 and float(weights[0]) + float(weights[1]) == 0.0:
        raise ValueError("slerp: the weights sum to 0; give t explicitly")


LAYERS_KEPT = (
    ParamSpec("first_k", "int", 2, "number of the VLM's first decoder layers kept whole (0: none)", low=0),
    ParamSpec("last_k", "int", 2, "number of the VLM's last decoder layers kept whole (0: none)", low=0),
)


def layerswap_rule(params: dict[str, Any], n_layers: int) -> Schedule:
    """Layer swap as schedule data: 0 in the VLM's first ``first_k`` and last ``last_k`` layers (kept
    whole), 1 elsewhere; the embedding follows the first layers, the final norm and head the last."""
    first, last = int(params["first_k"]), int(params["last_k"])
    per_layer = tuple(0.0 if (i < first or i >= n_layers - last) else 1.0 for i in range(n_layers))
    return Schedule(per_layer or (1.0,), before=0.0 if first > 0 else 1.0, after=0.0 if last > 0 else 1.0, other=1.0)


_BASE = ParamSpec("base", "choice", "ta", "merged vector the consensus mask is applied to: 'ta' or 'ties'",
                  choices=("ta", "ties"))

REGISTRY: tuple[Method, ...] = (
    Method("ta", "Task Arithmetic: add the scaled task vectors", PAPERS["ta"]),
    Method("ties", "TIES: trim by magnitude, elect sign, merge agreeing entries", PAPERS["ties"],
           sparsifier=MAGNITUDE, sign=TIES, combiner=DISJOINT),
    Method("dare", "DARE: random drop with rescale, then Task Arithmetic", PAPERS["dare"], sparsifier=DARE),
    Method("dare_ties", "DARE drop with rescale, then TIES sign election", PAPERS["dare"],
           sparsifier=DARE, sign=TIES, combiner=DISJOINT),
    Method("breadcrumbs", "Model Breadcrumbs: drop outliers and small entries, then Task Arithmetic",
           PAPERS["breadcrumbs"], sparsifier=OUTLIERS),
    Method("breadcrumbs_ties", "Model Breadcrumbs masks, then TIES sign election", PAPERS["breadcrumbs"],
           sparsifier=OUTLIERS, sign=TIES, combiner=DISJOINT),
    Method("della", "DELLA: magnitude-ranked random drop (MagPrune) with rescale, then TIES sign election",
           PAPERS["della"], sparsifier=DELLA, sign=TIES, combiner=DISJOINT, checks=(_della_range,)),
    Method("della_linear", "DELLA MagPrune with rescale, then Task Arithmetic", PAPERS["della"],
           sparsifier=DELLA, checks=(_della_range,)),
    Method("consensus", "Consensus merging: keep entries that >= k tasks' TALL masks select, in the TA/TIES merge",
           PAPERS["consensus"], mask=TALL,
           switch=Switch(_BASE, {"ta": Parts(NONE, None, SUM), "ties": Parts(MAGNITUDE, TIES, DISJOINT)})),
    Method("tsv", "TSV-Merge: per-task low-rank singular vectors, decorrelated, recombined", PAPERS["tsv"],
           combiner=TSV),
    Method("iso_c", "Iso-C: flatten the spectrum of the TA sum to its mean singular value", PAPERS["iso_c"],
           combiner=ISO_C),
    Method("linear", "Linear: weighted average of the VLM's and the experts' weights (no base)", PAPERS["linear"],
           combiner=LINEAR, min_inputs=2, checks=(_weights_not_zero,)),
    Method("slerp", "SLERP: spherical interpolation between the VLM's and one expert's weights (no base)",
           PAPERS["slerp"], combiner=SLERP, min_inputs=2, max_inputs=2, checks=(_slerp_weights,)),
    Method("model_stock", "Model Stock: move from the base towards the task vectors' average by a ratio set by "
           "their angle", PAPERS["model_stock"], combiner=MODEL_STOCK, min_inputs=2),
    Method("layerswap", "Layer swap: keep the VLM's first/last K decoder layers, TA merge in between",
           PAPERS["layerswap"], extra=LAYERS_KEPT, layer_weights=layerswap_rule),
)
