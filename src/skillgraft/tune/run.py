"""``tune``: choose the merge scale from unlabelled prompts, then write the injected checkpoint.

1. The expert answers the text prompts greedily (its answers are the uptake targets), then is freed.
2. The VLM answers the image prompts greedily (the retention targets) and is kept loaded.
3. Candidates are applied in place to that one model (``sweep.inplace.InPlaceModel``: the engine's own
   per-tensor merge, restored bit for bit after each), each scored by two teacher-forced passes.
4. The pick is merged by ``pipeline.inject`` exactly as ``skillgraft inject`` would, into the output
   directory, with ``skillgraft_tune.json`` and ``skillgraft_tune.md`` beside it, all atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..defaults import DEFAULT_SHARD_SIZE
from ..errors import SkillgraftError
from ..evaluate import load_model
from ..evaluate.base import load_processor
from ..io.outdir import OutputDir
from ..mapping.checks import unrelated_weights_check
from ..pipeline import check_device, inject, input_paths, prepare
from ..recipe import Recipe
from ..skills.detect import expert_kind
from ..sweep.inplace import InPlaceModel
from .objective import DEFAULT_CONFIDENCE, DEFAULT_MIN_RETENTION, Candidate, Reference, best, candidate, lower_bound, z_of
from .prompts import read_image_prompts, read_text_prompts, render, tokenizer_of
from .report import write_outputs
from .search import global_search, group_search
from .signals import score, teacher_answers

log = logging.getLogger("skillgraft")
_NOT_A_MODEL = ("tune needs the expert as a model that answers the text prompts; a skill or LoRA adapter is a "
                "task vector only: give the expert checkpoint")

DEFAULT_BUDGET = 12
DEFAULT_RANGE = (0.0, 2.0)
DEFAULT_GROUPS = 3


@dataclass
class TuneSettings:
    """How ``tune`` searches; everything but the models and the probes."""

    scale_range: tuple[float, float] = DEFAULT_RANGE
    budget: int = DEFAULT_BUDGET
    per_layer: bool = False
    groups: int = DEFAULT_GROUPS
    min_retention: float = DEFAULT_MIN_RETENTION
    confidence: float = DEFAULT_CONFIDENCE  # one-sided level of the retention bound (0.5: the estimate)
    max_new_tokens: int = 16
    batch_size: int = 32
    max_prompts: int | None = None
    raw_prompts: bool = False

    def check(self) -> None:
        lo, hi = self.scale_range
        if not (0 <= lo < hi) or not all(map(_finite, (lo, hi))):
            raise SkillgraftError(f"scale range {lo}:{hi} must be finite with 0 <= low < high")
        if self.budget < 1:
            raise SkillgraftError("the budget must allow at least one candidate")
        if self.groups < 2 and self.per_layer:
            raise SkillgraftError("per-layer tuning needs at least 2 layer groups")
        if not 0 < self.min_retention <= 1:
            raise SkillgraftError("the minimum retention must be in (0, 1]")
        if not 0.5 <= self.confidence < 1:
            raise SkillgraftError("the confidence of the retention bound must be in [0.5, 1)")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise SkillgraftError("the answer length and the batch size must be at least 1")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@dataclass
class TuneResult:
    out_dir: Path
    chosen: Candidate
    scale: float | list[float]
    candidates: list[Candidate]
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def layer_groups(n_layers: int, groups: int) -> list[list[int]]:
    """``groups`` runs of consecutive decoder layers, as equal as the depth allows."""
    g = max(1, min(groups, n_layers))
    return [list(range(i * n_layers // g, (i + 1) * n_layers // g)) for i in range(g)]


def schedule_of(scales: tuple[float, ...], groups: list[list[int]], n_layers: int) -> float | list[float]:
    """A recipe scale: one number, or one value per decoder layer (the embedding follows the first
    group, the final norm and LM head the last, as ``schedule.value_at`` places them)."""
    if len(scales) == 1:
        return float(scales[0])
    per = [0.0] * n_layers
    for s, layers in zip(scales, groups):
        for i in layers:
            per[i] = float(s)
    return per


def _check_tokenizers(vlm_proc: Any, expert_proc: Any, texts: list[str]) -> None:
    """The expert must read the text prompts as the same token ids the VLM does."""
    a, b = tokenizer_of(vlm_proc), tokenizer_of(expert_proc)
    if b is None:
        return
    for t in texts:
        if a(t, add_special_tokens=False)["input_ids"] != b(t, add_special_tokens=False)["input_ids"]:
            raise SkillgraftError("the expert's tokenizer splits the text prompts differently from the VLM's; "
                                  "tune needs the two models to share a tokenizer")


@dataclass
class _Setup:
    """The loaded VLM with its in-place merger, the teachers' answers, and the reference scores."""

    model: Any
    ip: InPlaceModel
    image_set: Any
    text_set: Any
    ref: Reference
    start: Candidate  # the VLM itself: scale 0


