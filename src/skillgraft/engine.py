"""The streaming executor: one tensor at a time, read lazily, merged in float32, written as it comes.

Reading the next tensors and writing the previous one overlap with the merge of the current one
(one reader thread, one writer thread), so memory stays at a handful of tensors whatever the
model size, and wall time approaches the time to read the inputs once and write the output once.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .io.writer import ShardedWriter, TensorSpec
from .mapping.plan import Entry, Plan
from .methods import Method

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNRELATED_DELTA = 0.7  # relative delta norm above which weights look unrelated to the base


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor: reproducible, independent of order, threads and device count."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def output_dtype(entry: Entry, dtype: str) -> torch.dtype:
    """The dtype a tensor is written in: the VLM's own unless ``dtype`` says otherwise."""
    if dtype == "auto" or not entry.dtype.is_floating_point:
        return entry.dtype
    return DTYPES[dtype]


def output_specs(plan: Plan, dtype: str) -> list[TensorSpec]:
    return [TensorSpec(e.name, e.shape, output_dtype(e, dtype)) for e in plan.entries]


@dataclass
class MergeSettings:
    """What the engine needs to merge one tensor; built from a recipe by the API."""

    method: Method
    params: dict[str, Any]
    mode: str  # "inject" | "symmetric"
    scales: list[float]
    densities: list[float]
    vlm_weight: float = 1.0
    vlm_density: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    multiplier: Callable[[Entry], float] = field(default=lambda e: 1.0)


@dataclass
class Loaded:
    entry: Entry
    vlm: torch.Tensor
    base: torch.Tensor | None = None
    experts: list[torch.Tensor] = field(default_factory=list)


def _rel_norm(delta: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(delta)) / denom if denom > 0 else float("inf")


