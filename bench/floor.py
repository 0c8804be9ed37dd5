"""The floor: read every input tensor once and write one output of the same size, nothing else.

Streams tensor by tensor, in 64 MiB pieces, with plain ``read``/``write`` calls (no mmap, so
page-cache pages are not counted in its RSS): for each tensor of the first checkpoint (the VLM), its
bytes in the other checkpoints (base, expert) where they hold it, then its own, whose bytes go to a
single safetensors file whose header is written first. Its wall time is what any streaming merge
must pay for I/O.

    python bench/floor.py OUT_FILE VLM_DIR BASE_DIR EXPERT_DIR
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

PIECE = 64 * 2**20


def read_header(f: Path) -> tuple[int, dict]:
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def tensor_index(d: Path) -> dict[str, tuple[Path, int, int, dict]]:
    """name -> (file, absolute start, length, header entry)."""
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        f = d / name
        base, header = read_header(f)
        for k, v in header.items():
            a, b = v["data_offsets"]
            out[k] = (f, base + a, b - a, v)
    return out


def main(out: str, *dirs: str) -> None:
    idx = [tensor_index(Path(d)) for d in dirs]
    names = sorted(idx[0], key=lambda n: (idx[0][n][0].name, idx[0][n][1]))
    header, offset = {}, 0
    for n in names:
        _, _, length, entry = idx[0][n]
        header[n] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + length]}
        offset += length
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    buf = bytearray(PIECE)
    view = memoryview(buf)
    handles: dict[Path, object] = {}
    with open(out, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for n in names:
            for m in reversed(idx):  # the VLM's last, so its pieces are the ones written
                if n not in m:
                    continue
                f, start, length, _ = m[n]
                h = handles.get(f) or handles.setdefault(f, open(f, "rb"))
                h.seek(start)
                done = 0
                while done < length:
                    k = h.readinto(view[: min(PIECE, length - done)])
                    if m is idx[0]:
                        fh.write(view[:k])
                    done += k
    for h in handles.values():
        h.close()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
