"""Where the rows of a tensor's inputs come from: checkpoint files, read ahead, or memory.

The engine merges a tensor block by block and asks for each block's inputs (the VLM's, the base's
and each expert's rows) with a ``Read``. ``Feed`` runs the reads of a whole merge in a background
thread, in the order the engine will ask for them, ahead of use within a byte budget; a read the
feed did not foresee (a rare extra statistics pass) is done at once. ``MemorySource`` serves the
same requests from tensors already in memory (an entry small enough to hold, or a model loaded for
an in-place sweep).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .mapping.plan import Entry, Plan

Tensor = torch.Tensor
ROLES = ("vlm", "base", "experts")


@dataclass
class Inputs:
    """One block of a tensor's inputs: the VLM's rows, the base's (None if not read), the experts'."""

    vlm: Tensor | None = None
    base: Tensor | None = None
    experts: list[Tensor] | None = None


@dataclass(frozen=True)
class Read:
    """Rows of one plan entry's inputs: a range, or sampled row indices; ``roles`` says whose."""

    key: int
    rows: slice | tuple[int, ...]
    roles: tuple[str, ...]
    nbytes: int


def read_rows(reader: Any, name: str, start: int, stop: int, direct: bool = False) -> Tensor:
    """Rows ``start:stop`` of tensor ``name`` in a fresh buffer; a 0-dim tensor is one row.

    Readers with ``read_rows`` (checkpoint files) read only those bytes (``direct``: bypassing the
    page cache where they can); others are asked for the first ``stop`` rows (``get_rows``) and sliced.
    """
    if not reader.shape(name):
        return reader.get(name).reshape(1)
    fast = getattr(reader, "read_rows", None)
    if fast is not None:
        return fast(name, start, stop, direct) if direct else fast(name, start, stop)
    return reader.get_rows(name, stop)[start:stop]


class _Whole:
    """The tensor last read whole from a reader without ``read_rows`` (a skill, a LoRA adapter, which
    compute their rows): its row blocks are cut from it instead of computing the first rows again."""

    def __init__(self) -> None:
        self.key: tuple[int, str] | None = None
        self.tensor: Tensor | None = None
        self.lock = threading.Lock()

    def rows(self, reader: Any, name: str, start: int, stop: int) -> Tensor:
        with self.lock:
            if self.key != (id(reader), name):
                self.key, self.tensor = None, None
                self.tensor, self.key = reader.get(name), (id(reader), name)
            return self.tensor[start:stop]


def _sample_rows(reader: Any, name: str, rows: tuple[int, ...]) -> Tensor:
    return torch.cat([read_rows(reader, name, r, r + 1) for r in rows])


def row_nbytes(reader: Any, name: str) -> int:
    shape = reader.shape(name)
    return reader.nbytes(name) // shape[0] if shape and shape[0] else reader.nbytes(name)


class FileSource:
    """Reads an entry's rows from the plan's checkpoint readers (``direct``: bypassing the page cache)."""

    def __init__(self, plan: Plan, direct: bool = False):
        self.plan = plan
        self.direct = direct
        self._whole = _Whole()

    def names(self, e: Entry) -> dict[str, Any]:
        p = self.plan
        out: dict[str, Any] = {"vlm": [(p.vlm.reader, e.name)]}
        out["experts"] = [(ck.reader, n) for ck, n in zip(p.experts, e.expert_names)]
        out["base"] = [(p.base.reader, e.base_name)] if p.base is not None and e.base_name else []
        return out

    def row_bytes(self, e: Entry, roles: Iterable[str]) -> int:
        names = self.names(e)
        return sum(row_nbytes(r, n) for role in roles for r, n in names[role])

    def read(self, e: Entry, req: Read) -> Inputs:
        names = self.names(e)

        def get(reader: Any, name: str, role: str) -> Tensor:
            if req.rows == slice(None):  # the entry held whole: the VLM's every row, the others' merged rows
                return reader.get(name) if role == "vlm" else reader.get_rows(name, e.rows)
            if isinstance(req.rows, slice):
                if reader.shape(name) and getattr(reader, "read_rows", None) is None:
                    return self._whole.rows(reader, name, req.rows.start, req.rows.stop)
                return read_rows(reader, name, req.rows.start, req.rows.stop, self.direct)
            return _sample_rows(reader, name, req.rows)

        out = Inputs()
        if "vlm" in req.roles:
            out.vlm = get(*names["vlm"][0], "vlm")
        if "base" in req.roles and names["base"]:
            out.base = get(*names["base"][0], "base")
        if "experts" in req.roles:
            out.experts = [get(r, n, "experts") for r, n in names["experts"]]
        return out

    def path_of(self, e: Entry, role: str, index: int = 0) -> str:
        reader, name = self.names(e)[role][index]
        where = getattr(reader, "path_of", None)
        return str(where(name)) if where is not None else str(getattr(reader, "root", "?"))


