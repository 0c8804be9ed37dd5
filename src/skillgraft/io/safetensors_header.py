"""The safetensors header, parsed and validated as strictly as the reference implementation.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data
section. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` mapping of strings.
The reference reader (the ``safetensors`` crate, ``Metadata::validate``) accepts a header only when
the tensors, sorted by offset, tile the data section exactly: the first begins at 0, each begins
where the previous ends, and the last ends at the end of the file; and each tensor's byte count is
its element count times its dtype's size. This module applies the same rules, in pure Python,
before a single weight byte is read: a header that passes cannot make a reader touch bytes outside
the tensor it names (the header itself, another tensor, or past the end of the file).

Written by hand because the ``safetensors`` package validates only inside ``safe_open``, which
memory-maps the file; skillgraft reads tensors with positioned reads instead (see ``reader``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from ..errors import SkillgraftError

PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

# Every dtype the format defines (the reference ``Dtype`` enum), with its size in bits.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: its dtype name, shape and byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class HeaderError(SkillgraftError):
    """A malformed safetensors header (the message names what is wrong, not the file)."""


def header_length(prefix: bytes, file_size: int) -> int:
    """N, from the file's first 8 bytes, checked against the file's size and the format's limit."""
    if len(prefix) < PREFIX_BYTES or file_size < PREFIX_BYTES:
        raise HeaderError("file too short to hold a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
    if n > file_size - PREFIX_BYTES:
        raise HeaderError(f"header length {n} runs past the end of the file ({file_size} bytes)")
    return n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"the header names {k!r} twice")
        out[k] = v
    return out


def _natural(x: object) -> bool:
    return type(x) is int and x >= 0  # bool is an int subclass: refused, as JSON true is not a number


def _entry(name: str, info: object) -> HeaderEntry:
    if not isinstance(info, dict):
        raise HeaderError(f"tensor {name!r}: expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise HeaderError(f"tensor {name!r}: missing or non-string dtype")
    if dtype not in DTYPE_BITS:
        raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r} (the format defines {', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise HeaderError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        raise HeaderError(f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise HeaderError(f"tensor {name!r}: data_offsets end {end} is before begin {begin}")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise HeaderError(f"tensor {name!r}: {numel} {dtype} elements do not fill whole bytes")
    if end - begin != bits // 8:
        raise HeaderError(
            f"tensor {name!r}: shape {shape} of {dtype} needs {bits // 8} bytes but data_offsets give {end - begin}"
        )
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def parse(raw: bytes, file_size: int) -> dict[str, HeaderEntry]:
    """The tensors described by header bytes ``raw`` of a file of ``file_size`` bytes, in file order.

    Raises :class:`HeaderError` (a ``SkillgraftError``) for anything the reference reader refuses:
    bad UTF-8 or JSON, a non-object header, duplicate names, unknown dtypes, shapes that disagree
    with their byte counts, negative, overlapping or out-of-order offsets, and data sections that
    are not covered exactly (holes, trailing bytes, truncation).
    """
    data_size = file_size - PREFIX_BYTES - len(raw)
    if data_size < 0:
        raise HeaderError("the header runs past the end of the file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("the header is not UTF-8 text") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except HeaderError:
        raise
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"the header is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise HeaderError("__metadata__ must map strings to strings")
    entries = sorted((_entry(name, info) for name, info in header.items()), key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin < pos:
            raise HeaderError(f"tensor {e.name!r} overlaps the bytes of another tensor (data_offsets {e.begin}..{e.end})")
        if e.begin > pos:
            raise HeaderError(f"bytes {pos}..{e.begin} of the data section belong to no tensor; "
                              f"the offsets do not cover the data section")
        pos = e.end
    if pos > data_size:
        raise HeaderError(f"tensors need {pos} bytes of data but the file holds {data_size} (truncated file?)")
    if pos < data_size:
        raise HeaderError(f"{data_size - pos} bytes after the last tensor; the offsets do not cover the data section")
    return {e.name: e for e in entries}
