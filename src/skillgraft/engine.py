"""The streaming executor: every tensor in row blocks of bounded size, read ahead, merged, written.

Each plan entry becomes a job: copy the VLM's rows, or merge them with the method's
``TensorMerge`` (``skillgraft.methods.base``): statistics passes when the method needs a
whole-tensor statistic (a top-k threshold, a norm, an angle), then the apply pass, block by block.
Reads run ahead in one thread (``sources.Feed``), writes behind in another, so wall time
approaches reading the inputs once and writing the output once, and memory is bounded by the
budget (``max_memory``), not by the largest tensor. A tensor whose method needs statistics passes
and whose inputs fit the budget is read once and held; a larger one is read again for each pass.

Random methods draw from one generator per *random block* (whole rows of about ``RANDOM_BLOCK``
entries for row-local methods, the whole tensor otherwise), seeded by the recipe seed and the
tensor name: the bits do not depend on the memory budget, the block size, threads or device.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import SkillgraftError
from .io.reader import holds_deltas
from .io.writer import ShardedWriter, TensorSpec
from .mapping.plan import Entry, Plan
from .memory import HeapGuard, available_bytes, default_max_memory, rss_bytes
from .methods import Method, TensorMerge
from .methods.params import at_layer
from .methods.sparsify import sample_positions
from .methods.topk import SAMPLE
from .schedule import effective_weights, lm_layer_index, module_kind, value_at
from .sources import Feed, FileSource, Inputs, MemorySource, Read, sample_rows

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_BLOCK = 1 << 22  # entries of a random block of row-local random methods (and the largest work block)
ALL_ROWS = slice(None)  # a read of an entry held whole
# outputs this large are written with O_DIRECT: copying them into the page cache cost more CPU than
# the merge (1B triple, TA: 4.2-4.6 s of system time buffered, 1.7 s direct)
DIRECT_WRITE_BYTES = 256 * 2**20
HEAP_GUARD = 0.8  # share of max_memory above which the allocator's free pages are handed back between blocks


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
class TensorArgs:
    """What the method gets for one tensor: weights, densities and parameters after per-layer schedules."""

    weights: list[float]  # the experts'
    densities: list[float]
    params: dict[str, Any]
    op_weights: list[float]  # per operand: the VLM's first in symmetric mode and for interpolations
    op_densities: list[float]


@dataclass
class MergeSettings:
    """What the engine needs to merge every tensor; built from a recipe by the pipeline.

    ``scales``, ``densities`` and numeric ``params`` may each be a number or a per-layer schedule.
    """

    method: Method
    params: dict[str, Any]
    mode: str  # "inject" | "symmetric"
    scales: list[float | list[float]]  # per expert
    densities: list[float | list[float]]
    vlm_weight: float = 1.0
    vlm_density: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    schedule: list[float] | None = None  # recipe-wide multiplier schedule over the decoder depth
    n_layers: int = 0

    def expert_weights(self, entry: Entry) -> list[float]:
        """The experts' weights for this tensor: scales x schedules x the method's layer rule."""
        return effective_weights(self.method, self.params, entry.lm_name or entry.name, self.n_layers, self.scales,
                                 self.schedule)

    def tensor_args(self, entry: Entry) -> TensorArgs:
        """Weights, densities and parameters of one tensor, checked (ValueError) before any weight is read."""
        rel = entry.lm_name or entry.name
        layer, kind = lm_layer_index(rel), module_kind(rel)

        def at(v: Any) -> float:
            return value_at(v, layer, self.n_layers, kind)

        weights = self.expert_weights(entry)
        densities = [at(d) for d in self.densities]
        params = at_layer(self.params, at)
        m = self.method
        if m.kind == "interp":
            op_w, op_d = [self.vlm_weight, *weights], [1.0] * (len(weights) + 1)
        elif self.mode == "symmetric":
            op_w, op_d = [self.vlm_weight, *weights], [self.vlm_density, *densities]
        else:
            op_w, op_d = list(weights), list(densities)
        for d in op_d:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"{entry.name}: density must be in (0, 1], got {d}")
        m.check_tensor(op_w, op_d, params)
        return TensorArgs(weights, densities, params, op_w, op_d)


# ---------------------------------------------------------------------------------- statistics


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
        """Each task vector's norm relative to the base's (the VLM's when the base was not read)."""
        ref = self.base if self.base > 0 else self.vlm
        return [(d / ref) ** 0.5 if ref > 0 else float("inf") for d in self.deltas]


STATS_EXACT = 1 << 20  # tensors up to this many entries get exact norm statistics ...
STATS_STRIDE = 8  # ... larger ones are measured on every 8th row (same rows for every operand)


def stats_stride(entry: Entry) -> int:
    """Row stride of the norm statistics of a tensor: 1 (exact) for small ones, else STATS_STRIDE.

    The statistics are diagnostics (relative delta and change norms in the report); a fixed row
    subsample keeps them representative at an eighth of the cost.
    """
    return 1 if math.prod(entry.shape) <= STATS_EXACT else STATS_STRIDE


def _sq(t: torch.Tensor) -> float:
    """Sum of squares (``square().sum()``: 3.5x faster than ``vector_norm`` on a strided row sample)."""
    return float(t.square().sum())


# ---------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Budget:
    """How a run uses its memory: block size, read-ahead, what a tensor may hold between passes."""

    max_memory: int
    block_entries: int = RANDOM_BLOCK
    ahead: int = 256 * 2**20
    hold: int = 0
    band_cap: int | None = None  # entries a top-k band may gather (None: the TopK default)
    direct: bool = False  # read row blocks with direct I/O (inputs too large to stay in the page cache)
    direct_write: bool = False  # write the output with direct I/O (large outputs)


IN_MEMORY = Budget(max_memory=0, hold=1 << 62)


def _row_slices(n_rows: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)] or [slice(0, 0)]