class MemorySource:
    """An entry's inputs held whole in memory; serves row ranges and samples as views."""

    def __init__(self, inputs: Inputs):
        self.whole = inputs

    def read(self, req: Read) -> Inputs:
        def cut(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            t = t.reshape(1) if t.dim() == 0 else t
            return t[req.rows] if isinstance(req.rows, slice) else t[list(req.rows)]

        w = self.whole
        return Inputs(cut(w.vlm) if "vlm" in req.roles else None, cut(w.base) if "base" in req.roles else None,
                      [cut(x) for x in w.experts] if "experts" in req.roles and w.experts is not None else None)

    def gather(self, idx: Tensor, roles: tuple[str, ...]) -> Inputs:
        """The inputs at flat positions ``idx`` (for a threshold's sample)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1)[idx.to(t.device)]

        w = self.whole
        return Inputs(pick(w.vlm) if "vlm" in roles else None, pick(w.base) if "base" in roles else None,
                      [pick(x) for x in w.experts] if "experts" in roles and w.experts is not None else None)


class Feed:
    """Runs foreseen reads in a background thread, in order, ahead of use within ``ahead_bytes``.

    ``take(req)`` returns the inputs of ``req``: the result of the oldest foreseen read if it is that
    one, else a read made at once (the foreseen ones stay queued). Reads of an entry held whole in
    memory (``Read`` with every role over all rows) are handed out as they are.
    """

    def __init__(self, source: FileSource, entries: list[Entry], foreseen: Iterable[Read], ahead_bytes: int,
                 pool: ThreadPoolExecutor):
        self.source, self.entries, self.pool = source, entries, pool
        self.it: Iterator[Read] = iter(foreseen)
        self.ahead = ahead_bytes
        self.pending: deque[tuple[Read, Future[Inputs]]] = deque()
        self.in_flight = 0
        self.next: Read | None = next(self.it, None)

    def _fill(self) -> None:
        while self.next is not None and (not self.pending or self.in_flight + self.next.nbytes <= self.ahead):
            req = self.next
            self.pending.append((req, self.pool.submit(self.source.read, self.entries[req.key], req)))
            self.in_flight += req.nbytes
            self.next = next(self.it, None)

    def take(self, req: Read) -> Inputs:
        self._fill()
        if self.pending and self.pending[0][0] == req:
            done, fut = self.pending.popleft()
            self.in_flight -= done.nbytes
            out = fut.result()
            self._fill()
            return out
        return self.source.read(self.entries[req.key], req)

    def close(self) -> None:
        for _, fut in self.pending:
            fut.cancel()
        self.pending.clear()


def sample_rows(n_rows: int, row_len: int, want: int, seed: int) -> tuple[int, ...]:
    """Stratified pseudo-random rows, at least ``want`` entries in all (one row from each of equal strata)."""
    m = min(n_rows, max(64, math.ceil(want / max(row_len, 1))))
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(m, generator=g, dtype=torch.float64)
    return tuple(int((i + float(u[i])) * n_rows / m) for i in range(m))
