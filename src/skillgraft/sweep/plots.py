"""PNG plots of a sweep (matplotlib, Agg backend): scores vs scale with retention and the zone,
scale x density heatmaps, and all methods' target curves on one axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..extras import pyplot
from .analysis import Results, Zone, grid_step, interval, slice_of, zone


def _fixed_label(fixed: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(fixed.items()))


def _yerr(res: Results, names: list[str], ys: list[float | None]) -> list[list[float]] | None:
    """Asymmetric 95% Wilson error bars for ``ys`` (None when the scores carry no item counts)."""
    cis = [interval(res, names, y) for y in ys]
    if any(c is None for c in cis):
        return None
    return [[max(0.0, y - c[0]) for y, c in zip(ys, cis)], [max(0.0, c[1] - y) for y, c in zip(ys, cis)]]


def scale_plot(res: Results, method: str, path: Path) -> Path | None:
    """Every scenario's score vs scale on the best point's slice (95% error bars when the scores are
    accuracies), each scenario's VLM-alone level, retention with its bound, and the zone shaded."""
    z = zone(res, method)
    sk = res.scale_key
    if z is None or len(z.points) < 2:
        return None
    plt = pyplot("sweep plots")
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=110)
    xs = [float(t.params[sk]) for t in z.points]
    base = res.baseline.scores if res.baseline else {}
    for name in res.scenarios():
        ys = [t.scores.get(name) for t in z.points]
        target = name in res.objective.target
        err = _yerr(res, [name], ys) if all(y is not None for y in ys) else None
        bars = ax.errorbar(xs, ys, yerr=err, fmt="-" if target else "--", marker="o", ms=3, capsize=2, elinewidth=0.7,
                           lw=2 if target else 1.2, label=name + (" (target)" if target else ""))
        if name in base:
            ax.axhline(base[name], color=bars.lines[0].get_color(), lw=0.8, ls=":", label=f"{name}, VLM alone")
    if res.objective.retain:
        rs = [t.retention for t in z.points]
        ax.plot(xs, rs, color="black", lw=1.2, marker=".", label=f"retention ({res.objective.retain} / VLM alone)")
        ax.axhline(res.objective.min_retention, color="black", lw=0.8, ls="--",
                   label=f"retention bound ({res.objective.min_retention:.0%})")
    if z.low is not None:
        step = grid_step(xs) or 0.05
        lo, hi = (z.low, z.high) if z.high > z.low else (z.low - step / 4, z.high + step / 4)
        ax.axvspan(lo, hi, color="gold", alpha=0.3, label=f"Goldilocks zone [{z.low:g}, {z.high:g}]")
    ax.axvline(float(z.best.params[sk]), color="gray", lw=0.8, label=f"best point ({sk}={float(z.best.params[sk]):g})")
    ax.set_xlabel(sk)
    ax.set_ylabel("score (fraction correct)" if res.item_counts else "score")
    fixed = f", {_fixed_label(z.fixed)}" if z.fixed else ""
    ax.set_title(f"{method}{fixed}: each scenario's score and retention vs {sk}", fontsize=10)
    ax.set_ylim(-0.02, max(1.08, *(v + 0.05 for v in (t.retention or 0 for t in z.points))))
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap(res: Results, method: str, path: Path) -> Path | None:
    """Target score over scale x density (infeasible cells crossed out, the best point starred)."""
    sk = res.scale_key
    dk = "density" if any(d.name == "density" for d in res.space.dims) else None
    trials = [t for t in res.of(method) if sk in t.params and dk and dk in t.params]
    if not trials or sk is None:
        return None
    best = max(trials, key=lambda t: t.objective if t.objective is not None else -1e9)
    others = {k: v for k, v in best.params.items() if k not in (sk, dk)}
    trials = [t for t in trials if {k: v for k, v in t.params.items() if k not in (sk, dk)} == others]
    xs = sorted({float(t.params[sk]) for t in trials})
    ys = sorted({float(t.params[dk]) for t in trials})
    if len(xs) < 2 or len(ys) < 2:
        return None
    plt = pyplot("sweep plots")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    grid = len(trials) >= 0.6 * len(xs) * len(ys)
    if grid:
        z = np.full((len(ys), len(xs)), np.nan)
        for t in trials:
            z[ys.index(float(t.params[dk])), xs.index(float(t.params[sk]))] = t.target
        im = ax.imshow(z, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(z)))
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], fontsize=7, rotation=90 if len(xs) > 10 else 0)
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys], fontsize=7)
        pos = lambda t: (xs.index(float(t.params[sk])), ys.index(float(t.params[dk])))  # noqa: E731
    else:
        im = ax.scatter([float(t.params[sk]) for t in trials], [float(t.params[dk]) for t in trials],
                        c=[t.target for t in trials], cmap="viridis", s=60, marker="s", vmin=0)
        pos = lambda t: (float(t.params[sk]), float(t.params[dk]))  # noqa: E731
    for t in trials:
        if t.feasible is False:
            x, y = pos(t)
            ax.plot(x, y, "x", color="red", ms=5, mew=1)
    bx, by = pos(best)
    ax.plot(bx, by, "*", color="white", ms=12, mec="black")
    fig.colorbar(im, ax=ax, label="target score")
    ax.set_xlabel(sk)
    ax.set_ylabel(dk)
    ax.set_title(f"{method}: {' + '.join(res.objective.target)} score over {sk} x {dk} "
                 f"(x: retention below {res.objective.min_retention:.0%}; star: best)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_DASHES = ("-", "--", "-.", ":")


def methods_plot(res: Results, path: Path, zones: dict[str, Zone | None] | None = None) -> Path | None:
    """Each method's target score vs scale (on its best slice), with 95% error bars when the scores
    are accuracies; infeasible points hollow. Methods that coincide (TA and DARE at density 1) stay
    visible: each has its own marker and dash, drawn smaller than the one before, slightly offset."""
    sk = res.scale_key
    zones = zones if zones is not None else {m: zone(res, m) for m in res.methods()}
    zs = {m: z for m, z in zones.items() if z is not None and len(z.points) >= 2}
    if not zs:
        return None
    plt = pyplot("sweep plots")
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=110)
    span = max((float(t.params[sk]) for z in zs.values() for t in z.points), default=1.0) - \
        min((float(t.params[sk]) for z in zs.values() for t in z.points), default=0.0)
    offset = 0.004 * (span or 1.0)
    for i, (m, z) in enumerate(zs.items()):
        xs = [float(t.params[sk]) + (i - (len(zs) - 1) / 2) * offset for t in z.points]
        ys = [t.target for t in z.points]
        err = _yerr(res, res.objective.target, ys)
        marker, dash = _MARKERS[i % len(_MARKERS)], _DASHES[i % len(_DASHES)]
        bars = ax.errorbar(xs, ys, yerr=err, fmt=dash, marker=marker, ms=max(3.0, 8.0 - 1.5 * i), mfc="none",
                           lw=1.5, capsize=2, elinewidth=0.7, zorder=3 + i,
                           label=m + (f" ({_fixed_label(z.fixed)})" if z.fixed else ""))
        bad = [(x, t.target) for x, t in zip(xs, z.points) if t.feasible is False]
        if bad:
            ax.plot(*zip(*bad), marker, color=bars.lines[0].get_color(), ms=max(3.0, 8.0 - 1.5 * i), mfc="white",
                    ls="none", zorder=3 + i)
    if res.baseline:
        tb = sum(res.baseline.scores.get(s, 0.0) for s in res.objective.target) / len(res.objective.target)
        ax.axhline(tb, color="gray", ls=":", lw=1, label="VLM alone")
    ax.plot([], [], "o", color="gray", mfc="white", ls="none",
            label=f"retention below {res.objective.min_retention:.0%} (white fill)" if res.objective.retain else "")
    ax.set_xlabel(sk)
    target = " + ".join(res.objective.target)
    ax.set_ylabel(f"{target} score")
    ax.set_title(f"{target} score vs {sk}, one line per merge method", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    keep = [(h, lbl) for h, lbl in zip(handles, labels) if lbl]
    ax.legend(*zip(*keep), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["scale_plot", "heatmap", "methods_plot", "slice_of"]