def _setup(prep: Any, recipe: Recipe, images: list, texts: list, s: TuneSettings, device: str, bar: Any,
           allow_unmatched: bool) -> _Setup:
    # the expert answers first and is freed before the VLM is loaded: one model in memory at a time
    expert_model, expert_proc = load_model(prep.paths[recipe.experts[0].label], device)
    vlm_proc = _processor(prep.paths["vlm"])
    _check_tokenizers(vlm_proc, expert_proc, [render(vlm_proc, p, raw=s.raw_prompts) for p in texts])
    kw = {"max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size, "raw": s.raw_prompts, "device": device,
          "on_batch": bar.update}
    text_set = teacher_answers(expert_model, vlm_proc, texts, **kw)
    expert_text = score(expert_model, text_set, device)
    del expert_model
    model, processor = load_model(prep.paths["vlm"], device)
    image_set = teacher_answers(model, processor, images, **kw)
    vlm_image, vlm_text = score(model, image_set, device), score(model, text_set, device)
    ref = Reference.from_scores(vlm_image, vlm_text, expert_text)
    cache_taus = recipe.mode == "inject" and prep.settings.method.kind == "delta"
    ip = InPlaceModel(model, prep.plan, cache_taus=cache_taus, device=device, allow_unmatched=allow_unmatched)
    start = Candidate((0.0,), 1.0, 0.0, True, 1.0, vlm_text.kept_rate, vlm_image.mean_nll, vlm_text.mean_nll,
                      stage="vlm")
    return _Setup(model, ip, image_set, text_set, ref, start)


def _search(st: _Setup, prep: Any, s: TuneSettings, groups: list[list[int]], device: str, bar: Any,
            warn: Callable[[str], None]) -> tuple[Candidate, list[Candidate]]:
    n_layers = prep.plan.n_layers
    z = z_of(s.confidence)

    def evaluate(scales: tuple[float, ...], stage: str) -> Candidate:
        t = time.perf_counter()
        st.ip.apply(dataclasses.replace(prep.settings, scales=[schedule_of(scales, groups, n_layers)]))
        try:  # a candidate is scored only as far as needed: uptake only where retention holds
            img = score(st.model, st.image_set, device, give_up=lambda part: st.ref.retention(part) < s.min_retention)
            ok = img.kept.shape[0] == st.ref.confidence.shape[0] and lower_bound(st.ref, img, z) >= s.min_retention
            txt = score(st.model, st.text_set, device) if ok else None
        finally:
            st.ip.restore()
        bar.update(1)
        return candidate(scales, st.ref, img, txt, s.min_retention, stage, time.perf_counter() - t, z)

    lo, hi = s.scale_range
    start = st.start if lo == 0 else evaluate((lo,), "grid")
    cands = global_search(evaluate, start, lo, hi, s.budget)
    chosen = best(cands)
    if chosen is None:
        raise SkillgraftError(f"no scale in {lo:g}:{hi:g} keeps the estimated retention at {s.min_retention:g}; "
                              "lower the range's low end, the minimum retention or its confidence")
    if chosen.scale >= hi:
        warn(f"the pick is the top of the scale range ({hi:g}); a larger range may find more uptake")
    if s.per_layer and len(groups) > 1:
        first = dataclasses.replace(chosen, scales=tuple([chosen.scale] * len(groups)), stage="per-layer")
        more = group_search(evaluate, first, s.budget, max(chosen.scale / 4, (hi - lo) / 100), (hi - lo) / 200)
        cands += [c for c in more if c is not first]
        chosen = best([chosen, *more]) or chosen
    return chosen, cands


