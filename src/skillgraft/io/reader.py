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
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError
from .paths import checkpoint_file, inside_checkpoint
from .safetensors_header import PREFIX_BYTES, HeaderError, header_length, parse

# safetensors dtype names -> torch dtypes, for every name this torch build can hold. Names the format
# defines but torch cannot (F4, F6_*: sub-byte floats) are refused by name when a file is opened.
_ST_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _ST_TORCH_NAMES.items() if hasattr(torch, attr)
}


class SafetensorsFile:
    """One safetensors file: its header parsed up front, tensors read on demand with ``preadv``."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            n = header_length(os.pread(self.fd, PREFIX_BYTES, 0), size)
            parsed = parse(os.pread(self.fd, n, PREFIX_BYTES), size)
            self.data_start = PREFIX_BYTES + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for name, e in parsed.items():
                if e.dtype not in ST_DTYPES:
                    raise HeaderError(f"tensor {name!r} has dtype {e.dtype}, which skillgraft cannot read or merge")
                self.entries[name] = (ST_DTYPES[e.dtype], e.shape, e.begin, e.end)
        except (HeaderError, OSError) as e:
            os.close(self.fd)
            reason = e if isinstance(e, HeaderError) else (e.strerror or e)
            raise SkillgraftError(f"{path}: not a valid safetensors file: {reason}") from None

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


def _index_shards(index: Path, root: Path) -> list[Path]:
    """The shard files an index names, each checked to lie inside the checkpoint directory."""
    try:
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SkillgraftError(f"{index}: not valid JSON ({str(e).splitlines()[0]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SkillgraftError(f"{index}: weight_map must map tensor names to shard file names")
    files = []
    for name in sorted(set(weight_map.values())):
        path = checkpoint_file(root, name)
        if path is None:
            raise SkillgraftError(
                f"{index} names shard {name!r}, which lies outside the checkpoint directory; refusing to read it"
            )
        if not path.is_file():
            raise SkillgraftError(f"{index} names shard {name} which is missing in {root}")
        files.append(path)
    return files


def _weight_files(root: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) for a checkpoint directory, preferring safetensors."""
    for kind, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = root / index_name
        if index.is_file():
            return kind, _index_shards(index, root)
        if (root / single).is_file():
            return kind, [_inside(root, root / single)]
    loose = sorted(root.glob("*.safetensors"))
    if loose:
        return "safetensors", [_inside(root, f) for f in loose]
    raise SkillgraftError(f"no weights in {root}: expected model.safetensors, a sharded index, or pytorch_model.bin")


def _inside(root: Path, path: Path) -> Path:
    if not inside_checkpoint(path, root):
        raise SkillgraftError(f"{path} is a link to a file outside the checkpoint directory; refusing to read it")
    return path


# torch.save's pre-1.6 (non-zip) format opens with a pickled magic number, 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _legacy_torch_file(f: Path) -> bool:
    """Whether ``f`` was written by torch.save in the legacy (non-zip) format."""
    with open(f, "rb") as fh:
        head = fh.read(32)
    return head[:1] == b"\x80" and _LEGACY_MAGIC in head


def holds_deltas(reader: Any) -> bool:
    """True when a reader's tensors are task vectors already (a skill, a LoRA adapter): no base
    subtraction, and a tensor it lacks is a zero delta."""
    return bool(getattr(reader, "holds_deltas", False))


class TensorIndex:
    """The names, shapes and dtypes half of the reader interface, over ``_shape`` and ``_dtype``."""

    _shape: dict[str, tuple[int, ...]]
    _dtype: dict[str, torch.dtype]

    @property
    def names(self) -> list[str]:
        return list(self._shape)

    def __contains__(self, name: str) -> bool:
        return name in self._shape

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self._shape[name]:
            n *= s
        return n * self._dtype[name].itemsize


class CheckpointReader(TensorIndex):
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
        _inside(self.root, path)
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SkillgraftError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise SkillgraftError(f"{path}: expected a JSON object of model settings, got a {type(config).__name__}")
        for key in ("text_config", "llm_config", "vision_config"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise SkillgraftError(f"{path}: {key} must be an object, got a {type(config[key]).__name__}")
        return config

    def _scan_safetensors(self, f: Path) -> None:
        h = SafetensorsFile(f)
        self._handles[f] = h
        for name, (dtype, shape, _, _) in h.entries.items():
            self._where[name] = f
            self._shape[name] = shape
            self._dtype[name] = dtype

    def _scan_bin(self, f: Path) -> None:
        if _legacy_torch_file(f):
            raise SkillgraftError(
                f"{f}: saved in the legacy (pre-1.6, non-zip) torch format, which cannot be memory-mapped; "
                f"convert it once with: python -c \"import torch; p='{f}'; torch.save(torch.load(p, weights_only=True), p)\""
            )
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # an unsafe or corrupt pickle: refuse, never fall back to full unpickling
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SkillgraftError(f"{f}: cannot be read safely with weights_only=True ({first})") from None
        if not isinstance(state, dict):
            raise SkillgraftError(f"{f}: expected a state dict of tensors")
        self._handles[f] = state
        for name, t in state.items():
            if isinstance(t, torch.Tensor):
                self._where[name] = f
                self._shape[name] = tuple(t.shape)
                self._dtype[name] = t.dtype

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
