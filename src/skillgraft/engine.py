"""The streaming executor: one tensor at a time, read lazily, merged in float32, written as it comes.

Reading the next tensors and writing the previous one overlap with the merge of the current one
(one reader thread, one writer thread), so memory stays at a handful of tensors whatever the
model size, and wall time approaches the time to read the inputs once and write the output once.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .io.writer import ShardedWriter, TensorSpec
from .mapping.plan import Entry, Plan
from .methods import Method
from .schedule import effective_weights

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNRELATED_DELTA = 0.7  # relative delta norm above which weights look unrelated to the base
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameter numbers (glibc malloc.h)
HEAP_LIMIT = 96 * 2**20  # blocks up to this size are kept on the heap for reuse; larger ones are mapped


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``), before a large
    whole-tensor merge, so its float32 buffers do not stack on memory kept for small tensors."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed tensor memory for reuse instead of unmapping it after every tensor.

    Each large tensor otherwise gets fresh pages from the kernel, and zeroing them in page
    faults costs more than the merge arithmetic (measured: a 46 MB float32 op 40 ms -> 18 ms).
    Blocks over HEAP_LIMIT (an embedding's buffers, a few per merge) are still mapped and returned
    on free: kept on the heap they fragment it, and peak memory grew with every large tensor
    (TIES: 1.33 GB after the embedding, 1.81 GB at the LM head). No effect on other C libraries.
    """
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, HEAP_LIMIT)  # smaller blocks from the heap, where they are reused
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # keep freed heap memory instead of trimming it
    libc.mallopt(_M_ARENA_MAX, 1)  # one heap for all threads: the reader's blocks are freed by the merge


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
    scales: list[float | list[float]]  # per expert: a number or a per-layer schedule
    densities: list[float]
    vlm_weight: float = 1.0
    vlm_density: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    schedule: list[float] | None = None  # recipe-wide multiplier schedule over the decoder depth
    n_layers: int = 0

    def expert_weights(self, entry: Entry) -> list[float]:
        """The experts' weights for this tensor: scales x schedules x the method's layer rule."""
        return effective_weights(
            self.method, self.params, entry.lm_name or entry.name, self.n_layers, self.scales, self.schedule
        )


@dataclass
class Loaded:
    entry: Entry
    vlm: torch.Tensor
    base: torch.Tensor | None = None
    experts: list[torch.Tensor] = field(default_factory=list)


CHUNK_ELEMENTS = 1 << 22  # row blocks of elementwise merges: 4M entries, 16 MB per float32 operand


@dataclass
class Norms:
    """Sums of squares gathered while merging one tensor (over its merged rows, block by block)."""

    vlm: float = 0.0
    base: float = 0.0
    change: float = 0.0
    deltas: list[float] = field(default_factory=list)

    def add(self, other: "Norms") -> None:
        self.vlm += other.vlm
        self.base += other.base
        self.change += other.change
        self.deltas = [a + b for a, b in zip(self.deltas, other.deltas)] if self.deltas else list(other.deltas)

    def rel_change(self) -> float:
        return (self.change / self.vlm) ** 0.5 if self.vlm > 0 else 0.0

    def rel_deltas(self) -> list[float]:
        return [(d / self.base) ** 0.5 if self.base > 0 else float("inf") for d in self.deltas]


def _sq(t: torch.Tensor) -> float:
    """Sum of squares (``square().sum()``: 3.5x faster than ``vector_norm`` on a strided row sample)."""
    return float(t.square().sum())


def _rel_norm(delta: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(delta)) / denom if denom > 0 else float("inf")


def interpolate_block(v: torch.Tensor, thetas: list[torch.Tensor], s: MergeSettings, weights: list[float],
                      generator: torch.Generator | None) -> torch.Tensor:
    """Interpolation methods (no base): M(theta_V, theta_E...) with weights (w_V, lambda_E...) on a float32 block.

    The VLM's own weight is never scheduled, so expert weights of 0 give back the VLM.
    """
    return s.method.fn([v, *thetas], [s.vlm_weight, *weights], generator=generator, **s.params)


def block_generator(s: MergeSettings, name: str, index: int) -> torch.Generator | None:
    """The seeded generator of row block ``index`` of tensor ``name`` (None for deterministic methods).

    It lives on the CPU, so masks are the same whatever device computes the merge; block 0 is
    keyed by the tensor name alone.
    """
    if not s.method.stochastic:
        return None
    gen = torch.Generator()
    gen.manual_seed(tensor_seed(s.seed, name if index == 0 else f"{name}#{index}"))
    return gen


def row_blocks(entry: Entry, elementwise: bool) -> list[Any]:
    """Index expressions covering the merged rows: row blocks for elementwise methods, else one."""
    if not entry.shape:
        return [...]
    n = entry.rows if entry.rows is not None else entry.shape[0]
    if not elementwise:
        return [slice(0, n)]
    per_row = 1
    for d in entry.shape[1:]:
        per_row *= d
    return _row_slices(n, per_row) or [slice(0, 0)]


