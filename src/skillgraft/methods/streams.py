"""Random streams of stochastic sparsifiers, continued across the blocks of one random block.

The engine seeds one ``torch.Generator`` per *random block* (whole rows of about 4M entries for
row-local methods, the whole tensor otherwise). Inside it the task vectors that drop entries
("drawers") draw in order, each its block's worth of entries, exactly as if the whole random block
were one tensor. ``BlockStreams`` hands each drawer its own stream positioned where it starts, so
the engine may process a random block in smaller pieces (to bound memory) and still draw the same
bits:

- ``words`` (DARE's default sampler): one 62-bit ``randint`` per drawer seeds a numpy SFC64 stream,
  read as 32-bit words and compared with ``p * 2**32``; the seeds are drawn up front, in order.
- ``floats`` (``torch.rand`` compared with p; ``torch.bernoulli`` draws the same bits): drawer j
  starts ``j * n`` draws into the block's generator. The first drawer uses the generator itself;
  a later one takes over its predecessor's generator when that one has drawn all its entries
  (the common case of one piece per random block), else starts a copy and skips ahead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kernels import compare, less

Tensor = torch.Tensor

SKIP_CHUNK = 1 << 22


def skip(gen: torch.Generator, draws: int) -> None:
    """Advance a CPU generator by ``draws`` float32 draws (one 32-bit word each)."""
    while draws > 0:
        m = min(draws, SKIP_CHUNK)
        torch.rand(m, generator=gen)
        draws -= m


class WordStream:
    """32-bit words of a numpy SFC64 stream, taken in pieces (an odd piece leaves a half word)."""

    def __init__(self, seed: int):
        self.bits = np.random.SFC64(seed)
        self.spare: np.ndarray | None = None

    def below(self, m: int, p: float) -> Tensor:
        """Bool tensor of the next ``m`` words ``< p * 2**32`` (each True with probability ``p``)."""
        have = 0 if self.spare is None else 1
        raw = self.bits.random_raw((m - have + 1) // 2).view(np.uint32)
        words = raw if self.spare is None else np.concatenate([self.spare, raw])
        self.spare = words[m:].copy() if words.size > m else None
        return torch.from_numpy(words[:m] < np.uint32(min(round(p * 2**32), 2**32 - 1)))


class FloatStream:
    """Uniform float32 draws of a torch generator from a fixed starting position."""

    def __init__(self, gen: torch.Generator, budget: int):
        self.gen = gen
        self.left = budget  # draws this drawer takes in its random block

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        u = torch.rand(shape, generator=self.gen, dtype=torch.float32)
        self.left -= u.numel()
        return u


class BlockStreams:
    """The streams of one random block of ``n`` entries for drawers of one kind (``words``/``floats``)."""

    def __init__(self, gen: torch.Generator, n: int, drawers: int, kind: str):
        self.n, self.kind = n, kind
        self.start = gen.get_state() if kind == "floats" else None
        self.gen = gen
        self.words = [WordStream(int(torch.randint(0, 2**62, (1,), generator=gen))) for _ in range(drawers)] \
            if kind == "words" else []
        self.floats: dict[int, FloatStream] = {}

    def keep(self, j: int, shape: tuple[int, ...], p: float | Tensor, device: torch.device) -> Tensor:
        """Keep-mask of drawer ``j``'s next ``shape`` entries, each kept with probability ``p``.

        ``p`` is a number (DARE) or a tensor of ``shape`` (DELLA); masks are drawn on the CPU and
        moved to ``device``, so they are the same whatever device merges.
        """
        if self.kind == "words":
            return self.words[j].below(math.prod(shape), float(p)).reshape(shape).to(device)
        u = self._float_stream(j).uniform(shape)
        if isinstance(p, Tensor):
            return less(u, p.to(u.device, torch.float32)).to(device)
        return compare(u, "<", torch.tensor(float(p), dtype=torch.float32)).to(device)

    def _float_stream(self, j: int) -> FloatStream:
        s = self.floats.get(j)
        if s is not None:
            return s
        prev = self.floats.get(j - 1)
        if j == 0:
            gen = self.gen
        elif prev is not None and prev.left == 0:
            gen = prev.gen  # the previous drawer is done: its generator stands where this one starts
        else:
            gen = torch.Generator()
            gen.set_state(self.start)
            skip(gen, j * self.n)
        s = self.floats[j] = FloatStream(gen, self.n)
        return s
