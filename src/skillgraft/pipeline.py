"""The injection pipeline: recipe -> checkpoints -> plan -> streaming engine -> finished output.

``skillgraft.api`` exposes it to users; the sweep runner and the micro-world demo call it directly,
so that the import direction stays cli -> api -> (pipeline, sweep) -> (engine, mapping, methods, io).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine import MergeSettings, describe_plan, output_specs, plan_budget, run, unrelated_weights_check
from .defaults import DEFAULT_SHARD_SIZE
from .errors import SkillgraftError
from .io.outdir import atomic_output_dir, check_output_dir, copy_side_files
from .io.reader import CheckpointReader
from .io.resolve import resolve_checkpoint
from .io.writer import ShardedWriter, parse_size
from .mapping.plan import Plan, build_plan
from .methods import METHODS
from .recipe import Recipe
from .schedule import is_excluded, module_kind, validate_exclude
from .sources import holds_deltas
from .report import build_report, model_card, write_json


@dataclass
class Prepared:
    """A validated merge, ready to stream: the plan, the method settings, open readers."""

    recipe: Recipe
    plan: Plan
    settings: MergeSettings
    paths: dict[str, Path]
    warnings: list[str] = field(default_factory=list)


@dataclass
class InjectResult:
    out_dir: Path
    report: dict[str, Any]


def check_device(device: str) -> str:
    """``device`` if usable here, else a one-line error."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SkillgraftError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SkillgraftError("--device cuda requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise SkillgraftError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return device


def _settings(recipe: Recipe) -> tuple[MergeSettings, list[str]]:
    """Method settings from a recipe, checked before any checkpoint is opened."""
    method = METHODS[recipe.method]
    warnings = []
    densities = [e.density for e in recipe.experts]
    counted = densities if method.kind == "delta" and recipe.mode == "inject" else [recipe.vlm_density, *densities]
    try:
        params = method.resolve_params(recipe.parameters)
        method.check(counted, params)
        validate_exclude(recipe.exclude)
    except ValueError as e:
        raise SkillgraftError(str(e)) from None
    if not method.uses_density and any(min(d) < 1 if isinstance(d, list) else d < 1 for d in densities):
        warnings.append(f"method {method.name} ignores density; use dare, ties or dare_ties to sparsify")
    settings = MergeSettings(
        method=method,
        params=params,
        mode=recipe.mode,
        scales=[e.scale for e in recipe.experts],
        densities=densities,
        vlm_weight=recipe.vlm_weight,
        vlm_density=recipe.vlm_density,
        seed=recipe.seed,
        dtype=recipe.dtype,
        schedule=recipe.schedule,
    )
    return settings, warnings


def _exclusion(exclude: list[str]):
    """The plan's filter: a reason string for LM-relative names kept from the VLM, else None."""
    if not exclude:
        return lambda rel: None
    return lambda rel: f"excluded ({module_kind(rel)}) by exclude filter" if is_excluded(rel, exclude) else None


def prepare(recipe: Recipe, stack: ExitStack, *, allow_unmatched: bool = False) -> Prepared:
    """Resolve checkpoints, open them lazily, build and validate the plan. No weight is read."""
    settings, warnings = _settings(recipe)
    paths = {"vlm": resolve_checkpoint(recipe.vlm, "vlm")}
    labels = [e.label for e in recipe.experts]
    if len(set(labels)) != len(labels):
        raise SkillgraftError(f"two experts share the label {labels[0]!r}; give each a distinct name")
    for e in recipe.experts:
        paths[e.label] = resolve_checkpoint(e.model, "expert")
    use_base = settings.method.needs_base and recipe.base is not None
    if use_base:
        paths["base"] = resolve_checkpoint(recipe.base, "base")
    readers = {k: stack.enter_context(CheckpointReader(p)) for k, p in paths.items()}
    deltas_only = recipe.mode == "inject" and all(holds_deltas(readers[lbl]) for lbl in labels)
    if settings.method.needs_base and recipe.base is None and not deltas_only:
        raise SkillgraftError(
            f"method {settings.method.name} needs --base: the LLM that both the VLM's language model and the expert "
            "derive from"
        )
    plan = build_plan(
        readers["vlm"],
        [(lbl, readers[lbl]) for lbl in labels],
        readers["base"] if use_base else None,
        excluded=_exclusion(recipe.exclude),
        allow_unmatched=allow_unmatched,
    )
    settings.n_layers = plan.n_layers
    try:
        for e in plan.entries:  # schedules, per-layer values and layer rules, checked against the real depth
            if e.action == "merge":
                settings.tensor_args(e)
    except ValueError as err:
        raise SkillgraftError(str(err)) from None
    return Prepared(recipe, plan, settings, paths, warnings + plan.warnings)


