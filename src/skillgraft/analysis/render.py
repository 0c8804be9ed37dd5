"""``inspect``'s outputs: a one-screen table, JSON, and a PNG (matplotlib, imported only for the plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import report
from ..extras import pyplot
from .inspect import Inspection
from .stats import PairStats

MAX_ROWS = 24  # deeper models are shown in bands of consecutive layers


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _row(label: str, s: dict[str, Any], has_base: bool) -> str:
    if not has_base:
        return f"{label:>10}  {_f(s['norm_expert'], '10.4g')}  {_f(s['rel_expert'], '8.4f')}"
    return (f"{label:>10}  {_f(s['norm_vlm'], '9.4g')} {_f(s['norm_expert'], '9.4g')} {_f(s['ratio'], '7.3f')} "
            f"{_f(s['cosine'], '7.3f')} {_f(s['sign_conflict'], '8.3f')} {_f(s['rel_vlm'], '8.4f')} "
            f"{_f(s['rel_expert'], '8.4f')}")


def _bands(rows: list[tuple[int, PairStats]]) -> list[tuple[str, PairStats]]:
    if len(rows) <= MAX_ROWS:
        return [(str(i), s) for i, s in rows]
    size = -(-len(rows) // MAX_ROWS)
    out = []
    for j in range(0, len(rows), size):
        part = rows[j : j + size]
        tot = PairStats()
        for _, s in part:
            tot += s
        out.append((f"{part[0][0]}-{part[-1][0]}", tot))
    return out


def table(ins: Inspection) -> str:
    """Per layer, per module kind, overall; then effective ranks, lineage and the tokenizer verdict."""
    b = ins.has_base
    head = (f"{'layer':>10}  {'|tau_V|':>9} {'|tau_E|':>9} {'ratio':>7} {'cosine':>7} {'conflict':>8} "
            f"{'rel_V':>8} {'rel_E':>8}") if b else f"{'layer':>10}  {'|E-V|':>10}  {'rel':>8}"
    lines = [f"inspect: {ins.expert} into {ins.vlm}" + (f" (base {ins.base})" if b else " (no base: expert minus VLM)"),
             head, "-" * len(head)]
    lines += [_row(label, s.summary(), b) for label, s in _bands(ins.per_layer())]
    lines.append("-" * len(head))
    lines += [_row(kind, s.summary(), b) for kind, s in ins.per_kind()]
    lines.append(_row("all", ins.total().summary(), b))
    lines.append("")
    if b:
        m = ins.norm_matched_scale()
        lines.append(f"conflict: sign disagreement where both deltas are >= {ins.threshold:g} x their RMS; "
                     f"norm-matched scale |tau_V|/|tau_E| = {_f(m, '.3f')}")
    if ins.ranks:
        rs = [r["ratio"] for r in ins.ranks]
        lines.append(f"effective rank of the expert delta (entropy-based, {len(rs)} sampled matrices): "
                     f"{min(rs):.2f}-{max(rs):.2f} of full rank (mean {sum(rs) / len(rs):.2f})")
    lin = ins.lineage
    if b:
        lines.append(f"lineage: VLM {lin['vlm']['verdict']} (rel {_f(lin['vlm']['rel_delta_norm'], '.4f')}); "
                     f"expert {lin['expert']['verdict']} (rel {_f(lin['expert']['rel_delta_norm'], '.4f')})")
    else:
        lines.append(f"lineage: expert differs from the VLM's language model by "
                     f"{_f(lin['expert_vs_vlm']['rel_distance'], '.4f')} of its norm (give --base for task vectors)")
    c = lin["counts"]
    lines.append(f"plan: {c['merged']} tensors merged ({c['row_sliced']} row-sliced), {c['copied']} copied, "
                 f"{ins.n_layers} decoder layers")
    lines.append(f"tokenizer: {ins.tokenizer['verdict']}")
    lines += [f"warning: {w}" for w in ins.warnings]
    return "\n".join(lines)


def write_json(ins: Inspection, path: str | Path) -> Path:
    p = Path(path)
    report.write_json(p, ins.to_dict())
    return p


def plot(ins: Inspection, path: str | Path) -> Path:
    """Per-layer curves: delta norms, their ratio, cosine and sign conflicts (or the distance, no base)."""
    plt = pyplot("inspect plots")
    layers = ins.per_layer()
    xs = [i for i, _ in layers]
    rows = [s.summary() for _, s in layers]
    panels = ([("delta norm", ("norm_vlm", "norm_expert")), ("|tau_E| / |tau_V|", ("ratio",)),
               ("cosine(tau_V, tau_E)", ("cosine",)), ("sign conflict rate", ("sign_conflict",))]
              if ins.has_base else [("|theta_E - theta_V| / |theta_V|", ("rel_expert",))])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), dpi=100, squeeze=False)
    names = {"norm_vlm": "VLM", "norm_expert": "expert"}
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(xs, [r[k] if r[k] is not None else float("nan") for r in rows], marker="o", ms=3,
                    label=names.get(k))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decoder layer", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p