def tune(recipe: Recipe, image_prompts: str | Path, text_prompts: str | Path, out: str | Path, *,
         settings: TuneSettings | None = None, device: str = "cpu", force: bool = False,
         shard_size: str | int | None = None, progress: bool = True, allow_unmatched: bool = False,
         plot: bool = False, on_warning: Callable[[str], None] | None = None) -> TuneResult:
    """Choose the expert's scale from unlabelled prompts and write the injected checkpoint to ``out``.

    Warnings go to the ``skillgraft`` logger, or to ``on_warning(message)`` when given. ``out`` is
    claimed before any work as ``inject`` claims it (``io.outdir.OutputDir``); the probe files count as
    inputs it must not overwrite.
    """
    s = settings or TuneSettings()
    s.check()
    check_device(device)
    if len(recipe.experts) != 1:
        raise SkillgraftError("tune chooses the scale of one expert; give exactly one")
    if recipe.dtype != "auto":
        raise SkillgraftError("tune scores candidates in the VLM's own dtype; leave the output dtype at auto")
    if expert_kind(recipe.experts[0].model) != "checkpoint":
        raise SkillgraftError(_NOT_A_MODEL)
    say = on_warning or log.warning
    probe_files = [("image prompts", Path(image_prompts)), ("text prompts", Path(text_prompts))]
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with ExitStack() as stack:  # OUT is claimed (checked and locked) before any work
        target = stack.enter_context(OutputDir(out, force, inputs=input_paths(recipe) + probe_files, log=say))
        images = read_image_prompts(image_prompts, s.max_prompts)
        texts = read_text_prompts(text_prompts, s.max_prompts)
        prep = prepare(recipe, stack, allow_unmatched=allow_unmatched)
        label = recipe.experts[0].label
        if prep.sources.get(label, {}).get("kind", "checkpoint") != "checkpoint":  # a hub snapshot, resolved
            raise SkillgraftError(_NOT_A_MODEL)
        for w in prep.warnings + unrelated_weights_check(prep.plan):
            say(w)
        groups = layer_groups(prep.plan.n_layers, s.groups)
        bar = tqdm(total=len(texts) + len(images) + s.budget * (2 if s.per_layer else 1), desc="tuning",
                   unit="step", disable=not progress, leave=False)
        try:
            st = _setup(prep, recipe, images, texts, s, device, bar, allow_unmatched)
            timings["setup_s"] = time.perf_counter() - t0
            chosen, cands = _search(st, prep, s, groups, device, bar, say)
            timings["search_s"] = time.perf_counter() - t0 - timings["setup_s"]
        finally:
            bar.close()
        ref, st = st.ref, None  # the in-memory VLM is released before the checkpoint is written
        scale = schedule_of(chosen.scales, groups, prep.plan.n_layers)
        final = recipe.model_copy(deep=True)
        final.experts[0].scale = scale
        t2 = time.perf_counter()
        with target.stage() as tmp:
            staged = tmp / "checkpoint"  # inject's own atomic write, inside the directory swapped in as OUT
            result = inject(final, staged, device=device, shard_size=shard_size or DEFAULT_SHARD_SIZE,
                            progress=progress, allow_unmatched=allow_unmatched, on_warning=lambda m: None)
            for f in staged.iterdir():
                f.rename(tmp / f.name)
            staged.rmdir()
            timings["inject_s"] = time.perf_counter() - t2
            timings["total_s"] = time.perf_counter() - t0
            probes = {"image_prompts": str(Path(image_prompts).resolve()),
                      "text_prompts": str(Path(text_prompts).resolve()), "n_image": len(images), "n_text": len(texts)}
            report = write_outputs(tmp, recipe=final, chosen=chosen, candidates=cands, ref=ref, settings=s,
                                   groups=groups, probes=probes, timings=timings, inject_report=result.report,
                                   plot=plot)
    return TuneResult(Path(out), chosen, scale, cands, report, timings)


def _processor(path: Path) -> Any:
    proc = load_processor(path)
    if proc is None:
        raise SkillgraftError(f"{path}: no processor or tokenizer files; tune needs the VLM's processor")
    return proc
