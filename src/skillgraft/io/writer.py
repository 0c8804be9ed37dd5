"""A streaming safetensors writer: tensors go to disk as they are computed, shard by shard.

Because the merge plan knows every output name, shape and dtype before any weight is read, each
shard's safetensors header can be written first and each tensor's bytes appended as they arrive,
block by block: the writer never holds a tensor (the ``safetensors`` library can only save a whole
dict).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError
from ..memory import parse_size as _parse
from .reader import ST_DTYPES

_ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in ST_DTYPES.items()}


def parse_size(text: str | int) -> int:
    """Bytes in a shard size such as ``5GB``, ``500MB``, ``2GiB`` or a plain integer."""
    try:
        return _parse(text, "shard size")
    except ValueError as e:
        raise SkillgraftError(str(e)) from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one output tensor, known before it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _shard_header(specs: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


_ALIGN = 4096


class _DirectFile:
    """A file written with O_DIRECT: bytes gather in an aligned staging buffer that goes to disk in
    whole 4 KiB pages, bypassing the page cache (no copy into it, no memory taken from other work);
    the last page is padded, then the file is cut to its length."""

    def __init__(self, path: Path, stage: int = 16 * 2**20):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        raw = torch.empty(stage + _ALIGN, dtype=torch.uint8)
        shift = -raw.data_ptr() % _ALIGN
        self._raw = raw
        self.buf = raw[shift : shift + stage].numpy()
        self.fill = 0
        self.pos = 0

    def write(self, data: memoryview) -> None:
        src = memoryview(data).cast("B")
        while len(src):
            n = min(len(src), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = src[:n]
            self.fill += n
            src = src[n:]
            if self.fill == len(self.buf):
                self._flush(len(self.buf))

    def _flush(self, n: int) -> None:
        view = memoryview(self.buf)[:n]
        done = 0
        while done < n:
            done += os.pwrite(self.fd, view[done:], self.pos + done)
        self.pos += n
        self.fill = 0

    def close(self) -> None:
        if self.fd < 0:
            return
        size = self.pos + self.fill
        if self.fill:
            self._flush(-(-self.fill // _ALIGN) * _ALIGN)
        os.ftruncate(self.fd, size)
        os.close(self.fd)
        self.fd = -1


def _open(path: Path, direct: bool) -> Any:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return _DirectFile(path)
        except OSError:  # the file system does not take direct I/O
            pass
    return open(path, "wb")


class ShardedWriter:
    """Write ``specs`` in order into safetensors shards of at most ``max_shard_bytes`` each.

    Each tensor comes whole (``write``) or in blocks of rows (``write_block``), in the order given.
    Files are named as ``save_pretrained`` names them; an index is written when there is more than
    one shard. ``direct``: write with O_DIRECT where the file system allows it (large outputs).
    """

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int, direct: bool = False):
        unsupported = [s for s in specs if s.dtype not in _ST_NAMES]
        if unsupported:
            raise SkillgraftError(f"cannot write tensor {unsupported[0].name} of dtype {unsupported[0].dtype}")
        self.out_dir = Path(out_dir)
        self.shards: list[list[TensorSpec]] = []
        size = 0
        for s in specs:
            if not self.shards or (size + s.nbytes > max_shard_bytes and self.shards[-1]):
                self.shards.append([])
                size = 0
            self.shards[-1].append(s)
            size += s.nbytes
        n = len(self.shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._done = 0  # bytes of the tensor being written so far (0: between tensors)
        self._fh: Any = None
        self._open_shard = -1
        self.direct = direct

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for _, s in self._order)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name`` (the next one in order)."""
        self.write_block(name, tensor)
        if self._done:
            _, spec = self._order[self._next - 1]
            raise RuntimeError(f"writer expected all of {spec.name} {spec.shape}, got {tuple(tensor.shape)}")

    def write_block(self, name: str, block: torch.Tensor) -> None:
        """Append the next rows of tensor ``name``; the tensor is complete once all its rows came.

        Blocks of one tensor come in row order; a 0-dim tensor is one row of one entry.
        """
        if self._done == 0:
            if self._next >= len(self._order):
                raise RuntimeError(f"writer got an extra tensor {name}")
            shard, spec = self._order[self._next]
        else:
            shard, spec = self._order[self._next - 1]
        rest = spec.shape[1:] if spec.shape else ()
        trailing = tuple(block.shape[1:]) if spec.shape else tuple(block.shape)
        if name != spec.name or block.dtype != spec.dtype or trailing != rest and block.numel() != 0:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, got {name} {tuple(block.shape)} {block.dtype}"
            )
        data = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if self._done + data.numel() > spec.nbytes:
            raise RuntimeError(f"writer got more rows of {spec.name} than its shape {spec.shape} holds")
        if self._done == 0:
            if shard != self._open_shard:
                self._close_shard()
                self._fh = _open(self.out_dir / self.files[shard], self.direct)
                self._fh.write(_shard_header(self.shards[shard]))
                self._open_shard = shard
            self._next += 1
        assert self._fh is not None
        self._fh.write(memoryview(data.numpy()))
        self._done += data.numel()
        if self._done == spec.nbytes:
            self._done = 0

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index if sharded; the list of files written."""
        self._close_shard()
        if self._next != len(self._order) or self._done:
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer finished early: {missing} and {len(self._order) - self._next - 1} more not written")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {s.name: self.files[i] for i, s in self._order},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            return [*self.files, "model.safetensors.index.json"]
        return list(self.files)

    def abort(self) -> None:
        self._close_shard()
