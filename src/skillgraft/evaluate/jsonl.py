"""Your own evaluation set: a JSONL file of ``{image, question, answer}`` items, answered through the
real transformers ``generate`` path with the model's own processor and chat template.

One item per line::

    {"image": "imgs/0001.png", "question": "What colour is the car?", "answer": "red", "language": "en"}
    {"image": "imgs/0002.png", "question": "Décris la scène en une phrase.", "language": "fr",
     "constraints": [{"type": "sentence"}, {"type": "max_words", "value": 12}]}

- ``image``: a path relative to the JSONL file (or absolute); omit it for a text-only question.
- ``answer``: scored by exact match after normalisation (case, surrounding spaces and a final full
  stop ignored). Items with ``constraints`` are scored by the constraints instead (all must hold);
  the constraint ``{"type": "answer"}`` adds "contains the answer".
- ``language``: optional; scores are also reported per language (``language:fr``).

Constraints (simple and verifiable): ``uppercase``, ``lowercase``, ``sentence`` (capital first letter,
ends with a full stop), ``answer``, ``contains`` / ``not_contains`` / ``starts_with`` / ``ends_with``
(``value``: text, case-insensitive), ``regex`` (``pattern``, searched), ``max_words`` / ``min_words``
(``value``: n), ``wrapped`` (``value``: two characters, e.g. ``"[]"``). A bare string ``"uppercase"``
means ``{"type": "uppercase"}``.

Scores: ``all`` (the mean over items) and ``language:XX`` per language.

Prompt: the model's chat template (processor's, else tokenizer's) with the image and the question as
one user turn. A model without a chat template gets ``prompt_template`` (default
``"{image} {question}"``, where ``{image}`` is the processor's image token).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError
from .base import Evaluator, load_model

_CONSTRAINTS = ("uppercase", "lowercase", "sentence", "answer", "contains", "not_contains", "starts_with", "ends_with",
                "regex", "max_words", "min_words", "wrapped")
_NEEDS_VALUE = ("contains", "not_contains", "starts_with", "ends_with", "max_words", "min_words", "wrapped")


def normalise_answer(text: str) -> str:
    t = " ".join(str(text).split()).strip()
    if t.endswith("."):
        t = t[:-1].rstrip()
    return t.casefold()


def _constraint(c: Any, where: str) -> dict[str, Any]:
    if isinstance(c, str):
        c = {"type": c}
    if not isinstance(c, dict) or c.get("type") not in _CONSTRAINTS:
        raise SkillgraftError(f"{where}: unknown constraint {c!r}; known: {', '.join(_CONSTRAINTS)}")
    if c["type"] in _NEEDS_VALUE and "value" not in c:
        raise SkillgraftError(f"{where}: constraint {c['type']} needs a value")
    if c["type"] == "regex":
        try:
            re.compile(c.get("pattern", ""))
        except re.error as e:
            raise SkillgraftError(f"{where}: bad regex ({e})") from None
    if c["type"] == "wrapped" and len(str(c["value"])) != 2:
        raise SkillgraftError(f"{where}: wrapped needs two characters, e.g. \"[]\"")
    return c


def check_constraint(pred: str, c: dict[str, Any], answer: str | None) -> bool:
    t = pred.strip()
    kind = c["type"]
    letters = [ch for ch in t if ch.isalpha()]
    low = t.casefold()
    if kind == "uppercase":
        return bool(letters) and all(ch.isupper() for ch in letters)
    if kind == "lowercase":
        return bool(letters) and all(ch.islower() for ch in letters)
    if kind == "sentence":
        return bool(t) and t[0].isupper() and t.endswith(".")
    if kind == "answer":
        if answer is None:
            return False
        return re.search(r"(?<!\w)" + re.escape(normalise_answer(answer)) + r"(?!\w)", normalise_answer(t)) is not None
    if kind == "contains":
        return str(c["value"]).casefold() in low
    if kind == "not_contains":
        return str(c["value"]).casefold() not in low
    if kind == "starts_with":
        return low.startswith(str(c["value"]).casefold())
    if kind == "ends_with":
        return low.endswith(str(c["value"]).casefold())
    if kind == "regex":
        return re.search(c["pattern"], t) is not None
    if kind == "max_words":
        return len(t.split()) <= int(c["value"])
    if kind == "min_words":
        return len(t.split()) >= int(c["value"])
    if kind == "wrapped":
        a, b = str(c["value"])
        return t.startswith(a) and t.endswith(b)
    raise AssertionError(kind)


def score_item(pred: str, item: dict[str, Any]) -> bool:
    """Whether ``pred`` answers ``item``: its constraints if it has any, else exact match."""
    cons = item.get("constraints")
    if cons:
        return all(check_constraint(pred, c, item.get("answer")) for c in cons)
    return normalise_answer(pred) == normalise_answer(item["answer"])


def load_items(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise SkillgraftError(f"evaluation file not found: {p}")
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            it = json.loads(line)
        except ValueError as e:
            raise SkillgraftError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(it, dict) or not isinstance(it.get("question"), str):
            raise SkillgraftError(f"{where}: each item needs a \"question\" string")
        if "answer" not in it and not it.get("constraints"):
            raise SkillgraftError(f"{where}: give an \"answer\" or \"constraints\"")
        if it.get("constraints") is not None:
            if not isinstance(it["constraints"], list):
                raise SkillgraftError(f"{where}: \"constraints\" must be a list")
            it["constraints"] = [_constraint(c, where) for c in it["constraints"]]
        if it.get("image"):
            img = Path(it["image"])
            img = img if img.is_absolute() else p.parent / img
            if not img.is_file():
                raise SkillgraftError(f"{where}: image not found: {img}")
            it["image"] = str(img)
        items.append(it)
        if limit and len(items) >= limit:
            break
    if not items:
        raise SkillgraftError(f"{p}: no items")
    return items


class JsonlEvaluator(Evaluator):
    kind = "jsonl"
    supports_loaded = True

    def __init__(self, path: str | Path, *, limit: int | None = None, device: str = "cpu", max_new_tokens: int = 32,
                 batch_size: int = 16, prompt_template: str = "{image} {question}"):
        self.path = str(Path(path).resolve())
        self.limit = limit
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_template = prompt_template
        self.items = load_items(self.path, limit)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "JsonlEvaluator":
        return cls(spec["path"], limit=spec.get("limit"), device=spec.get("device", "cpu"),
                   max_new_tokens=spec.get("max_new_tokens", 32), batch_size=spec.get("batch_size", 16),
                   prompt_template=spec.get("prompt_template", "{image} {question}"))

    def spec(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": self.path, "limit": self.limit, "device": self.device,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "prompt_template": self.prompt_template}

    def scenarios(self) -> list[str]:
        langs = sorted({it["language"] for it in self.items if it.get("language")})
        return ["all", *(f"language:{x}" for x in langs)]

    def item_counts(self) -> dict[str, int]:
        counts = {"all": len(self.items)}
        for it in self.items:
            if it.get("language"):
                key = f"language:{it['language']}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def default_target(self) -> list[str]:
        return ["all"]

    def default_retain(self) -> str | None:
        return None

    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        model, processor = load_model(model_dir, self.device)
        return self.evaluate_loaded(model, processor)

    def evaluate_loaded(self, model: Any, processor: Any) -> dict[str, float]:
        preds = self.predict(model, processor)
        hits = [score_item(p, it) for p, it in zip(preds, self.items)]
        out = {"all": sum(hits) / len(hits)}
        for lang in sorted({it["language"] for it in self.items if it.get("language")}):
            sel = [h for h, it in zip(hits, self.items) if it.get("language") == lang]
            out[f"language:{lang}"] = sum(sel) / len(sel)
        self.last_predictions = preds
        return out

    # ------------------------------------------------------------------ generation
    def _prompt(self, processor: Any, item: dict[str, Any]) -> str:
        tok = getattr(processor, "tokenizer", processor)
        has_image = bool(item.get("image"))
        for owner in (processor, tok):
            if owner is not None and getattr(owner, "chat_template", None):
                if owner is processor and hasattr(processor, "tokenizer"):
                    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": item["question"]}]
                else:
                    content = item["question"]
                return owner.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
        image_token = getattr(processor, "image_token", None) or "<image>"
        text = self.prompt_template.replace("{question}", item["question"])
        return text.replace("{image}", image_token if has_image else "").strip()

    def predict(self, model: Any, processor: Any) -> list[str]:
        from PIL import Image  # deferred: PIL, an optional extra

        if processor is None:
            raise SkillgraftError("the model has no processor or tokenizer files; the jsonl evaluator needs one")
        tok = getattr(processor, "tokenizer", processor)
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        preds: list[str | None] = [None] * len(self.items)
        groups = [[i for i, it in enumerate(self.items) if bool(it.get("image")) == img] for img in (True, False)]
        for img, idx in zip((True, False), groups):
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                prompts = [self._prompt(processor, self.items[i]) for i in chunk]
                if img:
                    if not hasattr(processor, "image_processor"):
                        raise SkillgraftError("an item has an image but the model has no image processor")
                    images = [Image.open(self.items[i]["image"]).convert("RGB") for i in chunk]
                    enc = processor(text=prompts, images=images, return_tensors="pt", padding=True)
                else:
                    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                with torch.no_grad():
                    gen = model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1] :]
                for i, text in zip(chunk, tok.batch_decode(new, skip_special_tokens=True)):
                    preds[i] = text.strip()
        return [p or "" for p in preds]
