"""``SWEEP/report.md`` and its PNG plots, written from the store alone (``skillgraft report SWEEP``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..version import __version__
from .analysis import (
    Results,
    best_trial,
    eval_argv,
    grid_step,
    inject_argv,
    load_results,
    recommended_recipe,
    shell,
    zone,
)
from .space import describe

REPORT = "report.md"
RECIPE = "recommended_recipe.yaml"


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def overhead(res: Results) -> dict[str, float]:
    """Seconds spent evaluating vs everything else, over the computed trials."""
    ev = sum(t.timings.get("eval_s", 0.0) for t in res.trials)
    tot = sum(t.timings.get("total_s", 0.0) for t in res.trials)
    return {"eval_s": ev, "total_s": tot, "ratio": (tot / ev) if ev > 0 else float("nan")}


def method_table(res: Results) -> list[dict[str, Any]]:
    """Per method: its best point, target and retention there, and its Goldilocks zone."""
    rows = []
    sk = res.scale_key
    for m in res.methods():
        b = best_trial(res.of(m))
        if b is None:
            continue
        z = zone(res, m)
        rows.append({
            "method": m,
            "trials": len(res.of(m)),
            "best": b,
            "setting": {k: v for k, v in b.params.items() if k != "method"},
            "target": b.target,
            "retention": b.retention,
            "feasible": b.feasible,
            "zone": (z.low, z.high) if z is not None and z.low is not None else None,
            "width": z.width if z is not None else None,
            "step": grid_step([float(t.params[sk]) for t in z.points]) if z is not None and sk else None,
        })
    return rows


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``report.md``, the plots and ``recommended_recipe.yaml`` into ``sweep_dir``."""
    from . import plots

    d = Path(sweep_dir)
    res = load_results(d)
    written: list[tuple[str, Path]] = []
    for m in res.methods():
        p = plots.scale_plot(res, m, d / f"scale_{m}.png")
        if p:
            written.append((f"{m}: scores vs scale", p))
        h = plots.heatmap(res, m, d / f"heatmap_{m}.png")
        if h:
            written.append((f"{m}: scale x density", h))
    if len(res.methods()) > 1:
        p = plots.methods_plot(res, d / "scale_methods.png")
        if p:
            written.append(("all methods: target vs scale", p))
    text = render(res, written)
    (d / REPORT).write_text(text)
    return d / REPORT


def render(res: Results, plots_written: list[tuple[str, Path]]) -> str:
    r = res.recipe
    lines = [f"# Sweep report: {Path(r.vlm).name} + {', '.join(e.label for e in r.experts)}", ""]
    lines += [
        f"- VLM: `{r.vlm}`",
        *[f"- expert `{e.label}`: `{e.model}`" for e in r.experts],
        f"- base: `{r.base}`",
        f"- evaluator: `{_eval_desc(res.evaluator)}`",
        f"- objective: {res.objective.describe()}",
        f"- search: {res.search.get('name')} ({len(res.trials)} scored points"
        + (f", {len(res.failed)} failed" if res.failed else "") + f"), methods: {', '.join(res.space.methods)}; "
        + "; ".join(_dim_desc(x) for x in res.space.dims),
        f"- skillgraft {__version__}, report written {time.strftime('%Y-%m-%d %H:%M', time.localtime())}",
        "",
    ]
    if res.baseline:
        lines += ["## The VLM alone", "", _table(["scenario", "score"], [[k, _f(v)] for k, v in res.baseline.scores.items()]), ""]
    best = best_trial(res.trials)
    lines += ["## Recommended configuration", ""]
    if best is None:
        lines += ["No point has been scored yet.", ""]
    else:
        rec = recommended_recipe(res, best)
        rec.save(res.dir / RECIPE)
        if not best.feasible:
            lines += [f"**No point keeps retention at {res.objective.min_retention:.0%}**; the least damaging is shown.", ""]
        lines += [
            f"`{describe(best.params)}`: target {_f(best.target)}"
            + (f", retention {_f(best.retention)}" if best.retention is not None else "")
            + " (" + ", ".join(f"{k} {_f(v)}" for k, v in best.scores.items()) + ")",
            "",
            "```bash",
            shell(inject_argv(rec, "OUT", str(res.dir / RECIPE))),
        ]
        ev = eval_argv(res.evaluator, "OUT")
        if ev:
            lines.append(shell(ev) + "   # reproduces the scores above")
        lines += ["```", "", f"The same merge as a recipe: `{RECIPE}`.", ""]
    rows = method_table(res)
    if rows:
        lines += ["## Methods and their Goldilocks zones", "",
                  f"Zone: the scale interval around each method's best point where the target score stays within "
                  f"90% of its best and retention at or above {res.objective.min_retention:.0%} "
                  f"(other settings as at the best point; width 0 = one grid point).", ""]
        lines.append(_table(
            ["method", "points", "best setting", "target", "retention", "zone", "width"],
            [[x["method"], str(x["trials"]), _setting(x["setting"]), _f(x["target"]), _f(x["retention"]),
              f"[{x['zone'][0]:g}, {x['zone'][1]:g}]" if x["zone"] else "none", _f(x["width"], 2) if x["zone"] else "–"]
             for x in rows],
        ))
        lines.append("")
    if plots_written:
        lines += ["## Plots", ""]
        for title, p in plots_written:
            lines += [f"### {title}", "", f"![{title}]({p.name})", ""]
    oh = overhead(res)
    if res.trials:
        lines += ["## Cost", "",
                  f"{len(res.trials)} points: {oh['total_s']:.1f} s in all, of which {oh['eval_s']:.1f} s evaluating "
                  f"(overhead ratio {oh['ratio']:.2f}x: merge/apply/restore included, model loading excluded).", ""]
    lines += ["## All points", ""]
    sc = res.scenarios()
    trs = sorted(res.trials, key=lambda t: -(t.objective if t.objective is not None else -1e9))
    lines.append(_table(
        ["#", "point", *sc, "target (mean)", "retention", "ok", "seconds"],
        [[str(t.id), describe(t.params), *[_f(t.scores.get(s)) for s in sc], _f(t.target), _f(t.retention),
          "yes" if t.feasible else "no", _f(t.timings.get("total_s"), 1)] for t in trs],
    ))
    if res.failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- `{describe(t.params)}`: {t.error}" for t in res.failed]
    return "\n".join(lines) + "\n"


def _setting(s: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(s.items())) or "–"


def _dim_desc(d: Any) -> str:
    if d.values is not None:
        return f"{d.name} in {{{', '.join(str(v) for v in d.values)}}}"
    return f"{d.name} in [{d.low:g}, {d.high:g}]" + (f" step {d.step:g}" if d.step else "")


def _eval_desc(spec: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items() if v is not None)


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def summary_lines(res: Results) -> list[str]:
    """The best point and the command that reproduces it (for the terminal)."""
    best = best_trial(res.trials)
    if best is None:
        return ["no point scored yet"]
    rec = recommended_recipe(res, best)
    out = [f"best: {describe(best.params)}  target {_f(best.target)}"
           + (f"  retention {_f(best.retention)}" if best.retention is not None else "")
           + ("" if best.feasible else "  (no point meets the retention threshold)")]
    out.append("  " + shell(inject_argv(rec, "OUT", str(res.dir / RECIPE))))
    return out