@dataclass
class Job:
    """One plan entry's work: a copy (``kernel`` None) or a merge, in blocks of whole rows."""

    key: int
    entry: Entry
    out_dtype: torch.dtype
    kernel: TensorMerge | None
    args: TensorArgs | None
    rows: int  # merged rows (every row for a copy)
    row_len: int
    work: list[tuple[slice, int]]  # work blocks and the random block each belongs to
    random_blocks: list[slice]
    tail: list[slice]  # VLM-only rows after the merged ones, copied
    hold: bool = False
    deltas: list[bool] = field(default_factory=list)
    roles_op: tuple[str, ...] = ()
    roles_apply: tuple[str, ...] = ()
    sample: tuple[int, ...] | None = None
    row_bytes: dict[tuple[str, ...], int] = field(default_factory=dict)

    def read(self, rows: slice | tuple[int, ...], roles: tuple[str, ...]) -> Read:
        if rows == ALL_ROWS:
            n = self.rows + sum(r.stop - r.start for r in self.tail)
        elif isinstance(rows, slice):
            n = rows.stop - rows.start
        else:
            n = len(rows)
        return Read(self.key, rows, roles, n * self.row_bytes.get(roles, 0))

    def requests(self) -> list[Read]:
        """Every read of this job in the order the engine makes them (what the feed runs ahead)."""
        if self.kernel is None:
            return [self.read(blk, ("vlm",)) for blk, _ in self.work]
        if self.hold:
            return [self.read(ALL_ROWS, self.roles_apply)]
        out = [self.read(self.sample, self.roles_op)] if self.sample is not None else []
        for _ in range(self.kernel.planned_passes):
            out += [self.read(blk, self.roles_op) for blk, _ in self.work]
        out += [self.read(blk, self.roles_apply) for blk, _ in self.work]
        return out + [self.read(blk, ("vlm",)) for blk in self.tail]


