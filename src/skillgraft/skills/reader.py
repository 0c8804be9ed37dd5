"""Read a skill directory as a task-vector checkpoint (see :mod:`skillgraft.skills.delta`).

Everything ``skill.json`` promises is checked when the skill is opened (files present, every
listed tensor's parts present with shapes and dtypes that fit), so a damaged skill fails with
one line before any merge starts. Values are rebuilt lazily, only for the rows asked for.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError
from ..io.reader import SafetensorsFile
from ..mapping.layout import HEAD, LMLayout
from . import compress as C
from .delta import DeltaReader, read_json_mapping
from .fingerprint import check_fingerprint
from .naming import FORMAT_VERSION, PARTS, PLAIN_PREFIX, SKILL_JSON, part_name
from .store import SKILL_FILE, SKILL_INDEX

_NAME = re.compile(r"^(model\.[\w.]+|lm_head\.[\w.]+)$")
_FILE = re.compile(r"^[\w.\-]+\.safetensors$")


def read_meta(root: Path) -> dict[str, Any]:
    """``skill.json`` of a skill directory, checked for the fields every reader relies on."""
    meta = read_json_mapping(root / SKILL_JSON, f"skill {root}")
    if not isinstance(meta.get("tensors"), dict) or not isinstance(meta.get("base"), dict):
        raise SkillgraftError(f"skill {root}: {SKILL_JSON} lacks its 'tensors' and 'base' sections")
    version = meta.get("skillgraft_skill")
    if not isinstance(version, int) or version < 1:
        raise SkillgraftError(f"skill {root}: {SKILL_JSON} has no valid 'skillgraft_skill' format version")
    if version > FORMAT_VERSION:
        raise SkillgraftError(f"skill {root} has format version {version}, newer than this skillgraft reads "
                              f"({FORMAT_VERSION}); upgrade skillgraft")
    return meta


def _weight_files(root: Path) -> list[Path]:
    index = root / SKILL_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SkillgraftError(f"skill {root}: {SKILL_INDEX} is not a valid index ({e})") from None
        bad = [n for n in names if not isinstance(n, str) or not _FILE.match(n)]
        if bad:
            raise SkillgraftError(f"skill {root}: {SKILL_INDEX} names a file outside the skill ({bad[0]!r})")
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise SkillgraftError(f"skill {root}: shard {missing[0]} named by {SKILL_INDEX} is missing")
        return [root / n for n in names]
    if not (root / SKILL_FILE).is_file():
        raise SkillgraftError(f"skill {root}: {SKILL_FILE} is missing")
    return [root / SKILL_FILE]


class SkillReader(DeltaReader):
    """A skill directory (``skill.json`` + ``skill.safetensors``) as a task-vector checkpoint."""

    kind = "skill"

    def __init__(self, root: str | Path):
        super().__init__(Path(root))
        self.meta = read_meta(self.root)
        self.format = str(self.meta.get("format"))
        if self.format not in PARTS:
            raise SkillgraftError(f"skill {self.root}: unknown format {self.format!r} in {SKILL_JSON}")
        self._files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            for f in _weight_files(self.root):
                h = SafetensorsFile(f)
                self._files.append(h)
                for n in h.entries:
                    self._where[n] = h
            self._kinds: dict[str, str] = {}
            self._check_tensors()
            base = self.meta["base"]
            self.config = base.get("config") if isinstance(base.get("config"), dict) else {}
            self.n_layers = base.get("n_layers") if isinstance(base.get("n_layers"), int) else None
            self.fingerprint = self.meta.get("fingerprint") or {"tensors": {}}
            check_fingerprint(self.fingerprint, f"skill {self.root}")
        except BaseException:
            self.close()
            raise
        head = HEAD if HEAD in self._shapes else None
        self.lm_layout = LMLayout("skill", PLAIN_PREFIX, head, how="skill (plain causal-LM names)")

    def _bad(self, name: str, what: str) -> SkillgraftError:
        return SkillgraftError(f"skill {self.root}: tensor {name}: {what}; the skill is damaged or incomplete, extract it again")

    def _part(self, name: str, part: str | None, shape: tuple[int, ...] | None, dtypes: str) -> tuple[int, ...]:
        key = name if part is None else part_name(name, part)
        if key not in self._where:
            raise self._bad(name, f"{key} is missing from the weight files")
        dtype, got, _, _ = self._where[key].entries[key]
        if dtypes == "float" and not dtype.is_floating_point:
            raise self._bad(name, f"{key} is {dtype}, expected floating point")
        if dtypes == "int" and (dtype.is_floating_point or dtype == torch.bool or dtype == torch.uint8):
            raise self._bad(name, f"{key} is {dtype}, expected a signed integer type")
        if dtypes == "uint8" and dtype != torch.uint8:
            raise self._bad(name, f"{key} is {dtype}, expected uint8")
        if shape is not None and tuple(got) != tuple(shape):
            raise self._bad(name, f"{key} has shape {list(got)}, expected {list(shape)}")
        return tuple(got)

    def _check_tensors(self) -> None:
        listed = set()
        for name, info in self.meta["tensors"].items():
            if not isinstance(info, dict) or not _NAME.match(name):
                raise self._bad(name, "not a plain causal-LM tensor name")
            kind = info.get("kind")
            try:
                shape = tuple(int(x) for x in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(name, "no valid shape in skill.json") from None
            if kind not in PARTS or (kind != "full" and len(shape) != 2):
                raise self._bad(name, f"unknown or impossible kind {kind!r} for shape {list(shape)}")
            parts = PARTS[kind]
            listed |= {name} if not parts else {part_name(name, p) for p in parts}
            if kind == "full":
                self._part(name, None, shape, "float")
            elif kind == "lowrank":
                b = self._part(name, "B", None, "float")
                self._part(name, "B", (shape[0], b[1] if len(b) == 2 else -1), "float")
                self._part(name, "A", (b[1], shape[1]), "float")
            elif kind == "bitdelta":
                self._part(name, "sign", (shape[0], (shape[1] + 7) // 8), "uint8")
                self._part(name, "scale", (shape[0],), "float")
            else:
                self._part(name, "rowptr", (shape[0] + 1,), "int")
                nnz = self._part(name, "col", None, "int")
                if len(nnz) != 1:
                    raise self._bad(name, "col is not a vector")
                self._part(name, "val", nnz, "float")
            self._shapes[name] = shape
            self._kinds[name] = kind
        extra = sorted(set(self._where) - listed)
        if extra:
            raise SkillgraftError(f"skill {self.root}: weight file tensor {extra[0]} is not listed in {SKILL_JSON}; "
                                  f"the skill is damaged, extract it again")
        if not self._shapes:
            raise SkillgraftError(f"skill {self.root}: {SKILL_JSON} lists no tensors")

    def _read(self, key: str, rows: int | None = None) -> torch.Tensor:
        return self._where[key].read(key, rows)

    def _read_float(self, key: str, rows: int | None) -> torch.Tensor:
        """The first ``rows`` rows of a stored tensor as float32, converted block by block (no
        full-size copy in the stored dtype next to the float32 one)."""
        h = self._where[key]
        dtype, shape, begin, _ = h.entries[key]
        n = shape[0] if rows is None or not shape else min(rows, shape[0])
        if dtype == torch.float32 or not shape:
            return h.read(key, rows).float()
        out = torch.empty((n, *shape[1:]), dtype=torch.float32)
        per_row = out[0].numel() if n else 0
        row_bytes = per_row * dtype.itemsize
        for blk in C.row_blocks(n, per_row):
            buf = torch.empty((blk.stop - blk.start) * row_bytes, dtype=torch.uint8)
            view, done, at = memoryview(buf.numpy()), 0, h.data_start + begin + blk.start * row_bytes
            while done < len(view):
                got = os.preadv(h.fd, [view[done:]], at + done)
                if got <= 0:
                    raise SkillgraftError(f"{h.path}: unexpected end of file reading {key}")
                done += got
            out[blk] = buf.view(dtype).reshape(blk.stop - blk.start, *shape[1:])
        return out

    def _rows(self, name: str, rows: int | None) -> torch.Tensor:
        kind = self._kinds[name]
        shape = self._shapes[name]
        if kind == "full":
            return self._read_float(name, rows)
        if kind == "lowrank":
            return C.lowrank_rows(self._read(part_name(name, "B"), rows), self._read(part_name(name, "A")))
        if kind == "bitdelta":
            return C.bitdelta_rows(self._read(part_name(name, "sign"), rows), self._read(part_name(name, "scale"), rows),
                                   shape[1])
        rowptr = self._read(part_name(name, "rowptr")).long()
        n = shape[0] if rows is None else rows
        nnz = self._where[part_name(name, "col")].entries[part_name(name, "col")][1][0]
        end = int(rowptr[n])
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise self._bad(name, "its row pointers are inconsistent")
        col = self._read(part_name(name, "col"), end)
        if end and (int(col.min()) < 0 or int(col.max()) >= shape[1]):
            raise self._bad(name, "a column index is out of range")
        return C.sparse_to_dense(rowptr[: n + 1], col, self._read(part_name(name, "val"), end), shape[1])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._kinds.get(name) != "lowrank":
            return None
        return self._read(part_name(name, "B")).float(), self._read(part_name(name, "A")).float()

    def stored_kind(self, name: str) -> str:
        return self._kinds[name]

    def describe(self) -> dict[str, Any]:
        base = self.meta["base"]
        return {"kind": "skill", "format": self.format, "settings": self.meta.get("settings"),
                "base": base.get("id"), "base_model_type": base.get("model_type"),
                "expert": (self.meta.get("expert") or {}).get("id")}

    def close(self) -> None:
        for h in self._files:
            h.close()
        self._files = []
