"""``inspect``: data-free diagnostics of a VLM/expert pair, streamed tensor by tensor like ``inject``.

The merge plan (``pipeline.prepare``) names, for every language-model tensor of the VLM, its expert and
base counterparts and the rows they share. Each triple is read through the checkpoint readers (one
tensor of each at a time, the next one read ahead in a background thread), reduced in row blocks of
about 4M entries to the additive sums of :class:`~skillgraft.analysis.stats.PairStats`, and dropped:
memory holds two triples of tensors at most, whatever the model size. A handful of expert deltas
(``rank_samples``, spread over depth) are kept whole long enough for an SVD (effective rank).

Without a base there are no task vectors: the statistics then describe the distance between the
expert and the VLM's language model (``|theta_E - theta_V|``, relative to ``|theta_V|``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SkillgraftError
from ..mapping.checks import UNRELATED_DELTA
from ..mapping.plan import Entry, Plan
from ..pipeline import prepare
from ..recipe import Recipe
from ..schedule import lm_layer_index, module_kind
from ..skills.detect import expert_kind
from .stats import DEFAULT_THRESHOLD, SIGN_EXACT, SIGN_STRIDE, PairStats, block_stats, effective_rank
from .vocab import compare, read_vocab

BLOCK_ELEMENTS = 1 << 22  # entries per row block (16 MB per float32 operand)
DEFAULT_RANK_SAMPLES = 8
RANK_ROWS = 512  # a sampled matrix with more rows is measured on this many evenly spaced rows
CLOSE_TO_BASE = 0.1  # fine-tunes move weights by a few percent; above this a model is "far" from the base

Key = tuple[int | None, str]


@dataclass
class Inspection:
    """What ``inspect`` found: per (layer, kind) sums, sampled effective ranks, lineage and vocabulary."""

    vlm: str
    expert: str
    base: str | None
    n_layers: int
    groups: dict[Key, PairStats]
    ranks: list[dict[str, Any]]
    lineage: dict[str, Any]
    tokenizer: dict[str, Any]
    threshold: float
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def has_base(self) -> bool:
        return self.base is not None

    def total(self, keys: Any = None) -> PairStats:
        out = PairStats()
        for k, s in self.groups.items():
            if keys is None or keys(k):
                out += s
        return out

    def per_layer(self) -> list[tuple[int, PairStats]]:
        return [(i, self.total(lambda k, i=i: k[0] == i)) for i in range(self.n_layers)]

    def per_kind(self) -> list[tuple[str, PairStats]]:
        kinds = sorted({k[1] for k in self.groups}, key=_kind_order)
        return [(kind, self.total(lambda k, kind=kind: k[1] == kind)) for kind in kinds]

    def norm_matched_scale(self) -> float | None:
        """|tau_V| / |tau_E|: the scale at which the added expert delta is as large as the VLM's own."""
        s = self.total().summary()
        return 1.0 / s["ratio"] if self.has_base and s["ratio"] else None

    def to_dict(self) -> dict[str, Any]:
        def row(layer: int | None, kind: str | None, s: PairStats) -> dict[str, Any]:
            return {"layer": layer, "kind": kind, **s.summary(), "sums": s.to_dict()}

        return {
            "vlm": self.vlm,
            "expert": self.expert,
            "base": self.base,
            "mode": "task vectors" if self.has_base else "distance (no base): expert minus VLM",
            "decoder_layers": self.n_layers,
            "definitions": {
                "non_negligible": f"|tau| >= {self.threshold:g} x the task vector's RMS over its row block",
                "effective_rank": "entropy-based: exp(H(p)), p_i = sigma_i / sum(sigma) (Roy and Vetterli, 2007), "
                                  f"on at most {RANK_ROWS} evenly spaced rows; ratio: to the measured block's smaller side",
                "sign_conflict_sample": f"every {SIGN_STRIDE}th row of tensors over {SIGN_EXACT} entries",
                "norm_matched_scale": "|tau_V| / |tau_E| over all merged tensors",
            },
            "overall": {**self.total().summary(), "norm_matched_scale": self.norm_matched_scale(),
                        "mean_effective_rank_ratio": _mean([r["ratio"] for r in self.ranks])},
            "per_layer": [row(i, None, s) for i, s in self.per_layer()],
            "per_kind": [row(None, k, s) for k, s in self.per_kind()],
            "groups": [row(k[0], k[1], s) for k, s in sorted(self.groups.items(), key=_group_order)],
            "effective_rank": self.ranks,
            "lineage": self.lineage,
            "tokenizer": self.tokenizer,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def _kind_order(kind: str) -> tuple[int, str]:
    order = ("embed", "attention", "mlp", "norm", "lm_head", "other")
    return (order.index(kind) if kind in order else len(order), kind)


def _group_order(item: tuple[Key, PairStats]) -> tuple[int, tuple[int, str]]:
    (layer, kind), _ = item
    return (-1 if layer is None else layer, _kind_order(kind))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rank_sample(entries: list[Entry], k: int) -> set[str]:
    """Up to ``k`` decoder-layer matrices spread evenly over the plan order (so over depth and kinds)."""
    mats = [e for e in entries if len(e.shape) == 2 and lm_layer_index(e.lm_name or "") is not None]
    if k <= 0 or not mats:
        return set()
    if k >= len(mats):
        return {e.name for e in mats}
    if k == 1:
        return {mats[len(mats) // 2].name}
    return {mats[round(i * (len(mats) - 1) / (k - 1))].name for i in range(k)}


def _read(plan: Plan, e: Entry, with_base: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    v = plan.vlm.reader.get_rows(e.name, e.rows)
    x = plan.experts[0].reader.get_rows(e.expert_names[0], e.rows)
    b = plan.base.reader.get_rows(e.base_name, e.rows) if with_base and plan.base is not None else None
    return v, x, b


def _row_blocks(shape: tuple[int, ...]) -> list[Any]:
    if not shape:
        return [...]
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, BLOCK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [slice(0, 0)]


def rank_rows(n_rows: int) -> torch.Tensor | None:
    """The rows of a sampled matrix its effective rank is measured on (None: all of them)."""
    if n_rows <= RANK_ROWS:
        return None
    return torch.linspace(0, n_rows - 1, RANK_ROWS).round().long().unique()


def _block(v: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, blk: slice, threshold: float, stride: int,
           rows: torch.Tensor | None, keep: bool) -> tuple[PairStats, torch.Tensor | None]:
    """One row block's sums, and the expert's float32 delta on the block's rank rows when ``keep``."""
    # fresh float32 copies, changed in place (never the reader's own buffer, which may be mapped)
    vf, xf = v[blk].to(torch.float32, copy=True), x[blk].to(torch.float32, copy=True)
    if b is None:  # no base: the expert's distance from the VLM, relative to the VLM
        d, r = xf.sub_(vf).reshape(-1), vf.reshape(-1)
        st = PairStats(n=d.numel(), ee=float(torch.dot(d, d)), bb=float(torch.dot(r, r)))
        tau_e = xf
    else:
        bf = b[blk].float()
        tau_v, tau_e = vf.sub_(bf), xf.sub_(bf)
        st = block_stats(tau_v, tau_e, bf, threshold, stride)
    if not keep:
        return st, None
    if rows is None:
        return st, tau_e
    return st, tau_e[rows[(rows >= blk.start) & (rows < blk.stop)] - blk.start]


def entry_stats(v: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, threshold: float,
                keep_expert_delta: bool = False, pool: ThreadPoolExecutor | None = None
                ) -> tuple[PairStats, torch.Tensor | None]:
    """The sums of one tensor triple, block by block (side by side in ``pool``'s threads, added up in
    block order, so the result does not depend on them); with ``keep_expert_delta`` also the
    expert's float32 delta on the rows its effective rank is measured on (``rank_rows``)."""
    n = 1
    for d in v.shape:
        n *= d
    stride = 1 if n <= SIGN_EXACT else SIGN_STRIDE
    rows = rank_rows(v.shape[0]) if keep_expert_delta and v.dim() > 0 else None
    args = [(v, x, b, blk, threshold, stride, rows, keep_expert_delta) for blk in _row_blocks(tuple(v.shape))]
    parts = list(pool.map(lambda a: _block(*a), args)) if pool is not None and len(args) > 1 else [_block(*a) for a in args]
    total = PairStats()
    for st, _ in parts:
        total += st
    kept = [k for _, k in parts if k is not None]
    return total, (torch.cat(kept) if len(kept) > 1 else (kept[0] if kept else None))


def _verdict(rel: float | None) -> str:
    if rel is None:
        return "unknown"
    if rel > UNRELATED_DELTA:
        return "looks unrelated to the base"
    if rel > CLOSE_TO_BASE:
        return "far from the base for a fine-tune"
    return "close to the base, as a fine-tune is"


def lineage(plan: Plan, total: PairStats, has_base: bool) -> dict[str, Any]:
    """Layouts, depth, and how far each model is from the base (or the expert from the VLM)."""
    s = total.summary()
    cks = [plan.vlm, *plan.experts, *([plan.base] if plan.base is not None else [])]
    out: dict[str, Any] = {
        "layouts": {ck.label: {"family": ck.layout.family, "lm_prefix": ck.layout.prefix, "detected": ck.layout.how,
                               "model_type": ck.reader.config.get("model_type")} for ck in cks},
        "decoder_layers": plan.n_layers,
        "counts": plan.counts(),
    }
    if has_base:
        out["vlm"] = {"rel_delta_norm": s["rel_vlm"], "verdict": _verdict(s["rel_vlm"])}
        out["expert"] = {"rel_delta_norm": s["rel_expert"], "verdict": _verdict(s["rel_expert"])}
    else:
        out["expert_vs_vlm"] = {"rel_distance": s["rel_expert"]}
    return out


def inspect_pair(vlm: str | Path, expert: str | Path, base: str | Path | None = None, *,
                 threshold: float = DEFAULT_THRESHOLD, rank_samples: int = DEFAULT_RANK_SAMPLES,
                 progress: bool = True, allow_unmatched: bool = False, workers: int = 1) -> Inspection:
    """Stream the pair's language-model tensors once and gather the statistics of ``inspect``; ``workers``
    row blocks are measured at once (the command line uses one per core, as ``inject`` does)."""
    if not threshold > 0:
        raise SkillgraftError("the non-negligible threshold must be a positive number")
    if rank_samples < 0:
        raise SkillgraftError("the number of effective-rank samples cannot be negative")
    if expert_kind(expert) != "checkpoint":
        raise SkillgraftError(f"{expert} is a skill or LoRA adapter; inspect compares full checkpoints "
                              "(skill info describes a skill's delta)")
    start = time.perf_counter()
    # a diagnostic reports what a merge would refuse (other architecture, other tokenizer, other lineage)
    recipe = Recipe(vlm=str(vlm), base=str(base) if base is not None else None, experts=[{"model": str(expert)}],
                    method="ta" if base is not None else "linear", allow_arch_mismatch=True,
                    allow_vocab_mismatch=True)
    with ExitStack() as stack:
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched, ignore_lineage=True)
        plan = prep.plan
        has_base = base is not None
        label = recipe.experts[0].label
        if prep.sources.get(label, {}).get("kind", "checkpoint") != "checkpoint":  # a hub snapshot, resolved
            raise SkillgraftError(f"{expert} is a skill or LoRA adapter; inspect compares full checkpoints "
                                  "(skill info describes a skill's delta)")
        merged = [e for e in plan.entries if e.action == "merge"]
        sampled = rank_sample(merged, rank_samples)
        groups: dict[Key, PairStats] = {}
        ranks: list[dict[str, Any]] = []
        svds: list[Future | float] = []
        size = sum(plan.vlm.reader.nbytes(e.name) for e in merged)
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="inspecting", disable=not progress, leave=False)
        with ThreadPoolExecutor(1, thread_name_prefix="sg-inspect-read") as pool, ThreadPoolExecutor(
                max(1, workers), thread_name_prefix="sg-inspect") as blocks:
            nxt: Future | None = pool.submit(_read, plan, merged[0], has_base) if merged else None
            for i, e in enumerate(merged):
                v, x, b = nxt.result()
                nxt = pool.submit(_read, plan, merged[i + 1], has_base) if i + 1 < len(merged) else None
                st, delta = entry_stats(v, x, b, threshold, keep_expert_delta=e.name in sampled,
                                        pool=blocks if workers > 1 else None)
                key = (lm_layer_index(e.lm_name or e.name), module_kind(e.lm_name or e.name))
                groups.setdefault(key, PairStats())
                groups[key] += st
                if delta is not None:  # its SVD runs beside the next tensors' statistics when workers allow
                    svds.append(blocks.submit(effective_rank, delta) if workers > 1 else effective_rank(delta))
                    ranks.append({"tensor": e.lm_name, "shape": list(e.shape), "rows_measured": delta.shape[0],
                                  "smaller_side": min(delta.shape)})
                del v, x, b, delta
                bar.update(plan.vlm.reader.nbytes(e.name))
            for r, svd in zip(ranks, svds):
                er = svd.result() if isinstance(svd, Future) else svd
                r.update(effective_rank=er, ratio=er / r.pop("smaller_side"))
        bar.close()
        total = PairStats()
        for s in groups.values():
            total += s
        result = Inspection(
            vlm=str(vlm), expert=str(expert), base=str(base) if base is not None else None,
            n_layers=plan.n_layers, groups=groups, ranks=ranks, lineage=lineage(plan, total, has_base),
            tokenizer=compare(read_vocab(prep.paths["vlm"]), read_vocab(prep.paths[label])),
            threshold=threshold, warnings=list(prep.warnings),
        )
    result.seconds = time.perf_counter() - start
    return result