def make_job(key: int, e: Entry, s: MergeSettings, budget: Budget, deltas: list[bool],
             row_bytes: Callable[[tuple[str, ...]], int] | None = None) -> Job:
    """The job of plan entry ``e`` (raises ValueError for a merge the settings cannot run)."""
    out_dtype = output_dtype(e, s.dtype)
    shape = tuple(e.shape) or (1,)
    row_len = math.prod(shape[1:])
    step = max(1, budget.block_entries // max(row_len, 1))
    kernel, args = None, None
    rows = shape[0]
    if e.action == "merge":
        args = s.tensor_args(e)
        if not (s.mode == "inject" and s.method.kind == "delta" and all(w == 0 for w in args.weights)):
            rows = e.rows if e.rows is not None else shape[0]
            kernel = s.method.kernel((rows, *shape[1:]), args.op_weights, args.op_densities, args.params,
                                     band_cap=budget.band_cap)
    if kernel is None:
        work = [(blk, 0) for blk in _row_slices(shape[0], step)]
        job = Job(key, e, out_dtype, None, args, shape[0], row_len, work, [], [])
    else:
        grid = max(1, RANDOM_BLOCK // max(row_len, 1)) if kernel.row_local else max(rows, 1)
        randoms = _row_slices(rows, grid)
        step = step if kernel.splits_rows else grid
        work = [(slice(r.start + b.start, r.start + b.stop), i)
                for i, r in enumerate(randoms) for b in _row_slices(r.stop - r.start, step)]
        tail = [slice(rows + t.start, rows + t.stop) for t in _row_slices(shape[0] - rows, step)] if rows < shape[0] else []
        job = Job(key, e, out_dtype, kernel, args, rows, row_len, work, randoms, tail, deltas=deltas)
        symmetric = s.mode == "symmetric" and s.method.kind == "delta"
        needs_base = s.method.kind == "delta" and (symmetric or not all(deltas))
        job.roles_op = (("vlm",) if symmetric or s.method.kind == "interp" else ()) + (
            ("base",) if needs_base else ()) + ("experts",)
        job.roles_apply = tuple(dict.fromkeys(("vlm",) + job.roles_op))
    for roles in {job.roles_op, job.roles_apply, ("vlm",)}:
        if roles and row_bytes is not None:
            job.row_bytes[roles] = row_bytes(roles)
    return job


def _hold_or_stream(job: Job, budget: Budget) -> None:
    """Hold a multi-pass tensor's inputs when they fit the budget (or it is one block); else sample rows."""
    tm = job.kernel
    if tm is None:
        return
    whole = job.read(ALL_ROWS, job.roles_apply).nbytes
    job.hold = len(job.work) == 1 or (tm.planned_passes > 0 and whole <= budget.hold)
    if tm.needs_sample and not job.hold:
        job.sample = sample_rows(job.rows, job.row_len, 4 * SAMPLE, job.rows)


# ---------------------------------------------------------------------------------- the driver


def _every(t: torch.Tensor, stride: int, start: int) -> torch.Tensor:
    """Rows of ``t`` whose global index (``start`` + local) is a multiple of ``stride``."""
    return t if stride == 1 else t[(-start) % stride :: stride]


def _operands(inp: Inputs, s: MergeSettings, deltas: list[bool], device: torch.device
              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """float32 copies the merge may overwrite: ``tau_k`` (delta methods) or ``theta`` (interpolations);
    and theta_B in float32 when the merge adds it back (symmetric mode), else None.

    A theta_B used once is subtracted in its stored dtype (the op widens it to float32 as it goes:
    the same values as converting it first, without a float32 copy of it).
    """
    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, torch.float32, copy=True)

    if s.method.kind == "interp":
        return [f32(inp.vlm)] + [f32(x) for x in inp.experts], None
    symmetric = s.mode == "symmetric"
    sources = ([(inp.vlm, False)] if symmetric else []) + list(zip(inp.experts, deltas))
    if inp.base is None and not all(d for _, d in sources):
        raise SkillgraftError(f"method {s.method.name} needs the base's tensor; give the base model")
    uses = sum(not d for _, d in sources) + symmetric  # subtractions, and the add-back in symmetric mode
    if inp.base is None:
        base = None
    else:  # widened once when used more than once, else by the one op that uses it
        base = inp.base.to(device, torch.float32) if uses > 1 else inp.base.to(device)
    out = []
    for x, is_delta in sources:
        t = f32(x)
        if not is_delta:
            t.sub_(base)
        out.append(t)
    return out, base.to(torch.float32) if symmetric else None


class _Randoms:
    """The random streams of one job and pass: a fresh seeded generator per random block."""

    def __init__(self, job: Job, seed: int):
        self.job, self.seed = job, seed
        self.index, self.streams = -1, None

    def get(self, i: int) -> Any:
        tm = self.job.kernel
        if not tm.random:
            return None
        if i != self.index:
            name = self.job.entry.name
            gen = torch.Generator()
            gen.manual_seed(tensor_seed(self.seed, name if i == 0 else f"{name}#{i}"))
            r = self.job.random_blocks[i]
            self.index, self.streams = i, tm.streams(gen, (r.stop - r.start) * self.job.row_len)
        return self.streams


def _check_finite(job: Job, inp: Inputs, merged: torch.Tensor, where: Callable[[str, int], str]) -> None:
    """Refuse a block whose float32 result ``merged`` holds NaN or Inf, or overflows the output dtype.

    The block's smallest and largest values (one ``aminmax`` pass, which NaN propagates to) decide
    both exactly: casting is monotonic, so every value fits the output dtype when the two ends do.
    Only a failing block is looked at further, to name the input that holds the culprit.
    """
    if merged.numel() == 0:
        return
    ends = torch.stack(torch.aminmax(merged))
    if bool(torch.isfinite(ends.to(job.out_dtype)).all()):
        return
    name = job.entry.name
    named = [("vlm", 0, inp.vlm), ("base", 0, inp.base)] + [("experts", j, x) for j, x in enumerate(inp.experts or [])]
    for role, j, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SkillgraftError(f"non-finite values (NaN or Inf) in {name} of {where(role, j)}; "
                                  "the checkpoint is damaged or was saved from a diverged run")
    if bool(torch.isfinite(ends).all()):
        big = float(ends.abs().max())
        raise SkillgraftError(f"merged {name} overflows {str(job.out_dtype).replace('torch.', '')} (largest "
                              f"magnitude {big:.3g}); merge to bfloat16 or float32, or lower the scale")
    raise SkillgraftError(f"merging {name} gave non-finite values (NaN or Inf) from finite inputs; "
                          f"check the method's parameters ({job.args.params if job.args else {}})")


def _apply_block(job: Job, inp: Inputs, s: MergeSettings, streams: Any, blk: slice, device: torch.device,
                 index: int | None = None) -> tuple[torch.Tensor, Norms]:
    """One block of the apply pass: the merged float32 rows and their norm statistics."""
    stride, start = stats_stride(job.entry), blk.start
    xs, base = _operands(inp, s, job.deltas, device)
    part = Norms()
    kind, symmetric = s.method.kind, s.mode == "symmetric"
    if kind == "interp":
        vs = _every(xs[0], stride, start).clone()
    else:
        sq = [_sq(_every(t, stride, start)) for t in xs]
        part.deltas = sq[1:] if symmetric else sq
        if inp.base is not None:
            part.base = _sq(_every(inp.base, stride, start).to(device, torch.float32))
        vs = _every(inp.vlm, stride, start).to(device, torch.float32)
    delta = job.kernel.apply(xs, streams, blk, index)
    if kind == "interp":
        merged = delta
    elif symmetric:
        merged = delta.add_(base)
    else:
        part.change = _sq(_every(delta, stride, start))
        merged = delta.add_(inp.vlm.to(device))  # theta_V widened to float32 by the op
    if kind == "interp" or symmetric:
        part.change = _sq(_every(merged, stride, start) - vs)
    part.vlm = _sq(vs)
    return merged, part


Write = Callable[[torch.Tensor], None]


def copy_entry(job: Job, take: Callable[[Read], Inputs], write: Write,
               between: Callable[[], None] | None = None) -> None:
    """Stream the VLM's tensor to the output as it is (cast to the output dtype); ``between`` is
    called before each block (the run's heap guard)."""
    for blk, _ in job.work:
        if between is not None:
            between()
        write(take(job.read(blk, ("vlm",))).vlm.to(job.out_dtype))


def _apply_and_check(job: Job, inp: Inputs, s: MergeSettings, streams: Any, blk: slice, device: torch.device,
                     where: Callable[[str, int], str], index: int) -> tuple[torch.Tensor, Norms]:
    merged, part = _apply_block(job, inp, s, streams, blk, device, index)
    _check_finite(job, inp, merged, where)
    return merged.to(job.out_dtype), part


def merge_entry(job: Job, take: Callable[[Read], Inputs], s: MergeSettings, device: torch.device, write: Write,
                where: Callable[[str, int], str] = lambda role, j: role,
                pool: ThreadPoolExecutor | None = None, workers: int = 1,
                between: Callable[[], None] | None = None) -> Norms:
    """Merge one tensor: sample, statistics passes, apply pass, VLM-only rows; blocks to ``write``.

    With a ``pool`` of ``workers`` threads that many blocks are measured or merged at once when no
    block depends on the one before (one block per random block; in the apply pass, no top-k ties
    carried across blocks); statistics are absorbed and blocks written in order either way.
    ``between`` is called before each block of every pass (the run's heap guard).
    """
    tm = job.kernel
    get = take
    if job.hold:
        held = take(job.read(ALL_ROWS, job.roles_apply))
        mem = MemorySource(held)
        get = mem.read
    if tm.needs_sample:
        if job.hold:
            inp = mem.gather(sample_positions(job.rows * job.row_len), job.roles_op)
        else:
            inp = take(job.read(job.sample, job.roles_op))
        tm.take_sample([x.reshape(-1) for x in _operands(inp, s, job.deltas, device)[0]])
    one_per_random = len(job.work) == len(job.random_blocks)
    parallel = pool is not None and workers > 1 and (one_per_random or not tm.random)
    pending: deque[Future[Any]] = deque()

    def blocks(roles: tuple[str, ...], work: Callable[..., Any], done: Callable[[Any], None]) -> None:
        """``work(inputs, streams, rows, index)`` for every block, ``done`` on the results in block order."""
        randoms = _Randoms(job, s.seed)
        for index, (blk, i) in enumerate(job.work):
            if between is not None:
                between()
            args = (get(job.read(blk, roles)), randoms.get(i), blk, index)
            if parallel:
                pending.append(pool.submit(work, *args))
                while len(pending) >= workers:
                    done(pending.popleft().result())
            else:
                done(work(*args))
        while pending:
            done(pending.popleft().result())

    p = 0
    while tm.pending(p):
        blocks(job.roles_op, lambda inp, streams, blk, index, p=p: tm.measure(
            p, _operands(inp, s, job.deltas, device)[0], streams, blk), lambda part, p=p: tm.absorb(p, part))
        tm.finish(p)
        p += 1
    norms = Norms()
    parallel = parallel and tm.order_free

    def done(result: tuple[torch.Tensor, Norms]) -> None:
        norms.add(result[1])
        write(result[0])

    blocks(job.roles_apply, lambda inp, streams, blk, index: _apply_and_check(job, inp, s, streams, blk, device, where,
                                                                              index), done)
    for blk in job.tail:
        write(get(job.read(blk, ("vlm",))).vlm.to(job.out_dtype))
    return norms


def merge_tensor(entry: Entry, inputs: Inputs, s: MergeSettings, device: torch.device, out_dtype: torch.dtype,
                 deltas: list[bool] | None = None) -> tuple[torch.Tensor, Norms]:
    """Merge one tensor held in memory (``inputs``: the VLM's whole tensor, the base's and experts'
    merged rows); ``deltas[k]`` marks experts that are task vectors already. The engine's own
    per-tensor merge, block for block as ``run`` writes it."""
    deltas = deltas if deltas is not None else [False] * len(inputs.experts or [])
    job = make_job(0, entry, s, IN_MEMORY, deltas)
    job.out_dtype = out_dtype
    job.hold = True
    out = torch.empty(tuple(entry.shape) or (1,), dtype=out_dtype)
    pos = [0]

    def write(block: torch.Tensor) -> None:
        n = block.shape[0]
        out[pos[0] : pos[0] + n].copy_(block)
        pos[0] += n

    def take(req: Read) -> Inputs:
        return inputs if req.rows == ALL_ROWS else MemorySource(inputs).read(req)

    if job.kernel is None:
        copy_entry(job, take, write)
        norms = Norms(deltas=[0.0] * len(deltas))
    else:
        norms = merge_entry(job, take, s, device, write)
    return out.reshape(entry.shape), norms


# ---------------------------------------------------------------------------------- memory


def _itemsize(plan: Plan, roles: tuple[str, ...], e: Entry) -> int:
    n = 0
    if "vlm" in roles:
        n += e.dtype.itemsize
    if "base" in roles and plan.base is not None and e.base_name:
        n += plan.base.reader.dtype(e.base_name).itemsize
    if "experts" in roles:
        n += sum(ck.reader.dtype(x).itemsize for ck, x in zip(plan.experts, e.expert_names))
    return n


def plan_budget(plan: Plan, s: MergeSettings, max_memory: int | None = None, workers: int = 1) -> Budget:
    """Block size, read-ahead and hold limit that keep the run under ``max_memory`` (default: sized to
    the machine) with ``workers`` blocks merged at once; SkillgraftError up front when it cannot be met."""
    total = max_memory if max_memory is not None else default_max_memory()
    base_rss = rss_bytes()
    avail = total - base_rss - 64 * 2**20  # interpreter objects, allocator slack
    merged = [e for e in plan.entries if e.action == "merge"]
    n_ops = len(plan.experts) + (1 if s.mode == "symmetric" or s.method.kind == "interp" else 0)
    in_item = max([_itemsize(plan, ("vlm", "base", "experts"), e) for e in merged] or [4])
    out_item = max([output_dtype(e, s.dtype).itemsize for e in plan.entries] or [4])
    # per block entry: float32 operands, thinned copies and election temporaries; inputs now and next; output queued
    per_entry = 4 * (2 * n_ops + 6) + 2 * in_item + 2 * out_item
    widest = max([math.prod(e.shape[1:]) for e in plan.entries if e.shape] or [1])
    need = widest * per_entry * workers
    if avail < need:
        raise SkillgraftError(
            f"max_memory {_gb(total)} is too small: this process already uses {_gb(base_rss)} and one row block of "
            f"the widest tensor needs {_gb(need)} more; allow at least {_gb(base_rss + need + 64 * 2**20)}")
    block = max(1, min(RANDOM_BLOCK, (avail // 2) // (per_entry * workers)))
    block_bytes = block * per_entry * workers
    ahead = max(block * in_item, min(512 * 2**20, (avail - block_bytes) // 4))
    rest = avail - block_bytes - ahead
    topks = n_ops * (2 if s.method.uses_density else 0)
    band_cap = max(1 << 20, (rest // 4) // max(1, 4 * topks)) if topks else None
    for e in merged:
        shape = _merged_shape(e)
        if s.method.whole_matrix(shape, s.params):
            matrix = 4 * math.prod(shape) * 4  # the matrix, the SVD's two factors and its workspace, float32
            if matrix > rest:
                raise SkillgraftError(
                    f"method {s.method.name} holds each matrix whole for its SVD: {e.name} "
                    f"({' x '.join(map(str, shape))}) needs about {_gb(matrix)} but max_memory {_gb(total)} leaves "
                    f"{_gb(max(rest, 0))}; raise max_memory or exclude that tensor")
    # inputs larger than half the memory available would not stay in the page cache: read them directly
    inputs = sum(_itemsize(plan, ("vlm", "base", "experts"), e) * math.prod(e.shape) for e in merged)
    output = sum(output_dtype(e, s.dtype).itemsize * math.prod(e.shape) for e in plan.entries)
    return Budget(total, block, ahead, hold=max(0, (3 * rest) // 4 - (rest // 4 if topks else 0)), band_cap=band_cap,
                  direct=inputs > available_bytes() // 2, direct_write=output >= DIRECT_WRITE_BYTES)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def plan_jobs(plan: Plan, s: MergeSettings, budget: Budget) -> list[Job]:
    """A job per plan entry, sized to the budget."""
    src = FileSource(plan)
    deltas = [holds_deltas(ck.reader) for ck in plan.experts]
    jobs = []
    for i, e in enumerate(plan.entries):
        try:
            job = make_job(i, e, s, budget, deltas, lambda roles, e=e: src.row_bytes(e, roles))
        except ValueError as err:
            raise SkillgraftError(str(err)) from None
        _hold_or_stream(job, budget)
        jobs.append(job)
    return jobs


def _merged_shape(e: Entry) -> tuple[int, ...]:
    return tuple(e.shape if e.rows is None else (e.rows, *e.shape[1:]))


def describe_plan(plan: Plan, s: MergeSettings) -> list[str]:
    """Lines for the plan (``--dry-run``): matrices a method holds whole, statistics passes it makes."""
    merged = [e for e in plan.entries if e.action == "merge"]
    whole = [e for e in merged if s.method.whole_matrix(_merged_shape(e), s.params)]
    lines = []
    if whole:
        big = max(whole, key=lambda e: math.prod(_merged_shape(e)))
        shape = _merged_shape(big)
        lines.append(f"method {s.method.name} holds each of {len(whole)} matrices whole for its SVD (largest: "
                     f"{big.name}, {' x '.join(map(str, shape))}, about {_gb(16 * math.prod(shape))} with the SVD)")
    stats = s.method.statistics(s.params)
    if stats:
        lines.append(f"method {s.method.name} reads each tensor it merges once more per statistics pass ("
                     + "; ".join(stats) + "); tensors whose inputs fit the budget are read once and held")
    return lines


# ---------------------------------------------------------------------------------- the run


@dataclass
class RunStats:
    seconds: float
    bytes_written: int
    tensors: dict[str, dict[str, Any]]
    budget: Budget | None = None


class _Behind:
    """Writes blocks in a background thread, keeping at most ``limit`` bytes queued."""

    def __init__(self, writer: ShardedWriter, pool: ThreadPoolExecutor, limit: int, bar: Any):
        self.writer, self.pool, self.limit, self.bar = writer, pool, limit, bar
        self.queue: deque[tuple[Future[None], int]] = deque()
        self.queued = 0

    def put(self, name: str, block: torch.Tensor) -> None:
        block = block.to("cpu")
        n = block.numel() * block.element_size()
        while self.queue and self.queued + n > self.limit:
            self._pop()
        self.queue.append((self.pool.submit(self.writer.write_block, name, block), n))
        self.queued += n

    def _pop(self) -> None:
        fut, n = self.queue.popleft()
        fut.result()
        self.queued -= n
        self.bar.update(n)

    def drain(self) -> None:
        while self.queue:
            self._pop()

    def abandon(self) -> None:
        """Cancel queued writes and wait for a running one (before the writer is aborted)."""
        for fut, _ in self.queue:
            fut.cancel()
        for fut, _ in self.queue:
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:
                    pass
        self.queue.clear()


def run(
    plan: Plan,
    settings: MergeSettings,
    writer: ShardedWriter,
    *,
    device: str = "cpu",
    progress: bool = True,
    max_memory: int | None = None,
    budget: Budget | None = None,
    workers: int = 1,
) -> RunStats:
    """Stream every plan entry through the merge into ``writer``; returns per-tensor statistics.

    ``max_memory``: the peak resident memory the run stays under (default: sized to the machine);
    ``budget`` sets block size, read-ahead and hold limit directly instead. ``workers``: blocks merged
    at once, each in its own thread (the torch ops inside use torch's intra-op threads: with several
    workers, one intra-op thread each is best). When the inputs are too large to stay in the page
    cache, reads use direct I/O, and so does ``writer`` for outputs over ``DIRECT_WRITE_BYTES``.
    Changes no process-wide setting (allocator, threads).
    """
    dev = torch.device(device)
    workers = max(1, int(workers))
    budget = budget if budget is not None else plan_budget(plan, settings, max_memory, workers)
    jobs = plan_jobs(plan, settings, budget)
    start = time.perf_counter()
    per_tensor: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress, leave=False)
    labels = [ck.label for ck in plan.experts]
    source = FileSource(plan, direct=budget.direct)
    writer.direct = writer.direct or budget.direct or budget.direct_write
    with ThreadPoolExecutor(1, thread_name_prefix="sg-read") as readers, ThreadPoolExecutor(
        1, thread_name_prefix="sg-write"
    ) as writers, ThreadPoolExecutor(workers, thread_name_prefix="sg-merge") as mergers:
        foreseen: Iterator[Read] = chain.from_iterable(j.requests() for j in jobs)
        feed = Feed(source, plan.entries, foreseen, budget.ahead, readers)
        guard = HeapGuard(int(HEAP_GUARD * budget.max_memory)) if budget.max_memory else None
        behind = _Behind(writer, writers, max(2 * budget.block_entries * 4, 64 * 2**20), bar)
        try:
            for job in jobs:
                e = job.entry
                info: dict[str, Any] = {"action": e.action, "reason": e.reason}

                def write(block: torch.Tensor, name: str = e.name) -> None:
                    behind.put(name, block)

                if job.kernel is None:
                    copy_entry(job, feed.take, write, guard)
                    norms = Norms(deltas=[0.0] * len(labels)) if e.action == "merge" else None
                else:
                    norms = merge_entry(job, feed.take, settings, dev, write,
                                        lambda role, j, e=e: source.path_of(e, role, j), mergers, workers, guard)
                if e.action == "merge":
                    info.update(
                        lm_name=e.lm_name,
                        expert_name=e.expert_names[0] if e.expert_names else None,
                        expert_names=dict(zip(labels, e.expert_names)),
                        base_name=e.base_name,
                        rows=[0, e.rows] if e.rows is not None else None,
                        weights=job.args.weights,
                    )
                    if norms.deltas:
                        info["rel_delta_norm"] = dict(zip(labels, (round(x, 6) if math.isfinite(x) else None
                                                                   for x in norms.rel_deltas())))
                    info["rel_change"] = round(norms.rel_change(), 6)
                per_tensor[e.name] = info
            behind.drain()
        except BaseException:
            feed.close()
            behind.abandon()
            writer.abort()
            raise
        finally:
            bar.close()
    return RunStats(time.perf_counter() - start, writer.total_bytes, per_tensor, budget)
