"""Unlabelled probe files for ``tune``: reading, checking, and rendering them as model prompts.

``image prompts``: JSONL, one ``{"image": PATH, "prompt": TEXT}`` per line, from the VLM's own use
(PATH relative to the file, or absolute). ``text prompts``: JSONL of ``{"prompt": TEXT}`` (``.jsonl``
files) or plain text, one prompt per line, in the skill's domain. Neither holds answers; an
``answer`` key is refused, so a labelled file is not mistaken for probes. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError


@dataclass(frozen=True)
class Probe:
    prompt: str
    image: Path | None = None


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise SkillgraftError(f"probe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SkillgraftError(f"{path}: not a UTF-8 text file") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _record(path: Path, n: int, line: str, keys: tuple[str, ...]) -> dict[str, Any]:
    where = f"{path}:{n}"
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise SkillgraftError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise SkillgraftError(f"{where}: expected a JSON object with {' and '.join(repr(k) for k in keys)}")
    if "answer" in rec or "answers" in rec:
        raise SkillgraftError(f"{where}: probes carry no answers; drop the \"answer\" key")
    for k in keys:
        if not isinstance(rec.get(k), str) or not rec[k].strip():
            raise SkillgraftError(f"{where}: needs a non-empty \"{k}\" string")
    return rec


def _limit(probes: list[Probe], path: Path, limit: int | None) -> list[Probe]:
    if not probes:
        raise SkillgraftError(f"{path}: no prompts in the file")
    return probes[:limit] if limit else probes


def read_image_prompts(path: str | Path, limit: int | None = None) -> list[Probe]:
    """``{"image", "prompt"}`` records; every image must exist and open as a picture."""
    from PIL import Image, UnidentifiedImageError  # deferred: PIL, an optional extra

    path = Path(path)
    out: list[Probe] = []
    for n, line in _lines(path):
        rec = _record(path, n, line, ("image", "prompt"))
        img = Path(rec["image"]).expanduser()
        img = img if img.is_absolute() else path.parent / img
        if not img.is_file():
            raise SkillgraftError(f"{path}:{n}: image not found: {img}")
        try:
            with Image.open(img) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise SkillgraftError(f"{path}:{n}: not a readable image: {img} ({e})") from None
        out.append(Probe(rec["prompt"], img))
        if limit and len(out) >= limit:
            break
    return _limit(out, path, limit)


def read_text_prompts(path: str | Path, limit: int | None = None) -> list[Probe]:
    """``{"prompt"}`` records from a ``.jsonl`` file, else one prompt per non-blank line."""
    path = Path(path)
    out: list[Probe] = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for n, line in _lines(path):
        out.append(Probe(_record(path, n, line, ("prompt",))["prompt"] if jsonl else line.strip()))
        if limit and len(out) >= limit:
            break
    return _limit(out, path, limit)


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def image_token(processor: Any) -> str:
    return getattr(processor, "image_token", None) or getattr(tokenizer_of(processor), "image_token", None) or "<image>"


def render(processor: Any, probe: Probe, *, raw: bool = False) -> str:
    """The prompt string a model sees: the chat template's user turn (with the image, if any), or
    the prompt as written (``raw``, no chat template, or a prompt that already places the image token)."""
    tok = tokenizer_of(processor)
    has_image = probe.image is not None
    token = image_token(processor) if has_image else ""
    if has_image and token in probe.prompt:
        return probe.prompt
    if not raw:  # an image needs the processor's template (a tokenizer's one has no place for it)
        for owner in (processor,) if has_image else (processor, tok):
            if owner is not None and getattr(owner, "chat_template", None):
                if owner is processor and hasattr(processor, "tokenizer"):
                    content: Any = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": probe.prompt}]
                else:
                    content = probe.prompt
                return owner.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
    return f"{token} {probe.prompt}" if has_image else probe.prompt
