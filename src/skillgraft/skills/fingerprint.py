"""A small fingerprint of a skill's base, to check lineage against a VLM without the base.

A few fixed rows (and a fixed subset of columns) of the base's embedding and of one matrix in
the first, middle and last decoder layers are stored in ``skill.json``. Before a skill is
merged, the same entries of the VLM's language model are read and the relative distance
``||V - B|| / ||B||`` is taken per tensor; the median over tensors is the skill's lineage
distance. Fine-tunes (and the LM of a VLM built on that base) stay well below 0.5; models that
do not share the base are near sqrt(2).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..errors import SkillgraftError
from ..mapping.checks import UNRELATED_DELTA
from ..mapping.layout import EMBED, layer_count

ROWS = 4  # rows per tensor
COLS = 16  # columns per row
ROW_WINDOW = 1024  # rows are taken among the first ROW_WINDOW (a reader reads leading rows)
LINEAGE_LIMIT = UNRELATED_DELTA  # median relative distance above which the bases differ
_PREFERRED = ("self_attn.q_proj.weight",)


def pick_tensors(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """LM-relative names fingerprinted: the embedding and one matrix of the first, middle, last layer."""
    picks = [EMBED] if EMBED in shapes else []
    n = layer_count(shapes)
    for i in sorted({0, n // 2, n - 1} if n else set()):
        prefix = f"layers.{i}."
        mats = sorted(r for r, s in shapes.items() if r.startswith(prefix) and len(s) == 2)
        preferred = [prefix + p for p in _PREFERRED if prefix + p in shapes]
        if preferred or mats:
            picks.append((preferred or mats)[0])
    return picks


def fixed_rows(n_rows: int) -> list[int]:
    window = min(n_rows, ROW_WINDOW)
    return sorted({round(i * (window - 1) / (ROWS - 1)) for i in range(ROWS)}) if window > 1 else [0]


def fixed_cols(n_cols: int) -> list[int]:
    if n_cols <= COLS:
        return list(range(n_cols))
    return sorted({round(i * (n_cols - 1) / (COLS - 1)) for i in range(COLS)})


def _sample(t: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    return t[rows][:, cols].float()


def make_fingerprint(shapes: dict[str, tuple[int, ...]], read_rows: Callable[[str, int], torch.Tensor],
                     plain: Callable[[str], str]) -> dict[str, Any]:
    """The fingerprint of a base: ``read_rows(rel, n)`` gives the first ``n`` rows of its tensor ``rel``."""
    out: dict[str, Any] = {}
    for rel in pick_tensors(shapes):
        shape = shapes[rel]
        rows, cols = fixed_rows(shape[0]), fixed_cols(shape[1])
        values = _sample(read_rows(rel, rows[-1] + 1), rows, cols)
        out[plain(rel)] = {"rows": rows, "cols": cols,
                           "values": [[float(f"{x:.7g}") for x in row] for row in values.tolist()]}
    return {"tensors": out, "limit": LINEAGE_LIMIT}


def lineage_distance(fingerprint: dict[str, Any], lookup: Callable[[str], tuple[tuple[int, ...], Callable[[int], torch.Tensor]] | None],
                     ) -> tuple[float | None, dict[str, float]]:
    """(median relative distance, per tensor) between a fingerprint and another model's LM.

    ``lookup(plain_name)`` gives ``(shape, read_rows)`` of the model's tensor, or None if it has none.
    Tensors the model lacks, or whose rows or columns do not reach the fingerprint's, are skipped;
    None when nothing could be compared.
    """
    per: dict[str, float] = {}
    for name, fp in fingerprint.get("tensors", {}).items():
        found = lookup(name)
        if found is None:
            continue
        shape, read_rows = found
        rows, cols = fp["rows"], fp["cols"]
        if len(shape) != 2 or shape[0] <= rows[-1] or shape[1] <= cols[-1]:
            continue
        theirs = _sample(read_rows(rows[-1] + 1), rows, cols)
        ref = torch.tensor(fp["values"], dtype=torch.float32)
        denom = float(torch.linalg.vector_norm(ref))
        if denom > 0 and math.isfinite(denom):
            per[name] = float(torch.linalg.vector_norm(theirs - ref)) / denom
    return (statistics.median(per.values()) if per else None), per


_NAME = re.compile(r"^[\w.\-]+$")


def check_fingerprint(fp: Any, where: str) -> None:
    """Refuse a malformed fingerprint with a one-line message (``where`` names the skill)."""
    ok = isinstance(fp, dict) and isinstance(fp.get("tensors", {}), dict)
    if ok:
        for name, t in fp["tensors"].items():
            try:
                rows, cols, vals = t["rows"], t["cols"], t["values"]
                ok = (bool(_NAME.match(name)) and len(vals) == len(rows) and all(len(v) == len(cols) for v in vals)
                      and all(isinstance(i, int) and i >= 0 for i in rows + cols)
                      and all(math.isfinite(x) for v in vals for x in v) and rows == sorted(rows) and cols == sorted(cols))
            except (KeyError, TypeError):
                ok = False
            if not ok:
                break
    if not ok:
        raise SkillgraftError(f"{where}: the base fingerprint in skill.json is malformed; extract the skill again")
