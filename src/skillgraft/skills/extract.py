"""``skill extract``: stream an expert and its base into a skill directory, one tensor at a time.

    SKILL/skill.safetensors   the task vector tau = theta_E - theta_B of every language-model
                              tensor, under plain causal-LM names, in one of FORMATS
                              (sharded as skill-0000i-of-0000n.safetensors + index when large)
    SKILL/skill.json          format version, sources, the base's model_type, config and shapes,
                              settings, per-tensor delta norms and reconstruction errors, and a
                              fingerprint of the base for lineage checks
    SKILL/README.md           a card: what the skill is and how to use it

Memory: the expert's and the base's tensor in their stored dtype, plus float32 row blocks; the
``lowrank`` and ``sparse`` formats hold one float32 task-vector matrix at a time (an SVD and a
top-k selection need the whole matrix), as the engine's whole-tensor methods do.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..defaults import DEFAULT_SHARD_SIZE
from ..engine import DTYPES
from ..errors import SkillgraftError
from ..io.outdir import OutputDir, local_inputs
from ..io.reader import CheckpointReader
from ..io.resolve import resolve_checkpoint
from ..io.writer import parse_size
from ..mapping.checks import UNRELATED_DELTA
from ..mapping.layout import EMBED, HEAD, layer_count, reference_shapes
from ..mapping.plan import open_checkpoint
from ..version import __version__
from . import compress as C
from .card import skill_card
from .detect import expert_kind
from .fingerprint import make_fingerprint
from .naming import FORMAT_VERSION, PARTS, SKILL_JSON, part_name, plain_name
from .store import SkillWriter

FORMATS = ("full", "lowrank", "bitdelta", "sparse")
_VOCAB = (EMBED, HEAD)
log = logging.getLogger("skillgraft")
_BUFFERS = ("rotary_emb.inv_freq",)


@dataclass
class SkillSettings:
    """How a task vector is stored: the format and its one knob, and the dtype of stored values."""

    format: str = "full"
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    dtype: str = "auto"

    def check(self) -> None:
        """Refuse impossible combinations with one-line messages, before anything is read."""
        f = self.format
        if f not in FORMATS:
            raise SkillgraftError(f"unknown skill format {f!r}; choose one of: {', '.join(FORMATS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SkillgraftError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")
        if f == "lowrank":
            if (self.rank is None) == (self.energy is None):
                raise SkillgraftError("the lowrank format needs a rank or an energy fraction (exactly one of them)")
            if self.rank is not None and self.rank < 1:
                raise SkillgraftError(f"rank must be at least 1, got {self.rank}")
            if self.energy is not None and not 0.0 < self.energy <= 1.0:
                raise SkillgraftError(f"energy must be in (0, 1], got {self.energy}")
        elif self.rank is not None or self.energy is not None:
            raise SkillgraftError(f"rank and energy apply to the lowrank format, not {f}")
        if f == "sparse":
            if self.density is None or not 0.0 < self.density <= 1.0:
                raise SkillgraftError("the sparse format needs a density in (0, 1], the fraction of entries kept")
        elif self.density is not None:
            raise SkillgraftError(f"density applies to the sparse format, not {f}")

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "energy": self.energy, "density": self.density, "dtype": self.dtype}


@dataclass
class Pair:
    """One language-model tensor: its names in expert and base, the rows a skill covers."""

    rel: str
    expert: str
    base: str
    shape: tuple[int, ...]
    rows: int | None = None  # vocabulary tensors of different sizes: the shared rows

    @property
    def name(self) -> str:
        return plain_name(self.rel)


@dataclass
class ExtractResult:
    out_dir: Path
    meta: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def pair_tensors(expert: CheckpointReader, base: CheckpointReader) -> tuple[list[Pair], list[str], Any, Any]:
    """Match every floating-point LM tensor of the expert with the base's; refuse a mismatched pair."""
    ck_e = open_checkpoint("expert", expert, None)
    ck_b = open_checkpoint("base", base, reference_shapes(expert, ck_e.layout))
    ne, nb = layer_count(ck_e.rel), layer_count(ck_b.rel)
    if ne != nb:
        raise SkillgraftError(f"layer count mismatch: the expert has {ne} decoder layers, the base {nb}; "
                              f"the expert is not derived from this base")
    pairs, notes = [], []
    for rel, en in ck_e.rel.items():
        if rel.endswith(_BUFFERS) or not expert.dtype(en).is_floating_point:
            continue
        bn = ck_b.source_for(rel)
        if bn is None:
            raise SkillgraftError(f"the base has no tensor for the expert's {en} ({rel}); is it the expert's base?")
        se, sb = expert.shape(en), base.shape(bn)
        rows = None
        if se != sb:
            if rel not in _VOCAB or se[1:] != sb[1:]:
                raise SkillgraftError(f"shape mismatch: expert {en} is {list(se)} but base {bn} is {list(sb)}; "
                                      f"the expert is not derived from this base")
            rows = min(se[0], sb[0])
            notes.append(f"{rel}: expert has {se[0]} rows, base {sb[0]}; the skill covers the first {rows}")
        shape = (rows, *se[1:]) if rows is not None else se
        pairs.append(Pair(rel, en, bn, tuple(shape), rows))
    if not pairs:
        raise SkillgraftError(f"expert {expert.root}: no floating-point language-model tensors to extract")
    return pairs, notes, ck_e, ck_b


