"""Write skill tensors to safetensors shards as they are computed, shapes learned on the way.

A compressed tensor's shape is known only once it is computed (a rank chosen by energy, a
sparse count), so :class:`~skillgraft.io.writer.ShardedWriter`, which writes each shard's header
first from shapes known in advance, does not fit. Here each shard reserves room for its header
(every name it could hold, with the longest shapes), the bytes are appended as they come, and
the header is written into the reserved room at the end, padded with spaces as the safetensors
format allows (a small shard whose room is mostly unused is rewritten with a tight header).
Memory: one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from ..io.reader import ST_DTYPES

SKILL_FILE = "skill.safetensors"
SKILL_INDEX = "skill.safetensors.index.json"
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
_ENTRY_ROOM = 120
COMPACT_SLACK = 4096  # unused header room above which a shard is rewritten compactly ...
COMPACT_MAX = 256 << 20  # ... if its data is at most this size (a copy that costs little)  # bytes per header entry beyond its name: dtype, a 4-D shape, two offsets


def shard_name(i: int, n: int) -> str:
    return SKILL_FILE if n == 1 else f"skill-{i + 1:05d}-of-{n:05d}.safetensors"


class SkillWriter:
    """Append named tensors into shards of at most ``max_shard_bytes``; ``finish`` names the files.

    ``names`` lists every name that may be written (it sizes the reserved header room).
    """

    def __init__(self, out_dir: Path, names: list[str], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard = max_shard_bytes
        self.room = 64 + sum(len(json.dumps(n)) + _ENTRY_ROOM for n in names)
        self.room += -self.room % 8
        self.shards: list[dict[str, dict]] = []
        self._fh: BinaryIO | None = None
        self._size = 0
        self.total_bytes = 0
        self.weight_map: dict[str, int] = {}

    def _tmp(self, i: int) -> Path:
        return self.out_dir / f".shard-{i}.tmp"

    def _open(self) -> None:
        self._close()
        self.shards.append({})
        self._fh = open(self._tmp(len(self.shards) - 1), "wb")
        self._fh.write(b"\0" * (8 + self.room))
        self._size = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._fh is None or (self._size and self._size + nbytes > self.max_shard):
            self._open()
        assert self._fh is not None
        self.shards[-1][name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                                 "data_offsets": [self._size, self._size + nbytes]}
        if nbytes:
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._size += nbytes
        self.total_bytes += nbytes
        self.weight_map[name] = len(self.shards) - 1

    def _close(self) -> None:
        if self._fh is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.shards[-1]}, separators=(",", ":")).encode()
        if len(header) > self.room:  # cannot happen for names given up front; a guard, not a path
            raise RuntimeError("skill header outgrew its reserved room")
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self.room) + header + b" " * (self.room - len(header)))
        self._fh.close()
        self._fh = None
        if self.room - len(header) > COMPACT_SLACK and self._size <= COMPACT_MAX:
            self._compact(self._tmp(len(self.shards) - 1), header)

    def _compact(self, path: Path, header: bytes) -> None:
        """Rewrite a small shard with a header of its own size (the reserved room is mostly unused)."""
        header += b" " * (-len(header) % 8)
        tmp = path.with_suffix(".compact")
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(8 + self.room)
            while chunk := src.read(16 << 20):
                dst.write(chunk)
        os.replace(tmp, path)

    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index if sharded."""
        if self._fh is None and not self.shards:
            self._open()
        self._close()
        n = len(self.shards)
        files = [shard_name(i, n) for i in range(n)]
        for i, f in enumerate(files):
            os.replace(self._tmp(i), self.out_dir / f)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: files[i] for k, i in self.weight_map.items()}}
            (self.out_dir / SKILL_INDEX).write_text(json.dumps(index, indent=2))
            files.append(SKILL_INDEX)
        return files

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