def merge_rows(loaded: Loaded, s: MergeSettings, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Merge one tensor under the one formula; returns the merged rows (float32) and per-tensor stats.

    inject:    theta_V + M({(tau_E, lambda_E, d_E)})
    symmetric: theta_B + M({(tau_V, w_V, d_V)} + {(tau_E, lambda_E, d_E)})
    interp methods (no base): M(theta_V, theta_E...)
    """
    e = loaded.entry
    r = e.rows
    v = (loaded.vlm[:r] if r is not None else loaded.vlm).to(device, torch.float32)
    experts = [x.to(device, torch.float32) for x in loaded.experts]
    m = s.multiplier(e)
    scales = [lam * m for lam in s.scales]
    gen = None
    if s.method.stochastic:
        gen = torch.Generator()  # on the CPU: the same masks whatever device computes the merge
        gen.manual_seed(tensor_seed(s.seed, e.name))
    stats: dict[str, Any] = {}
    if s.method.kind == "interp":
        out = s.method.fn([v, *experts], [s.vlm_weight, *scales], generator=gen, **s.params)
        return out, stats
    assert loaded.base is not None
    b = loaded.base.to(device, torch.float32)
    taus = [x - b for x in experts]
    stats["rel_delta_norm"] = [_rel_norm(t, b) for t in taus]
    if s.mode == "inject":
        out = v + s.method.fn(taus, scales, s.densities, generator=gen, **s.params)
    else:
        deltas = [v - b, *taus]
        out = b + s.method.fn(
            deltas, [s.vlm_weight * m, *scales], [s.vlm_density, *s.densities], generator=gen, **s.params
        )
    return out, stats


def _load(plan: Plan, entry: Entry) -> Loaded:
    vlm = plan.vlm.reader.get(entry.name)
    if entry.action == "copy":
        return Loaded(entry, vlm)
    r = entry.rows
    experts = [ck.reader.get_rows(n, r) for ck, n in zip(plan.experts, entry.expert_names)]
    base = plan.base.reader.get_rows(entry.base_name, r) if plan.base is not None and entry.base_name else None
    return Loaded(entry, vlm, base, experts)


def _prefetch(plan: Plan, entries: Iterable[Entry], pool: ThreadPoolExecutor, depth: int = 2) -> Iterator[Loaded]:
    it = iter(entries)
    pending: deque[Future[Loaded]] = deque()
    for e in it:
        pending.append(pool.submit(_load, plan, e))
        if len(pending) >= depth:
            break
    while pending:
        ready = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(_load, plan, nxt))
        yield ready


def unrelated_weights_check(plan: Plan, samples: int = 3) -> list[str]:
    """Warnings for experts (or the VLM) whose sampled deltas to the base look unlike a fine-tune.

    Reads a few 2-D tensors before the run; fine-tunes move weights by a few percent, unrelated
    models of the same shape by about sqrt(2).
    """
    if plan.base is None:
        return []
    merged = [e for e in plan.entries if e.action == "merge" and len(e.shape) == 2 and e.rows is None]
    if not merged:
        return []
    picks = {merged[0].name: merged[0], merged[len(merged) // 2].name: merged[len(merged) // 2], merged[-1].name: merged[-1]}
    worst: dict[str, tuple[float, str]] = {}
    for e in list(picks.values())[:samples]:
        loaded = _load(plan, e)
        b = loaded.base.float()
        pairs = [("vlm", loaded.vlm.float())] + [(ck.label, x.float()) for ck, x in zip(plan.experts, loaded.experts)]
        for label, x in pairs:
            rel = _rel_norm(x - b, b)
            if rel > worst.get(label, (-1.0, ""))[0]:
                worst[label] = (rel, e.lm_name or e.name)
    return [
        f"{label} looks unrelated to the base: relative delta norm {rel:.2f} on {name} "
        f"(fine-tunes are usually below 0.1); is --base the model it was derived from?"
        for label, (rel, name) in worst.items()
        if rel > UNRELATED_DELTA
    ]


@dataclass
class RunStats:
    seconds: float
    bytes_written: int
    tensors: dict[str, dict[str, Any]]


def run(
    plan: Plan,
    settings: MergeSettings,
    writer: ShardedWriter,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> RunStats:
    """Stream every plan entry through the merge into ``writer``; returns per-tensor statistics."""
    dev = torch.device(device)
    start = time.perf_counter()
    per_tensor: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress, leave=False)
    labels = [ck.label for ck in plan.experts]
    with ThreadPoolExecutor(1, thread_name_prefix="sg-read") as readers, ThreadPoolExecutor(
        1, thread_name_prefix="sg-write"
    ) as writers:
        last_write: Future[None] | None = None
        try:
            for loaded in _prefetch(plan, plan.entries, readers):
                e = loaded.entry
                out_dtype = output_dtype(e, settings.dtype)
                info: dict[str, Any] = {"action": e.action, "reason": e.reason}
                if e.action == "copy":
                    out = loaded.vlm if loaded.vlm.dtype == out_dtype else loaded.vlm.to(out_dtype)
                else:
                    rows, stats = merge_rows(loaded, settings, dev)
                    if e.rows is not None and e.rows < e.shape[0]:
                        full = loaded.vlm.to(dev, torch.float32).clone()
                        full[: e.rows] = rows
                        rows = full
                    out = rows.to(out_dtype).cpu()
                    info.update(
                        lm_name=e.lm_name,
                        expert_name=e.expert_names[0] if e.expert_names else None,
                        expert_names=dict(zip(labels, e.expert_names)),
                        base_name=e.base_name,
                        rows=[0, e.rows] if e.rows is not None else None,
                        multiplier=settings.multiplier(e),
                    )
                    if "rel_delta_norm" in stats:
                        info["rel_delta_norm"] = dict(zip(labels, (round(x, 6) for x in stats["rel_delta_norm"])))
                    vf = loaded.vlm.float()
                    info["rel_change"] = round(_rel_norm(out.float() - vf, vf), 6)
                per_tensor[e.name] = info
                if last_write is not None:
                    last_write.result()
                last_write = writers.submit(writer.write, e.name, out)
                bar.update(out.numel() * out.element_size())
            if last_write is not None:
                last_write.result()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
    return RunStats(time.perf_counter() - start, writer.total_bytes, per_tensor)
