"""PNG plots of a sweep (matplotlib, Agg backend): scores vs scale with retention and the zone,
scale x density heatmaps, and all methods' target curves on one axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .analysis import Results, Zone, grid_step, slice_of, zone


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fixed_label(fixed: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(fixed.items()))


def scale_plot(res: Results, method: str, path: Path) -> Path | None:
    """Every scenario's score vs scale on the best point's slice, retention, and the zone shaded."""
    z = zone(res, method)
    sk = res.scale_key
    if z is None or len(z.points) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    xs = [float(t.params[sk]) for t in z.points]
    base = res.baseline.scores if res.baseline else {}
    for name in res.scenarios():
        ys = [t.scores.get(name) for t in z.points]
        style = "-" if name in res.objective.target else "--"
        line, = ax.plot(xs, ys, style, marker="o", ms=3, label=name, lw=2 if name in res.objective.target else 1.2)
        if name in base:
            ax.axhline(base[name], color=line.get_color(), lw=0.6, ls=":")
    if res.objective.retain:
        rs = [t.retention for t in z.points]
        ax.plot(xs, rs, color="black", lw=1.2, marker=".", label=f"retention ({res.objective.retain} / VLM)")
        ax.axhline(res.objective.min_retention, color="black", lw=0.8, ls="--")
    if z.low is not None:
        step = grid_step(xs) or 0.05
        lo, hi = (z.low, z.high) if z.high > z.low else (z.low - step / 4, z.high + step / 4)
        ax.axvspan(lo, hi, color="gold", alpha=0.3, label=f"Goldilocks zone [{z.low:g}, {z.high:g}]")
    ax.axvline(float(z.best.params[sk]), color="gray", lw=0.8)
    ax.set_xlabel(sk)
    ax.set_ylabel("score")
    ttl = f"{method}" + (f" ({_fixed_label(z.fixed)})" if z.fixed else "")
    ax.set_title(ttl, fontsize=10)
    ax.set_ylim(-0.02, 1.08)
    ax.legend(fontsize=7, loc="best")
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
    import numpy as np

    plt = _plt()
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
    ax.set_title(f"{method}: target score (x: retention below {res.objective.min_retention:.0%})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def methods_plot(res: Results, path: Path, zones: dict[str, Zone | None] | None = None) -> Path | None:
    """Each method's target score vs scale (on its best slice), infeasible points hollow."""
    sk = res.scale_key
    zones = zones if zones is not None else {m: zone(res, m) for m in res.methods()}
    zs = {m: z for m, z in zones.items() if z is not None and len(z.points) >= 2}
    if not zs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for m, z in zs.items():
        xs = [float(t.params[sk]) for t in z.points]
        line, = ax.plot(xs, [t.target for t in z.points], "-", lw=1.5, label=f"{m}" + (f" ({_fixed_label(z.fixed)})" if z.fixed else ""))
        bad = [(x, t.target) for x, t in zip(xs, z.points) if t.feasible is False]
        if bad:
            ax.plot(*zip(*bad), "o", mfc="none", color=line.get_color(), ms=5)
    if res.baseline:
        tb = sum(res.baseline.scores.get(s, 0.0) for s in res.objective.target) / len(res.objective.target)
        ax.axhline(tb, color="gray", ls=":", lw=1, label="VLM alone")
    ax.set_xlabel(sk)
    ax.set_ylabel(" + ".join(res.objective.target) + " score")
    ax.set_title("target score vs scale (hollow: retention below threshold)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["scale_plot", "heatmap", "methods_plot", "slice_of"]