def _row_slices(n_rows: int, per_row: int) -> list[slice]:
    """Consecutive row ranges of at most about CHUNK_ELEMENTS entries covering ``n_rows`` rows."""
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def merge_entry(
    loaded: "Loaded", s: MergeSettings, device: torch.device, out_dtype: torch.dtype
) -> tuple[torch.Tensor, Norms]:
    """Merge one tensor, block by block, into a new CPU tensor of ``out_dtype``; VLM-only rows copied."""
    e = loaded.entry
    weights = s.expert_weights(e)
    if s.mode == "inject" and s.method.kind == "delta" and all(w == 0 for w in weights):
        # nothing is added: the VLM's tensor as it is (bit-exact, -0.0 included), not V + 0
        return loaded.vlm.to(out_dtype, copy=True), Norms(deltas=[0.0] * len(weights))
    blocks = row_blocks(e, s.method.is_elementwise(s.params))
    if len(blocks) == 1 and math.prod(e.shape) * 4 > HEAP_LIMIT:
        return_freed_memory()
    out = torch.empty(e.shape, dtype=out_dtype)
    norms = Norms()
    k = stats_stride(e)
    for i, blk in enumerate(blocks):
        gen = block_generator(s, e.name, i)
        if s.method.kind == "delta":
            part = _delta_block(loaded, blk, out[blk], s, weights, gen, device, k)
        else:
            v = loaded.vlm[blk].to(device, torch.float32)
            thetas = [x[blk].to(device, torch.float32, copy=True) for x in loaded.experts]
            merged = interpolate_block(v, thetas, s, weights, gen)
            part = Norms(vlm=_sq(_every(v, k)), change=_sq(_every(merged, k) - _every(v, k)))
            out[blk].copy_(merged)
        norms.add(part)
    if e.row_sliced:  # the VLM-only rows (image tokens) are copied as they are
        out[e.rows :].copy_(loaded.vlm[e.rows :])
    return out, norms


STATS_EXACT = 1 << 20  # tensors up to this many entries get exact norm statistics ...
STATS_STRIDE = 8  # ... larger ones are measured on every 8th row (same rows for every operand)


def stats_stride(entry: Entry) -> int:
    """Row stride of the norm statistics of a tensor: 1 (exact) for small ones, else STATS_STRIDE.

    The statistics are diagnostics (relative delta and change norms in the report); a fixed row
    subsample keeps them representative while taking an eighth of the passes they used to.
    """
    return 1 if math.prod(entry.shape) <= STATS_EXACT else STATS_STRIDE


def _every(t: torch.Tensor, k: int) -> torch.Tensor:
    return t if k == 1 or t.dim() == 0 else t[::k]


def _chunks(t: torch.Tensor) -> list[Any]:
    """Row ranges of at most about CHUNK_ELEMENTS entries covering ``t`` (``[...]`` for a scalar)."""
    if t.dim() == 0:
        return [...]
    return _row_slices(t.shape[0], t[0].numel() if t.shape[0] else 1)


def _task_vectors(sources: list[torch.Tensor], base: torch.Tensor, device: torch.device, k: int,
                  one_at_a_time: bool) -> tuple[list[torch.Tensor], float, torch.Tensor]:
    """float32 ``tau_i = sources[i] - base``, theta_B converted chunk by chunk; also the sum of
    squares of theta_B's every ``k``-th row and its last float32 chunk.

    Each source is dropped from ``sources`` once converted. ``one_at_a_time`` (a whole tensor): each
    source becomes its task vector before the next is converted, so its 16-bit input is freed at
    once if nothing else holds it, at the cost of converting theta_B once per source. Otherwise all
    sources are converted first and theta_B once per chunk.
    """
    chunks = _chunks(base)
    base_sq, bc = 0.0, None
    taus: list[torch.Tensor] = []
    groups = [[i] for i in range(len(sources))] if one_at_a_time else [list(range(len(sources)))]
    for g, group in enumerate(groups):
        ts = [sources[i].to(device, torch.float32, copy=True) for i in group]
        for i in group:
            sources[i] = None
        for c in chunks:
            bc = base[c].to(device, torch.float32)
            if g == 0:
                base_sq += _sq(_every(bc, k))
            for t in ts:
                t[c].sub_(bc)
        taus += ts
    return taus, base_sq, bc