def _stored_dtype(settings: SkillSettings, expert_dtype: torch.dtype) -> torch.dtype:
    return expert_dtype if settings.dtype == "auto" else DTYPES[settings.dtype]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor viewed as a 2-D [rows, rest] matrix (a scalar as 1 x 1, a vector as n x 1)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(t.shape[0], -1)


class _Encoder:
    """Encodes one tensor's task vector in the chosen format and writes its parts."""

    def __init__(self, settings: SkillSettings, writer: SkillWriter):
        self.s = settings
        self.w = writer

    def __call__(self, p: Pair, inputs: list[torch.Tensor]) -> dict[str, Any]:
        """Encode ``inputs = [expert tensor, base tensor]``; the list is emptied once they are used up,
        so a whole-matrix format holds its float32 task vector without the 16-bit inputs."""
        e, b = inputs
        dtype = _stored_dtype(self.s, e.dtype)
        fmt = self.s.format if len(p.shape) == 2 else "full"
        if fmt == "full":
            return self._full(p, e, b, dtype)
        if fmt == "bitdelta":
            return self._bitdelta(p, e, b, dtype)
        delta, base_sq = self._whole_delta(p, e, b)
        inputs.clear()
        del e, b
        if fmt == "lowrank":
            return self._lowrank(p, delta, base_sq, dtype)
        return self._sparse(p, delta, base_sq, dtype)

    @staticmethod
    def _blocks(p: Pair, e: torch.Tensor, b: torch.Tensor):
        """(float32 delta block, float32 base block) over row blocks; non-finite inputs refused."""
        e2, b2 = _as_rows(e), _as_rows(b)
        for blk in C.row_blocks(e2.shape[0], e2.shape[1]):
            bb = b2[blk].float()
            d = e2[blk].float().sub_(bb)
            if not bool(torch.isfinite(d).all()):
                raise SkillgraftError(f"{p.expert}: the expert or the base holds non-finite values (inf or NaN)")
            yield blk, d, bb

    def _whole_delta(self, p: Pair, e: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
        delta = torch.empty(p.shape, dtype=torch.float32)
        base_sq = 0.0
        for blk, d, bb in self._blocks(p, e, b):
            delta[blk] = d
            base_sq += float(bb.square().sum())
        return delta, base_sq

    @staticmethod
    def _stats(kind: str, p: Pair, delta_sq: float, base_sq: float, err_sq: float, nbytes: int, **extra) -> dict[str, Any]:
        out = {"kind": kind, "shape": list(p.shape), "delta_norm": math.sqrt(delta_sq), "base_norm": math.sqrt(base_sq),
               "rel_delta": C.rel(delta_sq, base_sq), "rel_error": C.rel(err_sq, delta_sq), "bytes": nbytes}
        if p.rows is not None:
            out["rows"] = p.rows
        out.update(extra)
        return {k: ((float(f"{v:.6g}") if math.isfinite(v) else None) if isinstance(v, float) else v) for k, v in out.items()}

    def _full(self, p: Pair, e: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        out = torch.empty(p.shape, dtype=dtype)
        o2 = _as_rows(out)
        dsq = bsq = esq = 0.0
        for blk, d, bb in self._blocks(p, e, b):
            o2[blk] = d
            dsq += float(d.square().sum())
            bsq += float(bb.square().sum())
            esq += float((d - o2[blk].float()).square().sum())
        self.w.write(p.name, out)
        return self._stats("full", p, dsq, bsq, esq, out.numel() * out.element_size())

    def _bitdelta(self, p: Pair, e: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        rows, cols = p.shape
        sign = torch.empty(rows, (cols + 7) // 8, dtype=torch.uint8)
        scale = torch.empty(rows, dtype=dtype)
        dsq = bsq = esq = 0.0
        for blk, d, bb in self._blocks(p, e, b):
            sign[blk] = C.pack_signs(d)
            scale[blk] = C.bitdelta_scales(d)
            approx = C.bitdelta_rows(sign[blk], scale[blk], cols)
            dsq += float(d.square().sum())
            bsq += float(bb.square().sum())
            esq += float((d - approx).square().sum())
        self.w.write(part_name(p.name, "sign"), sign)
        self.w.write(part_name(p.name, "scale"), scale)
        return self._stats("bitdelta", p, dsq, bsq, esq, sign.numel() + scale.numel() * scale.element_size())

    def _write_full(self, p: Pair, delta: torch.Tensor, base_sq: float, dtype: torch.dtype, why: str) -> dict[str, Any]:
        out = delta.to(dtype)
        self.w.write(p.name, out)
        dsq = float(delta.square().sum())
        esq = float((delta - out.float()).square().sum())
        return self._stats("full", p, dsq, base_sq, esq, out.numel() * out.element_size(), stored_full=why)

    def _lowrank(self, p: Pair, delta: torch.Tensor, base_sq: float, dtype: torch.dtype) -> dict[str, Any]:
        rows, cols = p.shape
        bf, af = C.lowrank_factors(delta, rank=self.s.rank, energy=self.s.energy)
        r = af.shape[0]
        if r * (rows + cols) >= rows * cols:
            return self._write_full(p, delta, base_sq, dtype, f"rank {r} factors are no smaller than the matrix")
        bf, af = bf.to(dtype), af.to(dtype)
        dsq = esq = 0.0
        for blk in C.row_blocks(rows, cols):
            d = delta[blk]
            dsq += float(d.square().sum())
            esq += float((d - C.lowrank_rows(bf[blk], af)).square().sum())
        self.w.write(part_name(p.name, "B"), bf)
        self.w.write(part_name(p.name, "A"), af)
        nbytes = (bf.numel() + af.numel()) * bf.element_size()
        return self._stats("lowrank", p, dsq, base_sq, esq, nbytes, rank=r)

    def _sparse(self, p: Pair, delta: torch.Tensor, base_sq: float, dtype: torch.dtype) -> dict[str, Any]:
        cols = p.shape[1]
        rowptr, col, val = C.sparse_rows(delta, self.s.density)
        nnz = val.numel()
        col = col.to(C.index_dtype(cols - 1))
        rowptr = rowptr.to(C.index_dtype(nnz))
        stored = val.to(dtype)
        nbytes = sum(t.numel() * t.element_size() for t in (rowptr, col, stored))
        if nbytes >= delta.numel() * torch.empty(0, dtype=dtype).element_size():
            return self._write_full(p, delta, base_sq, dtype, f"density {self.s.density} is no smaller than the matrix")
        dsq = float(delta.square().sum())
        kept_sq = float(val.square().sum())
        esq = max(dsq - kept_sq, 0.0) + float((val - stored.float()).square().sum())
        self.w.write(part_name(p.name, "rowptr"), rowptr)
        self.w.write(part_name(p.name, "col"), col)
        self.w.write(part_name(p.name, "val"), stored)
        return self._stats("sparse", p, dsq, base_sq, esq, nbytes, nnz=nnz)


def _lm_bytes(reader: CheckpointReader, pairs: list[Pair]) -> tuple[int, int]:
    numel = sum(math.prod(reader.shape(p.expert)) for p in pairs)
    return numel, sum(reader.nbytes(p.expert) for p in pairs)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def extract_skill(
    expert: str,
    base: str,
    out: str | Path,
    settings: SkillSettings | None = None,
    *,
    force: bool = False,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Extract ``tau = expert - base`` over the language model into the skill directory ``out``.

    ``out`` is claimed before any work as ``inject`` claims it (``io.outdir.OutputDir``): it must not
    be, hold or lie inside the expert or the base, and ``force`` replaces only a previous skillgraft
    output (a skill's ``skill.json`` lists its files). The skill is written atomically.
    Warnings go to ``on_warning(message)`` when given, else to the ``skillgraft`` logger.
    """
    settings = settings or SkillSettings()
    settings.check()
    out = Path(out)
    max_shard = parse_size(shard_size)
    with ExitStack() as stack:
        refs = [("expert", expert), ("base", base)]
        claim = stack.enter_context(OutputDir(out, force, inputs=local_inputs(refs), log=on_warning or log.warning))
        exp_dir, base_dir = resolve_checkpoint(expert, "expert"), resolve_checkpoint(base, "base")
        claim.check_inputs([("expert", exp_dir), ("base", base_dir)])
        for role, d in (("expert", exp_dir), ("base", base_dir)):
            kind = expert_kind(d)
            if kind != "checkpoint":
                raise SkillgraftError(f"{role} {d} is a {'skill' if kind == 'skill' else 'LoRA adapter'} directory; "
                                      f"skills are extracted from a full expert checkpoint and its base")
        start = time.perf_counter()
        er = stack.enter_context(CheckpointReader(exp_dir))
        br = stack.enter_context(CheckpointReader(base_dir))
        pairs, notes, ck_e, ck_b = pair_tensors(er, br)
        names = [n for p in pairs for n in ([p.name] + [part_name(p.name, x) for x in PARTS[settings.format]])]
        total = sum(er.nbytes(p.expert) for p in pairs)
        tensors: dict[str, dict[str, Any]] = {}
        with claim.stage() as tmp:
            writer = SkillWriter(tmp, names, max_shard)
            encode = _Encoder(settings, writer)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="extracting", disable=not progress, leave=False)
            try:
                for p in pairs:
                    tensors[p.name] = encode(p, [er.get_rows(p.expert, p.rows), br.get_rows(p.base, p.rows)])
                    bar.update(er.nbytes(p.expert))
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
            files = writer.finish()
            shapes = {p.rel: p.shape for p in pairs}
            fp = make_fingerprint(shapes, lambda rel, n: br.get_rows(ck_b.source_for(rel), n), plain_name)
            numel, nbytes = _lm_bytes(er, pairs)
            expert_dtype = er.dtype(pairs[0].expert)
            meta = {
                "skillgraft_skill": FORMAT_VERSION,
                "format": settings.format,
                "settings": settings.as_dict(),
                "expert": {"id": str(expert), "model_type": er.config.get("model_type"),
                           "dtype": _dtype_name(expert_dtype), "lm_numel": numel, "lm_bytes": nbytes},
                "base": {"id": str(base), "model_type": br.config.get("model_type"), "config": br.config,
                         "n_layers": layer_count(ck_b.rel), "tied_embeddings": ck_e.layout.tied,
                         "shapes": {p.name: list(p.shape) for p in pairs}},
                "fingerprint": fp,
                "files": files,
                "bytes": writer.total_bytes,
                "notes": notes,
                "created_with": f"skillgraft {__version__}",
                "seconds": round(time.perf_counter() - start, 3),
                "tensors": tensors,
            }
            (tmp / SKILL_JSON).write_text(json.dumps(meta, separators=(",", ":")))
            (tmp / "README.md").write_text(skill_card(meta))
    warnings = list(notes)
    rels = [t["rel_delta"] for t in tensors.values() if isinstance(t.get("rel_delta"), float) and t["base_norm"] > 0]
    if rels and statistics.median(rels) > UNRELATED_DELTA:
        warnings.append(f"the expert looks unrelated to the base: median relative delta norm {statistics.median(rels):.2f} "
                        f"(fine-tunes are usually below 0.1); is the base the model the expert was derived from?")
    for w in warnings:
        (on_warning or log.warning)(w)
    return ExtractResult(out, meta, warnings)
