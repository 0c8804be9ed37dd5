"""Lazy, per-tensor reading of Hugging Face checkpoint directories.

Supports a single ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
and ``pytorch_model*.bin`` (loaded with ``weights_only=True, mmap=True``, never a full unpickle).
Only names, shapes and dtypes are read up front; a tensor's bytes are read when asked for.

Safetensors tensors are read with positioned reads into fresh buffers rather than through a
memory map: a map keeps every page it touched resident in the process until it is closed, so
streaming a 15 GB checkpoint through ``safe_open`` would show 15 GB of RSS. Reading exactly the
bytes of one tensor (or its first rows) keeps memory at the tensors in flight.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One safetensors file: its header parsed up front, tensors read on demand with ``preadv``."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) < 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(os.pread(self.fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a mapping")
        except (ValueError, OSError) as e:
            os.close(self.fd)
            raise SkillgraftError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = ST_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(int(x) for x in info["shape"])
            except (KeyError, TypeError, ValueError):
                os.close(self.fd)
                raise SkillgraftError(f"{path}: bad header entry for {name}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or self.data_start + end > size:
                os.close(self.fd)
                raise SkillgraftError(f"{path}: tensor {name} does not fit its declared shape (truncated file?)")
            self.entries[name] = (dtype, shape, begin, end)

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its first ``rows`` rows) in a fresh, writable CPU buffer."""
        shape = self.entries[name][1]
        if rows is None or not shape or rows >= shape[0]:
            return self.read_rows(name, 0, shape[0] if shape else 1)
        return self.read_rows(name, 0, rows)

    def read_rows(self, name: str, start: int, stop: int, direct: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (a 0-dim tensor is one row), read with positioned reads.

        ``direct``: read with ``O_DIRECT`` where the file system allows it: the disk writes straight into
        the buffer, with no copy through the page cache and no CPU time (for inputs too large to stay
        cached); buffered reads otherwise.
        """
        dtype, shape, begin, end = self.entries[name]
        if not shape:
            start, stop, out_shape = 0, 1, ()
        else:
            stop = min(stop, shape[0])
            out_shape = (max(stop - start, 0), *shape[1:])
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else end - begin
        offset = self.data_start + begin + start * row_bytes
        n = max(stop - start, 0) * row_bytes
        lead = offset % _ALIGN
        fd = self._direct_fd() if direct and n and lead % dtype.itemsize == 0 else -1
        if fd < 0:
            buf = torch.empty(n, dtype=torch.uint8)
            _pread_all(self.fd, buf, offset, n, self.path, name)
            return buf.view(dtype).reshape(out_shape)
        span = -(-(lead + n) // _ALIGN) * _ALIGN
        raw = torch.empty(span + _ALIGN, dtype=torch.uint8)
        shift = -raw.data_ptr() % _ALIGN
        aligned = raw[shift : shift + span]
        _pread_all(fd, aligned, offset - lead, lead + n, self.path, name)
        return aligned[lead : lead + n].view(dtype).reshape(out_shape)

    def _direct_fd(self) -> int:
        """A second descriptor opened with O_DIRECT (-1 where unavailable)."""
        fd = getattr(self, "_dfd", None)
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except (AttributeError, OSError):
                fd = -1
            self._dfd = fd
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if getattr(self, "_dfd", -1) >= 0:
            os.close(self._dfd)
            self._dfd = -1


_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in multiples of the block size


def _pread_all(fd: int, buf: torch.Tensor, offset: int, need: int, path: Path, name: str) -> None:
    """Fill ``buf`` from ``offset`` (a direct read may stop at end of file past ``need`` bytes)."""
    view = memoryview(buf.numpy())
    done = 0
    while done < need:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise SkillgraftError(f"{path}: unexpected end of file reading {name}")
        done += got


def _weight_files(root: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) for a checkpoint directory, preferring safetensors."""
    for kind, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise SkillgraftError(f"{index}: not a valid weight index ({e})") from None
            files = sorted({root / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SkillgraftError(f"{index} names shard {missing[0]} which is missing in {root}")
            return kind, files
        if (root / single).is_file():
            return kind, [root / single]
    loose = sorted(root.glob("*.safetensors"))
    if loose:
        return "safetensors", loose
    raise SkillgraftError(f"no weights in {root}: expected model.safetensors, a sharded index, or pytorch_model.bin")


class CheckpointReader:
    """Read one tensor at a time from a checkpoint directory; knows every name, shape and dtype."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SkillgraftError(f"checkpoint directory not found: {self.root}")
        self.config: dict[str, Any] = self._read_config()
        self.format, files = _weight_files(self.root)
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._handles: dict[Path, Any] = {}
        for f in files:
            if self.format == "safetensors":
                self._scan_safetensors(f)
            else:
                self._scan_bin(f)
        if not self._where:
            raise SkillgraftError(f"{self.root}: the weight files hold no tensors")

    def _read_config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise SkillgraftError(f"{path}: not valid JSON ({e})") from None

    def _scan_safetensors(self, f: Path) -> None:
        h = SafetensorsFile(f)
        self._handles[f] = h
        for name, (dtype, shape, _, _) in h.entries.items():
            self._where[name] = f
            self._shape[name] = shape
            self._dtype[name] = dtype

    def _scan_bin(self, f: Path) -> None:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # an unsafe or corrupt pickle: refuse, never fall back to full unpickling
            raise SkillgraftError(f"{f}: cannot be read safely with weights_only=True ({e})") from None
        if not isinstance(state, dict):
            raise SkillgraftError(f"{f}: expected a state dict of tensors")
        self._handles[f] = state
        for name, t in state.items():
            if isinstance(t, torch.Tensor):
                self._where[name] = f
                self._shape[name] = tuple(t.shape)
                self._dtype[name] = t.dtype

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self._shape[name]:
            n *= s
        return n * self._dtype[name].itemsize

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, on the CPU, in its stored dtype."""
        h = self._handles[self._where[name]]
        if self.format == "safetensors":
            return h.read(name)
        return h[name]

    def get_rows(self, name: str, rows: int | None) -> torch.Tensor:
        """The first ``rows`` rows of ``name`` (all of it when ``rows`` is None), read lazily."""
        if rows is None or rows >= self._shape[name][0]:
            return self.get(name)
        return self.read_rows(name, 0, rows)

    def read_rows(self, name: str, start: int, stop: int, direct: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` in a fresh buffer (safetensors: only those bytes are read;
        ``direct``: with O_DIRECT where possible, see ``SafetensorsFile.read_rows``)."""
        h = self._handles[self._where[name]]
        if self.format == "safetensors":
            return h.read_rows(name, start, stop, direct)
        t = h[name]
        return (t if t.dim() == 0 else t[start:stop]).clone()

    def path_of(self, name: str) -> Path:
        """The weight file holding tensor ``name``."""
        return self._where[name]

    def close(self) -> None:
        for h in self._handles.values():
            if isinstance(h, SafetensorsFile):
                h.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
