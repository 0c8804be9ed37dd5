"""The injection pipeline: recipe -> checkpoints -> plan -> streaming engine -> finished output.

``skillgraft.api`` exposes it to users; the sweep runner and the micro-world demo call it directly,
so that the import direction stays cli -> api -> (pipeline, sweep) -> (engine, mapping, methods, io).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine import MergeSettings, describe_plan, output_specs, plan_budget, run
from .defaults import DEFAULT_SHARD_SIZE
from .errors import SkillgraftError
from .io.outdir import OutputDir, check_output_dir, copy_side_files, local_inputs
from .io.reader import CheckpointReader
from .io.resolve import Resolved, resolve
from .io.writer import ShardedWriter, parse_size
from .mapping.checks import unrelated_weights_check
from .mapping.plan import Plan, build_plan
from .mapping.vocab import check_vocabularies, vocab_file
from .methods import METHODS
from .recipe import Recipe
from .schedule import is_excluded, module_kind, validate_exclude
from .skills.experts import check_lineage, deltas_only, open_experts
from .report import build_report, model_card, vlm_card_metadata, write_json

log = logging.getLogger("skillgraft")


@dataclass
class Prepared:
    """A validated merge, ready to stream: the plan, the method settings, open readers."""

    recipe: Recipe
    plan: Plan
    settings: MergeSettings
    paths: dict[str, Path]
    warnings: list[str] = field(default_factory=list)
    resolved: dict[str, Resolved] = field(default_factory=dict)   # by role label: vlm, base, expert labels
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each expert is (checkpoint, skill, LoRA)


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
        raise SkillgraftError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise SkillgraftError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return device


def validated(recipe: Recipe) -> Recipe:
    """``recipe`` checked again as a whole (a recipe built with ``model_construct`` or edited skips validation)."""
    return Recipe.from_dict(recipe.model_dump(), "recipe")


def shard_bytes(shard_size: str | int) -> int:
    """The maximum shard size in bytes, refused unless a positive whole number."""
    n = parse_size(shard_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SkillgraftError(f"shard size must be positive, got {shard_size!r}")
    return n


_ROLES = {"vlm": "VLM", "base": "base"}


def input_paths(recipe: Recipe, protect: Any = ()) -> list[tuple[str, Path]]:
    """(role, path) of every local input a run must never write over: checkpoints and extra files."""
    refs = [("VLM", recipe.vlm), *(("expert", e.model) for e in recipe.experts)]
    if recipe.base is not None:
        refs.append(("base", recipe.base))
    return local_inputs(refs) + [("recipe file", Path(p)) for p in protect]


def _settings(recipe: Recipe, deltas_only: bool = False) -> tuple[MergeSettings, list[str]]:
    """Method settings from a recipe, checked before any weight is read.

    ``deltas_only``: every expert is a skill or LoRA adapter (a task vector), so inject mode
    needs no base."""
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
    if method.needs_base and recipe.base is None and deltas_only and recipe.mode == "symmetric":
        why = "the LLM the VLM's language model derives from"
        raise SkillgraftError(f"symmetric mode merges the VLM's own task vector, which needs a base model: {why}",
                              cli=f"symmetric mode merges the VLM's own task vector, which needs --base: {why}")
    if method.needs_base and recipe.base is None and not deltas_only:
        why = "the LLM that both the VLM's language model and the expert derive from"
        raise SkillgraftError(f"method {method.name} needs a base model: {why}",
                              cli=f"method {method.name} needs --base: {why}")
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


def prepare(recipe: Recipe, stack: ExitStack, *, allow_unmatched: bool = False,
            ignore_lineage: bool = False) -> Prepared:
    """Resolve checkpoints, open them lazily, build and validate the plan. No weight is read
    (but the few fingerprint rows a skill's lineage check compares).

    An expert may be a checkpoint, a skill directory or a PEFT LoRA adapter (``skillgraft.skills``).
    Checks, besides the plan's structure: the VLM has a config.json, the model types agree (unless
    ``recipe.allow_arch_mismatch``), the tokenizers give the merged vocabulary rows the same tokens
    (unless ``recipe.allow_vocab_mismatch``), and a skill's base fingerprint matches the VLM's
    language model (unless ``ignore_lineage``).
    """
    recipe = validated(recipe)
    resolved = {"vlm": resolve(recipe.vlm, "vlm")}
    labels = [e.label for e in recipe.experts]
    if len(set(labels)) != len(labels):
        raise SkillgraftError(f"two experts share the label {labels[0]!r}; give each a distinct name")
    for e in recipe.experts:
        resolved[e.label] = resolve(e.model, "expert")
    expert_paths = {lbl: resolved[lbl].path for lbl in labels}
    settings, warnings = _settings(recipe, deltas_only=deltas_only(expert_paths))
    if recipe.base is not None:
        resolved["base"] = resolve(recipe.base, "base")
    for role, r in resolved.items():
        log.info("%s: %s", role, r.path if r.repo_id is None else f"{r.repo_id} at {r.commit or r.revision} ({r.path})")
    paths = {k: r.path for k, r in resolved.items()}
    vlm = stack.enter_context(CheckpointReader(paths["vlm"]))
    if not vlm.config:
        raise SkillgraftError(
            f"{paths['vlm']}: no config.json with the model's settings; the VLM must be a transformers checkpoint "
            f"(the merged output needs its config to load)"
        )
    opened = open_experts(expert_paths, paths.get("base"), settings.method, recipe.mode, stack)
    plan = build_plan(
        vlm,
        opened.readers,
        opened.base,
        excluded=_exclusion(recipe.exclude),
        allow_unmatched=allow_unmatched,
        allow_arch_mismatch=recipe.allow_arch_mismatch,
    )
    # a skill or adapter without tokenizer files shares its base's vocabulary (its fingerprint checks that base)
    vocab_dirs = {k: p for k, p in paths.items() if k not in opened.task_vectors or vocab_file(p) is not None}
    warnings += check_vocabularies(plan, vocab_dirs, allow=recipe.allow_vocab_mismatch)
    warnings += opened.notes + check_lineage(opened, plan.vlm, ignore=ignore_lineage)
    settings.n_layers = plan.n_layers
    try:
        for e in plan.entries:  # schedules and layer rules are checked against the real depth
            if e.action == "merge":
                settings.expert_weights(e)
    except ValueError as err:
        raise SkillgraftError(str(err)) from None
    c = plan.counts()
    log.info("plan: %d tensors, %d merged (%d row-sliced), %d copied; %d decoder layers",
             c["total"], c["merged"], c["row_sliced"], c["copied"], plan.n_layers)
    return Prepared(recipe, plan, settings, paths, warnings + plan.warnings, resolved, opened.sources)


def plan_only(recipe: Recipe, *, allow_unmatched: bool = False, out: str | Path | None = None, force: bool = False,
              shard_size: str | int = DEFAULT_SHARD_SIZE, protect: Any = (), ignore_lineage: bool = False) -> Plan:
    """The validated plan for ``recipe`` (what ``--dry-run`` prints), after every check that reads no weight:
    the numbers, the shard size, ``out`` (when given), the checkpoints' headers and index paths, the
    structure of the pair and the tokenizers."""
    recipe = validated(recipe)
    shard_bytes(shard_size)
    if out is not None:
        check_output_dir(out, force, input_paths(recipe, protect))
    with ExitStack() as stack:
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched, ignore_lineage=ignore_lineage)
        if out is not None:
            check_output_dir(out, force, [(_ROLES.get(k, "expert"), p) for k, p in prep.paths.items()])
        prep.plan.warnings = prep.warnings
        return prep.plan


def memory_notes(recipe: Recipe, *, allow_unmatched: bool = False, max_memory: int | None = None,
                 workers: int = 1) -> list[str]:
    """How the merge will use memory (for ``--dry-run``): the budget, block size, matrices held whole
    for an SVD, tensors read more than once, planned for ``workers`` as ``inject`` would run them.
    SkillgraftError if the budget cannot be met. No weight is read."""
    recipe = validated(recipe)
    with ExitStack() as stack:
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched)
        budget = plan_budget(prep.plan, prep.settings, max_memory, workers)
        lines = describe_plan(prep.plan, prep.settings)
    lines.insert(0, f"memory: at most {budget.max_memory / 2**30:.2f} GiB; row blocks of up to "
                    f"{budget.block_entries:,} entries ({workers} merged at once), "
                    f"{budget.ahead / 2**20:.0f} MiB read ahead")
    return lines


def recipe_with_absolute_paths(recipe: Recipe, resolved: dict[str, Resolved] | None = None) -> Recipe:
    """The recipe with local checkpoints as absolute paths, so it reproduces from any directory, and
    hub inputs in ``resolved`` (keyed by reference) pinned to their commit (``org/name@<commit>``)."""
    pins = {r.ref: r.pinned for r in (resolved or {}).values()}

    def fix(ref: str) -> str:
        if ref in pins:
            return pins[ref]
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
    protect: Any = (),
    ignore_lineage: bool = False,
    max_memory: int | None = None,
    workers: int = 1,
) -> InjectResult:
    """Merge the recipe's experts into its VLM and write a complete checkpoint to ``out`` atomically.

    ``max_memory``: peak resident bytes the merge stays under (default: sized to the machine);
    ``workers``: row blocks merged at once (see ``engine.run``).

    Warnings (weights that look unrelated to the base, ignored settings) go to the ``skillgraft``
    logger, or to ``on_warning(message)`` when given; the report lists them too. ``out`` is claimed
    before any work (see ``io.outdir.OutputDir``): it must not be or hold an input (nor the files
    in ``protect``), and ``force`` replaces only a previous skillgraft output.
    """
    out = Path(out)
    recipe = validated(recipe)
    check_device(device)
    max_shard = shard_bytes(shard_size)
    say = on_warning or log.warning
    with ExitStack() as stack:
        target = stack.enter_context(OutputDir(out, force, inputs=input_paths(recipe, protect), log=say))
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched, ignore_lineage=ignore_lineage)
        target.check_inputs([(_ROLES.get(k, "expert"), p) for k, p in prep.paths.items()])
        warnings = prep.warnings + unrelated_weights_check(prep.plan)
        for w in warnings:
            say(w)
        budget = plan_budget(prep.plan, prep.settings, max_memory, workers)  # refused here, before any weight
        start = time.perf_counter()
        with target.stage() as tmp:
            writer = ShardedWriter(tmp, output_specs(prep.plan, recipe.dtype), max_shard)
            stats = run(prep.plan, prep.settings, writer, device=device, progress=progress, budget=budget,
                        workers=workers)
            files = writer.finish()
            side, skipped = copy_side_files(prep.paths["vlm"], tmp)
            for s in skipped:
                warnings.append(f"not copied from the VLM: {s['name']} ({s['reason']})")
                say(warnings[-1])
            _update_config_dtype(tmp, recipe.dtype)
            saved = recipe_with_absolute_paths(recipe, prep.resolved)
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
                    "skipped_files": skipped,
                    "expert_sources": prep.sources,
                },
            )
            card = model_card(saved, report, prep.resolved, vlm_card_metadata(prep.paths["vlm"]))
            (tmp / "README.md").write_text(card)
            write_json(tmp / "skillgraft_report.json", report)
            report = json.loads((tmp / "skillgraft_report.json").read_text())  # as written: strict JSON
    return InjectResult(out, report)
