"""The floor: read every input tensor once and write one output of the same size, nothing else.

For each tensor of the first checkpoint (the VLM): its bytes in the other checkpoints (base,
expert) where they hold it, then its own, in 64 MiB pieces; the VLM's pieces go to a single
safetensors file (header first) from a second thread, so reading and writing overlap as in a
streaming merge. Plain ``pread``/``write`` through the page cache by default; ``--direct`` reads
and writes with O_DIRECT (whole 4 KiB pages, the last one cut to length), as the engine does for
inputs too large to stay cached. Its wall time is what any streaming merge must pay for I/O.

    python bench/floor.py [--direct] OUT_FILE VLM_DIR BASE_DIR EXPERT_DIR
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import struct
import sys
import threading
from pathlib import Path

PIECE = 64 * 2**20
ALIGN = 4096


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


class Writer(threading.Thread):
    """Writes the pieces it is given, in order; direct: through a page-aligned staging buffer."""

    def __init__(self, path: str, direct: bool):
        super().__init__()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
        self.direct = direct
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.stage = memoryview(mmap.mmap(-1, PIECE + 2 * ALIGN))
        self.fill = self.pos = 0

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            data, done = item
            if not self.direct:
                os.write(self.fd, data)
            else:
                while len(data):
                    n = min(len(data), PIECE - self.fill)
                    self.stage[self.fill : self.fill + n] = data[:n]
                    self.fill += n
                    data = data[n:]
                    if self.fill == PIECE:
                        self._flush(PIECE)
            done.release()
        size = self.pos + self.fill
        if self.direct and self.fill:
            self._flush(-(-self.fill // ALIGN) * ALIGN)
            os.ftruncate(self.fd, size)
        os.close(self.fd)

    def _flush(self, n: int) -> None:
        os.pwrite(self.fd, self.stage[:n], self.pos)
        self.pos += n
        self.fill = 0


def main(out: str, *dirs: str, direct: bool = False) -> None:
    idx = [tensor_index(Path(d)) for d in dirs]
    names = sorted(idx[0], key=lambda n: (idx[0][n][0].name, idx[0][n][1]))
    header, offset = {}, 0
    for n in names:
        _, _, length, entry = idx[0][n]
        header[n] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + length]}
        offset += length
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    writer = Writer(out, direct)
    writer.start()
    # two read buffers: one being read into while the writer copies the other out
    bufs = [memoryview(mmap.mmap(-1, PIECE + 2 * ALIGN)) for _ in range(2)]
    free = [threading.Semaphore(1), threading.Semaphore(1)]
    writer.q.put((memoryview(struct.pack("<Q", len(hb)) + hb), threading.Semaphore(0)))
    handles: dict[Path, int] = {}
    turn = 0
    for n in names:
        for m in reversed(idx):  # the VLM's last, so its pieces are the ones written
            if n not in m:
                continue
            f, start, length, _ = m[n]
            h = handles.get(f) or handles.setdefault(f, os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0)))
            lead = start % ALIGN if direct else 0
            done = 0
            while done < length:
                want = min(PIECE, length - done)
                span = -(-(lead + want) // ALIGN) * ALIGN if direct else want
                free[turn].acquire()
                view = bufs[turn]
                got = os.preadv(h, [view[:span]], start - lead + done)
                k = min(want, got - lead)
                if m is idx[0]:
                    writer.q.put((view[lead : lead + k], free[turn]))
                    turn ^= 1
                else:
                    free[turn].release()
                done += k
    writer.q.put(None)
    writer.join()
    for h in handles.values():
        os.close(h)


if __name__ == "__main__":
    args = sys.argv[1:]
    direct = args[0] == "--direct"
    main(*args[direct:], direct=direct)