def _delta_block(
    loaded: Loaded, blk: Any, out: torch.Tensor, s: MergeSettings, weights: list[float],
    generator: torch.Generator | None, device: torch.device, k: int,
) -> Norms:
    """A task-vector method on one block, holding only the task vectors and its result in float32.

    inject:    theta_V + M(tau_E...)          symmetric: theta_B + M(tau_V, tau_E...)
    theta_B (and theta_V where it is not a task vector) are converted chunk by chunk as they are
    used. When one block is the whole tensor (a whole-tensor method such as TIES on an embedding),
    each 16-bit input is released as soon as it is done with and a ``writes_out`` method writes over
    its first task vector, so the peak is about the float32 task vectors. Statistics use every
    ``k``-th row (``stats_stride``).
    """
    if loaded.base is None:
        raise ValueError(f"{loaded.entry.name}: a task-vector method needs the base's tensor")
    symmetric = s.mode == "symmetric"
    whole = blk == slice(0, loaded.entry.shape[0]) and not loaded.entry.row_sliced
    part = Norms()
    base, vlm = loaded.base[blk], loaded.vlm[blk]
    chunks = _chunks(base)
    # symmetric mode, whole tensor: the VLM rows the change statistic needs, kept without the VLM
    v_rows = [_every(vlm[c], k).clone() for c in chunks] if symmetric and whole else []
    sources = ([vlm] if symmetric else []) + [x[blk] for x in loaded.experts]
    if whole:  # the record's references go, so the task vectors below free each input as they go
        loaded.experts = []
        if symmetric:
            loaded.vlm, vlm = None, None
    taus, part.base, bc = _task_vectors(sources, base, device, k, one_at_a_time=whole)
    del sources
    # a one-chunk block keeps theta_B in float32 for symmetric mode's final add (16 MB at most)
    kept_base = bc if symmetric and len(chunks) == 1 else None
    if whole and not symmetric:  # inject mode adds the result to theta_V: theta_B is done with
        loaded.base, base, bc = None, None, None
    sq = [_sq(_every(t, k)) for t in taus]
    part.deltas = sq[1:] if symmetric else sq
    # a streaming method may write its result over the first task vector (each chunk is read
    # before it is overwritten): one float32 tensor fewer at the peak
    out_kw = {"out": taus[0]} if s.method.writes_out else {}
    if symmetric:
        delta = s.method.fn(taus, [s.vlm_weight, *weights], [s.vlm_density, *s.densities],
                            generator=generator, **out_kw, **s.params)
    else:
        delta = s.method.fn(taus, weights, s.densities, generator=generator, **out_kw, **s.params)
        part.change = _sq(_every(delta, k))
    del taus
    for i, c in enumerate(_chunks(delta)):
        if symmetric:
            merged = delta[c].add_(kept_base if kept_base is not None else base[c].to(device, torch.float32))
            vs = (v_rows[i] if v_rows else _every(vlm[c], k)).to(device, torch.float32)
            part.change += _sq(_every(merged, k) - vs)
        else:
            vc = vlm[c].to(device, torch.float32)
            vs = _every(vc, k)
            merged = delta[c].add_(vc)
        part.vlm += _sq(vs)
        out[c].copy_(merged)
    return part


def _load(plan: Plan, entry: Entry) -> Loaded:
    vlm = plan.vlm.reader.get(entry.name)
    if entry.action == "copy":
        return Loaded(entry, vlm)
    r = entry.rows
    experts = [ck.reader.get_rows(n, r) for ck, n in zip(plan.experts, entry.expert_names)]
    base = plan.base.reader.get_rows(entry.base_name, r) if plan.base is not None and entry.base_name else None
    if base is None and plan.base is None and all(getattr(ck.reader, "holds_deltas", False) for ck in plan.experts):
        # every expert is a task vector (skill, LoRA adapter): tau as given, i.e. a base of zeros (no memory)
        base = torch.zeros((), dtype=torch.float32).expand(experts[0].shape)
    return Loaded(entry, vlm, base, experts)


PREFETCH_BYTES = 128 * 2**20  # read ahead while the tensors already in flight hold less than this


def _input_bytes(plan: Plan, e: Entry) -> int:
    n = plan.vlm.reader.nbytes(e.name)
    if e.action == "merge":
        n += sum(ck.reader.nbytes(x) for ck, x in zip(plan.experts, e.expert_names))
        if plan.base is not None and e.base_name:
            n += plan.base.reader.nbytes(e.base_name)
    return n


def _prefetch(plan: Plan, entries: Iterable[Entry], pool: ThreadPoolExecutor) -> Iterator[Loaded]:
    """Load entries in a background thread, ahead of use, within a read-ahead byte budget.

    Small tensors are read several ahead; a large one (an embedding) is read alone, so peak
    memory is bounded by the largest tensor, not by the read-ahead depth.
    """
    it = iter(entries)
    pending: deque[tuple[Future[Loaded], int]] = deque()
    in_flight = 0
    nxt = next(it, None)
    while nxt is not None or pending:
        while nxt is not None and (not pending or in_flight + _input_bytes(plan, nxt) <= PREFETCH_BYTES):
            size = _input_bytes(plan, nxt)
            pending.append((pool.submit(_load, plan, nxt), size))
            in_flight += size
            nxt = next(it, None)
        future, size = pending.popleft()
        ready = future.result()
        in_flight -= size
        yield ready


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
    reuse_freed_memory()
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
                    out, norms = merge_entry(loaded, settings, dev, out_dtype)
                    info.update(
                        lm_name=e.lm_name,
                        expert_name=e.expert_names[0] if e.expert_names else None,
                        expert_names=dict(zip(labels, e.expert_names)),
                        base_name=e.base_name,
                        rows=[0, e.rows] if e.rows is not None else None,
                        weights=settings.expert_weights(e),
                    )
                    if norms.deltas:
                        info["rel_delta_norm"] = dict(zip(labels, (round(x, 6) if math.isfinite(x) else None
                                                                   for x in norms.rel_deltas())))
                    info["rel_change"] = round(norms.rel_change(), 6)
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
