"""``SWEEP/report.md`` and its PNG plots, written from the store alone (``skillgraft report SWEEP``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..version import __version__
from . import plots
from .analysis import (
    Results,
    baseline_target,
    best_trial,
    eval_argv,
    grid_step,
    inject_argv,
    interval,
    is_noop,
    load_results,
    recommendation,
    recommended_recipe,
    shell,
    zone,
)
from .space import describe

REPORT = "report.md"
RECIPE = "recommended_recipe.yaml"


def _ci(ci: tuple[float, float] | None, nd: int = 3) -> str:
    return f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]" if ci is not None else "–"


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
    has_ci = bool(res.item_counts)
    if res.baseline:
        lines += ["## The VLM alone", ""]
        head = ["scenario", "score"] + (["95% interval", "items"] if has_ci else [])
        body = [[k, _f(v)] + ([_ci(interval(res, [k], v)), str((res.item_counts or {}).get(k, "–"))] if has_ci else [])
                for k, v in res.baseline.scores.items()]
        lines += [_table(head, body), ""]
        if has_ci:
            lines += ["Intervals are 95% Wilson score intervals over the items behind each score: two scores "
                      "whose intervals overlap may differ by chance alone.", ""]
    lines += ["## Recommended configuration", ""]
    lines += _recommendation(res)
    rows = method_table(res)
    if rows:
        lines += ["## Methods and their Goldilocks zones", "",
                  f"Zone: the scale interval around each method's best point where the target score stays within "
                  f"90% of its best and retention at or above {res.objective.min_retention:.0%} "
                  f"(other settings as at the best point; width 0 = one grid point).", ""]
        tnames = res.objective.target
        lines.append(_table(
            ["method", "points", "best setting", "target", *(["95% interval"] if has_ci else []), "retention",
             "zone", "width"],
            [[x["method"], str(x["trials"]), _setting(x["setting"]), _f(x["target"]),
              *([_ci(interval(res, tnames, x["target"]))] if has_ci else []), _f(x["retention"]),
              f"[{x['zone'][0]:g}, {x['zone'][1]:g}]" if x["zone"] else "none (does not beat the VLM)",
              _f(x["width"], 2) if x["zone"] else "–"]
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
        ["#", "point", *sc, "target (mean)", *(["95% interval"] if has_ci else []), "retention", "ok", "seconds"],
        [[str(t.id), describe(t.params), *[_f(t.scores.get(s)) for s in sc], _f(t.target),
          *([_ci(interval(res, res.objective.target, t.target))] if has_ci else []), _f(t.retention),
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


def _recommendation(res: Results) -> list[str]:
    """The recommended point and its command, or a plain statement that there is none and what to try."""
    rec = recommendation(res)
    if rec is None:
        (res.dir / RECIPE).unlink(missing_ok=True)  # a stale recommendation from an earlier report
        if not res.trials:
            return ["No point has been scored yet.", ""]
        return [*_nothing_beats(res), ""]
    recipe = recommended_recipe(res, rec)
    recipe.save(res.dir / RECIPE)
    ci = interval(res, res.objective.target, rec.target)
    out = [
        f"`{describe(rec.params)}`: target {_f(rec.target)}" + (f" {_ci(ci)}" if ci else "")
        + f" against {_f(baseline_target(res))} for the VLM alone"
        + (f", retention {_f(rec.retention)}" if rec.retention is not None else "")
        + " (" + ", ".join(f"{k} {_f(v)}" for k, v in rec.scores.items()) + ")",
        "",
        "```bash",
        shell(inject_argv(recipe, "OUT", str(res.dir / RECIPE))),
    ]
    ev = eval_argv(res.evaluator, "OUT")
    if ev:
        out.append(shell(ev) + "   # reproduces the scores above")
    return out + ["```", "", f"The same merge as a recipe: `{RECIPE}`.", ""]


def _nothing_beats(res: Results) -> list[str]:
    o = res.objective
    target = " + ".join(o.target)
    bound = f" while keeping {o.retain} at or above {o.min_retention:.0%} of the VLM's" if o.retain else ""
    lines = [f"**Nothing to recommend: no merge beat the VLM alone on {target}{bound}.** "
             f"Injecting this expert with these settings does not pay; the VLM alone scores {_f(baseline_target(res))}."]
    merges = [t for t in res.trials if t.target is not None and not is_noop(res, t)]
    closest = best_trial(merges)
    if closest is not None:
        lines.append(f"The closest merge was `{describe(closest.params)}`: target {_f(closest.target)}"
                     + (f", retention {_f(closest.retention)}" if closest.retention is not None else "") + ".")
    lines += [
        "",
        "What to try:",
        "- smaller scales: a finer grid between 0 and the first scale that breaks retention "
        "(e.g. `--vary scale=0:0.5:0.05`);",
        "- a sparsifying method at lower density (`--method dare,ties,dare_ties --vary density=0.1,0.3,0.5`);",
        "- keeping parts of the VLM: `--exclude embed,lm_head`, or a per-layer schedule that spares the first "
        "and last layers (`--scale 0,1,1,0`);",
        "- a looser bound (`--min-retention 0.9`) if the VLM may lose more of its own skill;",
        "- checking that the expert and the VLM derive from the same base LLM (`--base`).",
    ]
    return lines


def summary_lines(res: Results) -> list[str]:
    """The recommended point and the command that reproduces it (for the terminal)."""
    if not res.trials:
        return ["no point scored yet"]
    rec = recommendation(res)
    if rec is None:
        return [f"nothing to recommend: no merge beat the VLM alone on {' + '.join(res.objective.target)}"
                + (f" within the {res.objective.min_retention:.0%} retention bound" if res.objective.retain else "")
                + f" (see {res.dir / REPORT} for what to try)"]
    recipe = recommended_recipe(res, rec)
    out = [f"best: {describe(rec.params)}  target {_f(rec.target)}"
           + (f"  retention {_f(rec.retention)}" if rec.retention is not None else "")]
    out.append("  " + shell(inject_argv(recipe, "OUT", str(res.dir / RECIPE))))
    return out