def plan_only(recipe: Recipe, *, allow_unmatched: bool = False) -> Plan:
    """The validated plan for ``recipe`` (what ``--dry-run`` prints)."""
    with ExitStack() as stack:
        return prepare(recipe, stack, allow_unmatched=allow_unmatched).plan


def memory_notes(recipe: Recipe, *, allow_unmatched: bool = False, max_memory: int | None = None) -> list[str]:
    """How the merge will use memory (for ``--dry-run``): the budget, block size, matrices held whole
    for an SVD, tensors read more than once. SkillgraftError if the budget cannot be met. No weight is read."""
    with ExitStack() as stack:
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched)
        budget = plan_budget(prep.plan, prep.settings, max_memory)
        lines = describe_plan(prep.plan, prep.settings)
    lines.insert(0, f"memory: at most {budget.max_memory / 2**30:.2f} GiB; row blocks of up to "
                    f"{budget.block_entries:,} entries, {budget.ahead / 2**20:.0f} MiB read ahead")
    return lines


def recipe_with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with local checkpoints as absolute paths, so it reproduces from any directory."""
    def fix(ref: str) -> str:
        p = Path(ref).expanduser()
        return str(p.resolve()) if p.is_dir() else ref

    data = recipe.model_dump()
    data["vlm"] = fix(recipe.vlm)
    if recipe.base is not None:
        data["base"] = fix(recipe.base)
    for e in data["experts"]:
        e["model"] = fix(e["model"])
    return Recipe.model_validate(data)


def _update_config_dtype(out_dir: Path, dtype: str) -> None:
    path = out_dir / "config.json"
    if dtype == "auto" or not path.is_file():
        return
    config = json.loads(path.read_text())
    for node in [config, *(v for v in config.values() if isinstance(v, dict))]:
        for key in ("torch_dtype", "dtype"):
            if key in node:
                node[key] = dtype
    config.setdefault("dtype", dtype)
    path.write_text(json.dumps(config, indent=2))


def inject(
    recipe: Recipe,
    out: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    allow_unmatched: bool = False,
    on_warning: Any = None,
    max_memory: int | None = None,
    workers: int = 1,
) -> InjectResult:
    """Merge the recipe's experts into its VLM and write a complete checkpoint to ``out`` atomically.

    ``max_memory``: peak resident bytes the merge stays under (default: sized to the machine);
    ``workers``: row blocks merged at once (see ``engine.run``).
    """
    out = Path(out)
    check_device(device)
    max_shard = parse_size(shard_size)
    check_output_dir(out, force)
    with ExitStack() as stack:
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched)
        warnings = prep.warnings + unrelated_weights_check(prep.plan)
        for w in warnings:
            if on_warning is not None:
                on_warning(w)
        start = time.perf_counter()
        with atomic_output_dir(out, force) as tmp:
            writer = ShardedWriter(tmp, output_specs(prep.plan, recipe.dtype), max_shard)
            stats = run(prep.plan, prep.settings, writer, device=device, progress=progress, max_memory=max_memory,
                        workers=workers)
            files = writer.finish()
            side = copy_side_files(prep.paths["vlm"], tmp)
            _update_config_dtype(tmp, recipe.dtype)
            saved = recipe_with_absolute_paths(recipe)
            saved.save(tmp / "skillgraft_recipe.yaml")
            prep.plan.warnings = warnings
            report = build_report(
                saved,
                prep.plan,
                stats.tensors,
                {
                    "device": device,
                    "dtype": recipe.dtype,
                    "seconds": round(time.perf_counter() - start, 3),
                    "bytes_written": stats.bytes_written,
                    "weight_files": files,
                    "copied_files": side,
                },
            )
            (tmp / "README.md").write_text(model_card(saved, report))
            write_json(tmp / "skillgraft_report.json", report)
    return InjectResult(out, report)
