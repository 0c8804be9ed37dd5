"""Label-free signals: how far a candidate merge keeps the VLM's own answers, and how far it takes up
the expert's.

A *teacher* (the VLM on the image prompts, the expert on the text prompts) answers each prompt once,
greedily. A candidate is then scored by one teacher-forced forward pass over prompt + teacher answer:

- ``kept``: the prompt's answer is unchanged, i.e. the candidate's argmax equals the teacher's token at
  every answer position up to and including the end token; greedy decoding by the candidate would
  then produce the teacher's answer exactly (within the answer-length cap);
- ``nll``: the mean negative log-likelihood of the teacher's answer tokens under the candidate
  (sequence-level distillation's loss, Kim and Rush, EMNLP 2016).

Only the logits of the answer positions are computed (``logits_to_keep``), so a large vocabulary costs
little. Every batch and answer is built once; candidates reuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SkillgraftError
from .prompts import Probe, render, tokenizer_of


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]   # prompt + answer ids, attention mask, pixel values, ...
    answers: torch.Tensor             # [B, T] teacher tokens; -100 after the answer's end
    keep: int                         # logits kept: the last T + 1 positions


@dataclass
class ProbeSet:
    """Prompts with a teacher's greedy answers, ready for teacher-forced scoring."""

    batches: list[Batch]
    texts: list[str] = field(default_factory=list)  # the decoded teacher answers (for the report)

    @property
    def n(self) -> int:
        return sum(b.answers.shape[0] for b in self.batches)


@dataclass(frozen=True)
class Score:
    """Per-prompt results of one model on one probe set."""

    kept: torch.Tensor    # [N] bool: the greedy answer is the teacher's
    nll: torch.Tensor     # [N] summed NLL of the teacher's answer tokens
    tokens: torch.Tensor  # [N] answer tokens (end token included)
    matches: torch.Tensor  # [N] answer tokens where the argmax is the teacher's

    @property
    def kept_rate(self) -> float:
        return float(self.kept.float().mean())

    @property
    def mean_nll(self) -> float:
        """Mean NLL per teacher answer token."""
        return float(self.nll.sum() / self.tokens.sum().clamp(min=1))

    @property
    def token_match(self) -> float:
        return float(self.matches.sum() / self.tokens.sum().clamp(min=1))

    def to_dict(self) -> dict[str, float]:
        return {"kept": self.kept_rate, "nll": self.mean_nll, "token_match": self.token_match}


def _encode(processor: Any, probes: list[Probe], raw: bool) -> dict[str, torch.Tensor]:
    from PIL import Image  # deferred: PIL, an optional extra

    tok = tokenizer_of(processor)
    texts = [render(processor, p, raw=raw) for p in probes]
    if probes[0].image is not None:
        if not hasattr(processor, "image_processor"):
            raise SkillgraftError("image prompts need a VLM with an image processor; this model has none")
        images = []
        for p in probes:
            with Image.open(p.image) as im:
                images.append(im.convert("RGB"))
        return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=not _templated(processor, raw)))


def _templated(processor: Any, raw: bool) -> bool:
    tok = tokenizer_of(processor)
    return not raw and any(getattr(o, "chat_template", None) for o in (processor, tok) if o is not None)


def _prepare_tokenizer(processor: Any) -> Any:
    tok = tokenizer_of(processor)
    if tok is None:
        raise SkillgraftError("the checkpoint has no tokenizer or processor files; tune needs them")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _end_ids(model: Any, tok: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return {int(i) for i in ids if i is not None}


def _answer_mask(new: torch.Tensor, ends: set[int]) -> torch.Tensor:
    """True up to and including the first end token of each row."""
    is_end = torch.zeros_like(new, dtype=torch.bool)
    for e in ends:
        is_end |= new == e
    after = torch.cumsum(is_end.int(), dim=1) - is_end.int()  # ends strictly before this position
    return after == 0


@torch.no_grad()
def teacher_answers(model: Any, processor: Any, probes: list[Probe], *, max_new_tokens: int = 16,
                    batch_size: int = 16, raw: bool = False, device: str = "cpu",
                    on_batch: Callable[[int], None] | None = None) -> ProbeSet:
    """The teacher's greedy answers to ``probes``, as teacher-forced batches any model of the same
    tokenizer can be scored on (the prompts are encoded with ``processor``)."""
    tok = _prepare_tokenizer(processor)
    ends = _end_ids(model, tok)
    batches: list[Batch] = []
    texts: list[str] = []
    for i in range(0, len(probes), batch_size):
        chunk = probes[i : i + batch_size]
        enc = {k: v.to(device) for k, v in _encode(processor, chunk, raw).items()}
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        p = enc["input_ids"].shape[1]
        new = gen[:, p:]
        if new.shape[1] == 0:
            raise SkillgraftError("the teacher model produced no answer tokens; raise the answer length")
        mask = _answer_mask(new, ends)
        inputs = dict(enc)
        inputs["input_ids"] = gen
        inputs["attention_mask"] = torch.cat([enc["attention_mask"], mask.to(enc["attention_mask"].dtype)], dim=1)
        answers = new.masked_fill(~mask, -100)
        batches.append(Batch({k: v.cpu() for k, v in inputs.items()}, answers.cpu(), new.shape[1] + 1))
        texts += [t.strip() for t in tok.batch_decode(new.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)]
        if on_batch is not None:
            on_batch(len(chunk))
    return ProbeSet(batches, texts)


@torch.no_grad()
def score(model: Any, probes: ProbeSet, device: str = "cpu",
          give_up: Callable[[Score], bool] | None = None) -> Score:
    """How ``model`` answers the teacher-forced ``probes``, prompt by prompt.

    ``give_up(partial)`` is asked after each batch; when it says yes the prompts scored so far are
    returned (a candidate already ruled out need not be scored to the end).
    """
    kept, nll, tokens, matches = [], [], [], []

    def result() -> Score:
        out = Score(torch.cat(kept), torch.cat(nll), torch.cat(tokens), torch.cat(matches))
        if not bool(torch.isfinite(out.nll).all()):
            raise SkillgraftError("a candidate produced non-finite log-probabilities; lower the scale range")
        return out

    for i, b in enumerate(probes.batches):
        inputs = {k: v.to(device) for k, v in b.inputs.items()}
        logits = model(**inputs, logits_to_keep=b.keep, use_cache=False).logits[:, :-1].float()
        ans = b.answers.to(device)
        valid = ans != -100
        safe = ans.clamp(min=0)
        if int(safe.max()) >= logits.shape[-1]:
            raise SkillgraftError("a teacher answer holds a token outside the model's vocabulary; "
                                  "the VLM and the expert do not share a tokenizer")
        lp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        hit = (logits.argmax(-1) == ans) | ~valid
        kept.append(hit.all(dim=1).cpu())
        nll.append(-torch.where(valid, lp, 0.0).sum(dim=1).double().cpu())
        tokens.append(valid.sum(dim=1).cpu())
        matches.append((hit & valid).sum(dim=1).cpu())
        if give_up is not None and i + 1 < len(probes.batches) and give_up(result()):
            break
    return result()
