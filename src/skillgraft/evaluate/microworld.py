"""The micro-world benchmark: four fixed, seeded test sets scored by exact match.

    general        English image questions (the VLM's own skill: retention / poisoning)
    cross_lingual  the same kinds of questions asked in French, answer expected in French
                   (items whose French answer is also an English word, e.g. "triangle",
                   are left out: they cannot tell the two languages apart)
    instruction    English image questions with a format instruction (capitals, brackets,
                   full sentence); exact match scores answer and format together
    math           image counting combined with addition ("how many circles plus two ?")

Decoding is greedy through the real `generate` of transformers, with the checkpoint's saved
processor (VLM: image + text) or tokenizer (text-only LLM: the question without the image).
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..errors import SkillgraftError
from ..microworld import world as W
from ..torch_state import torch_settings

SCENARIOS = ("general", "cross_lingual", "instruction", "math")
N_ITEMS = 256
_SEEDS = {"general": 9001, "cross_lingual": 9002, "instruction": 9003, "math": 9004}
_TASK = {"general": "en", "cross_lingual": "fr", "instruction": "instruction", "math": "math"}


@lru_cache(maxsize=None)
def benchmark_items(scenario: str, n: int = N_ITEMS) -> tuple[W.Item, ...]:
    """The fixed test set of a scenario (same items on every run and machine)."""
    if scenario not in _SEEDS:
        raise SkillgraftError(f"unknown micro-world scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    rng = random.Random(_SEEDS[scenario])
    items: list[W.Item] = []
    english_answers = {w for w in [*W.COLORS, *W.SHAPES, "nothing", "yes", "no", *W.NUMBERS]}
    counts: dict[str, int] = {}
    cap = max(1, n // 5)  # no answer makes up more than 20% of a set: guessing the commonest answer scores <= 20%
    while len(items) < n:
        it = W.make_item(rng, _TASK[scenario])
        if scenario == "cross_lingual" and it.answer in english_answers:
            continue
        if counts.get(it.answer, 0) >= cap:
            continue
        counts[it.answer] = counts.get(it.answer, 0) + 1
        items.append(it)
    return tuple(items)


def benchmark_fingerprint(scenarios: Iterable[str] = SCENARIOS, n: int = N_ITEMS) -> str:
    """sha256 over questions, answers, scenes and image bytes of the test sets."""
    h = hashlib.sha256()
    for sc in scenarios:
        for it in benchmark_items(sc, n):
            h.update(f"{sc}|{it.question}|{it.answer}|{it.scene}|".encode())
            h.update(it.image().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


def is_vlm_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def load(model: str | Path, device: str = "cpu"):
    """Load a checkpoint and its processor (VLM) or tokenizer (LLM)."""
    import transformers  # deferred: transformers, the benchmark items are drawn without it

    path = Path(model)
    if not (path / "config.json").is_file():
        raise SkillgraftError(f"not a checkpoint directory (no config.json): {path}")
    config = transformers.AutoConfig.from_pretrained(str(path))
    if is_vlm_config(config):
        cls = (transformers.LlavaForConditionalGeneration if config.model_type == "llava"
               else transformers.AutoModelForImageTextToText)
        m = cls.from_pretrained(str(path), dtype=torch.float32)
        proc = transformers.AutoProcessor.from_pretrained(str(path))
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        proc = transformers.AutoTokenizer.from_pretrained(str(path))
    m.to(device).eval()
    return m, proc


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


# --------------------------------------------------------------------------- evaluation


def predict(model, processor, items: list[W.Item], *, batch_size: int = 256, device: str = "cpu",
            text_scene: str | None = None, max_new_tokens: int = 6, progress_bar=None) -> list[str]:
    """Greedy answers for `items`. VLM: image + question. LLM: the question alone, or with the
    scene written as text when `text_scene` is "en"/"fr" (diagnostics)."""
    tok = _tokenizer_of(processor)
    tok.padding_side = "left"
    vlm = is_vlm_config(model.config)
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        if vlm:
            enc = processor(text=[W.vlm_prompt(it) for it in chunk], images=[it.image() for it in chunk],
                            return_tensors="pt", padding=True)
        else:
            enc = tok([W.text_prompt(it, text_scene) for it in chunk], return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        if progress_bar is not None:
            progress_bar.update(len(chunk))
    return out


def evaluate_loaded(model, processor, *, scenarios: Iterable[str] | None = None, limit: int | None = None,
                    device: str = "cpu", batch_size: int = 256, progress: bool = True,
                    text_scene: str | None = None, details: dict | None = None) -> dict[str, float]:
    """Accuracy per scenario of an already-loaded model (weights may have been changed in place)."""
    scenarios = tuple(scenarios or SCENARIOS)
    sets = {sc: list(benchmark_items(sc))[: limit or None] for sc in scenarios}
    everything = [it for items in sets.values() for it in items]  # one stream: fewer, fuller batches
    bar = tqdm(total=len(everything), desc="eval", disable=not progress, leave=False)
    preds = predict(model, processor, everything, batch_size=batch_size, device=device, text_scene=text_scene,
                    progress_bar=bar)
    bar.close()
    res: dict[str, float] = {}
    i = 0
    for sc, items in sets.items():
        mine = preds[i : i + len(items)]
        i += len(items)
        hits = [p == it.answer for p, it in zip(mine, items)]
        res[sc] = sum(hits) / max(1, len(items))
        if details is not None:
            details[sc] = [{"question": it.question, "answer": it.answer, "prediction": p, "kind": it.kind}
                           for it, p in zip(items, mine)]
    return res


def evaluate(model: str | Path, *, scenarios: Iterable[str] | None = None, limit: int | None = None,
             device: str = "cpu", batch_size: int = 256, progress: bool = True,
             text_scene: str | None = None) -> dict[str, float]:
    """Accuracy in [0, 1] per scenario of a checkpoint directory (VLM or text-only LLM)."""
    if scenarios is not None:
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad:
            raise SkillgraftError(f"unknown micro-world scenario {bad[0]!r}; choose from {', '.join(SCENARIOS)}")
    # at most two threads: the micro-world's small matmuls do not scale further (the setting is restored after)
    with torch_settings(threads=min(2, torch.get_num_threads()) if device == "cpu" else None):
        m, proc = load(model, device)
        return evaluate_loaded(m, proc, scenarios=scenarios, limit=limit, device=device, batch_size=batch_size,
                               progress=progress, text_scene=text_scene)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one row per model, one column per scenario (percent)."""
    cols = [c for c in SCENARIOS if any(c in r for r in rows.values())]
    w0 = max([len("model")] + [len(k) for k in rows])
    widths = [max(len(c), 6) for c in cols]
    head = "model".ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = [(f"{100 * r[c]:.1f}" if c in r and r[c] is not None else "-").rjust(w) for c, w in zip(cols, widths)]
        lines.append(name.ljust(w0) + "  " + "  ".join(cells))
    return "\n".join(lines)
