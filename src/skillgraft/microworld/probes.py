"""Unlabelled probe prompts for ``skillgraft tune`` on the micro-world (``skillgraft zoo probes``).

Two files, as a user of a real VLM would bring them:

- ``image_prompts.jsonl``: English image questions, the VLM's own use, each ``{"image", "prompt"}``
  with its picture under ``images/``;
- ``text_prompts.jsonl``: text-only prompts in the expert's domain (French questions, questions with
  a format instruction, or counting-plus-addition questions over a scene written as words), each
  ``{"prompt"}``, drawn as the expert's fine-tuning data is drawn.

No answer is written anywhere. Items are drawn from the training distribution with their own seeds
(``PROBE_SEEDS``, disjoint from the benchmark's and the zoo build's), and any item whose scene and
question also occur in a benchmark test set is skipped, so probes and test items never overlap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import SkillgraftError
from ..evaluate.microworld import SCENARIOS, benchmark_items
from . import world as W
from .scenarios import EXPERT_NAMES, EXPERT_SCENARIO

# seeds of the probe draws: the benchmark uses 9001-9004, the zoo build seed*1000 + 1..23
PROBE_SEEDS: dict[str, int] = {"image": 31_000, "expert-multilingual": 31_001, "expert-instruct": 31_002,
                               "expert-math": 31_003}
# expert -> (task of its fine-tuning data, languages its scenes are written in)
_EXPERT_TASK: dict[str, tuple[str, tuple[str, ...]]] = {
    "expert-multilingual": ("fr", ("en", "fr")),
    "expert-instruct": ("instruction", ("en",)),
    "expert-math": ("math", ("en",)),
}
DEFAULT_N = 256


def item_key(item: W.Item) -> tuple:
    """What makes two items the same test question: the scene and the question asked about it."""
    return (item.scene, item.question)


def benchmark_keys() -> set[tuple]:
    """The keys of every item of every benchmark test set."""
    return {item_key(it) for sc in SCENARIOS for it in benchmark_items(sc)}


def _draw(rng: random.Random, task: str, n: int, banned: set[tuple]) -> list[W.Item]:
    out: list[W.Item] = []
    seen: set[tuple] = set()
    while len(out) < n:
        it = W.make_item(rng, task)
        k = item_key(it)
        if k in banned or k in seen:
            continue
        seen.add(k)
        out.append(it)
    return out


def image_probe_items(n: int = DEFAULT_N) -> list[W.Item]:
    """English image questions (the VLM's own skill), none of them a benchmark item."""
    return _draw(random.Random(PROBE_SEEDS["image"]), "en", n, benchmark_keys())


def text_probe_prompts(expert: str, n: int = DEFAULT_N) -> list[tuple[W.Item, str]]:
    """(item, text prompt) pairs in ``expert``'s domain, none of them a benchmark item."""
    if expert not in _EXPERT_TASK:
        raise SkillgraftError(f"unknown micro-world expert {expert!r}; choose one of: {', '.join(EXPERT_NAMES)}")
    task, langs = _EXPERT_TASK[expert]
    rng = random.Random(PROBE_SEEDS[expert])
    items = _draw(rng, task, n, benchmark_keys())
    return [(it, W.text_prompt(it, rng.choice(langs))) for it in items]


def write_probes(expert: str, out: str | Path, n: int = DEFAULT_N) -> dict[str, Path]:
    """Write ``out/image_prompts.jsonl`` (+ ``out/images/``) and ``out/text_prompts.jsonl`` for ``expert``.

    Refuses a non-empty ``out`` (nothing of the user's is overwritten).
    """
    if expert not in EXPERT_SCENARIO:
        raise SkillgraftError(f"unknown micro-world expert {expert!r}; choose one of: {', '.join(EXPERT_NAMES)}")
    if n < 1:
        raise SkillgraftError("the number of probes must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SkillgraftError(f"{out} exists and is not an empty directory; choose a new one")
    texts = text_probe_prompts(expert, n)
    images = image_probe_items(n)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, it in enumerate(images):
        rel = f"images/{i:04d}.png"
        it.image().save(out / rel)
        lines.append(json.dumps({"image": rel, "prompt": W.vlm_prompt(it)}))
    (out / "image_prompts.jsonl").write_text("\n".join(lines) + "\n")
    (out / "text_prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for _, p in texts) + "\n")
    return {"image_prompts": out / "image_prompts.jsonl", "text_prompts": out / "text_prompts.jsonl"}
