"""One interface for every evaluator a sweep can use.

An evaluator turns a model into named scores (``{"general": 0.91, "cross_lingual": 0.40}``).
Every evaluator scores a checkpoint directory (``evaluate_dir``); those that can also score a
model already in memory (``supports_loaded``) let a sweep load the VLM once and apply each point in
place, without writing a checkpoint per point.

Evaluators are described by a JSON-able ``spec`` (``{"kind": "jsonl", "path": ...}``) and rebuilt from
it with :func:`skillgraft.evaluate.make_evaluator`, so Ray workers on other machines build the same one.

Kinds: ``microworld`` (the micro-world suites, per scenario), ``jsonl`` (your own
``{image, question, answer}`` file through transformers ``generate``), ``command`` (an external
evaluator such as lmms-eval or VLMEvalKit, run on a merged checkpoint).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError


class Evaluator(ABC):
    kind: str = "base"
    supports_loaded: bool = False

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """A JSON-able description that ``skillgraft.evaluate.make_evaluator`` turns back into this evaluator."""

    def scenarios(self) -> list[str] | None:
        """The score names this evaluator reports, when known before running (None otherwise)."""
        return None

    def default_target(self) -> list[str] | None:
        return None

    def item_counts(self) -> dict[str, int] | None:
        """How many items each score is a fraction of, when the scores are accuracies (None otherwise):
        what a report needs for confidence intervals."""
        return None

    def default_retain(self) -> str | None:
        s = self.scenarios()
        return "general" if s and "general" in s else None

    @abstractmethod
    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        """Scores of the checkpoint in ``model_dir``."""

    def evaluate_loaded(self, model: Any, processor: Any) -> dict[str, float]:
        """Scores of a model already in memory (only when ``supports_loaded``)."""
        raise NotImplementedError(f"the {self.kind} evaluator scores checkpoint directories only")

    def load(self, model_dir: str | Path) -> tuple[Any, Any]:
        """The model and processor this evaluator would score for ``model_dir`` (for in-place sweeps)."""
        return load_model(model_dir, getattr(self, "device", "cpu"))


def model_class(config: dict[str, Any]):
    """The transformers class named in ``config['architectures']`` (never remote code)."""
    import transformers  # deferred: transformers, not loaded by a merge

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if config.get("vision_config") is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Load a checkpoint in its stored dtype with the class its config names, plus its processor
    (or tokenizer for a plain LLM). ``trust_remote_code`` is never set."""

    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise SkillgraftError(f"{d}: no config.json; not a transformers checkpoint")
    config = json.loads(cfg_path.read_text())
    cls = model_class(config)
    model = cls.from_pretrained(str(d), dtype="auto")
    model.to(device)
    model.eval()
    return model, load_processor(d)


def load_processor(model_dir: str | Path) -> Any:
    """The checkpoint's processor, else its tokenizer (a text-only model), else None."""
    import transformers  # deferred: transformers, not loaded by a merge

    for cls in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return cls.from_pretrained(str(model_dir))
        except Exception:  # no processor / tokenizer files: try the next, then give up
            continue
    return None


class PythonEvaluator(Evaluator):
    """Scores from a Python callable ``module:attr`` returning an object with this interface.

    The factory is called with ``**options`` and must return an :class:`Evaluator`-like object; useful
    for custom in-memory scorers and for tests.
    """

    kind = "python"

    def __init__(self, target: str, options: dict[str, Any] | None = None):
        self.target = target
        self.options = dict(options or {})
        mod, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise SkillgraftError(f"evaluator {target!r} not found ({e})") from None
        self.impl = factory(**self.options)
        self.supports_loaded = bool(getattr(self.impl, "supports_loaded", False))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PythonEvaluator":
        return cls(spec["target"], spec.get("options"))

    def spec(self) -> dict[str, Any]:
        return {"kind": "python", "target": self.target, "options": self.options}

    def scenarios(self) -> list[str] | None:
        f = getattr(self.impl, "scenarios", None)
        return f() if callable(f) else None

    def default_target(self) -> list[str] | None:
        f = getattr(self.impl, "default_target", None)
        return f() if callable(f) else None

    def item_counts(self) -> dict[str, int] | None:
        f = getattr(self.impl, "item_counts", None)
        return f() if callable(f) else None

    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        return self.impl.evaluate_dir(model_dir)

    def evaluate_loaded(self, model: Any, processor: Any) -> dict[str, float]:
        return self.impl.evaluate_loaded(model, processor)

    def load(self, model_dir: str | Path) -> tuple[Any, Any]:
        f = getattr(self.impl, "load", None)
        return f(model_dir) if callable(f) else load_model(model_dir)


class MicroworldEvaluator(Evaluator):
    """The micro-world suites (``skillgraft.evaluate.microworld``), one score per scenario.

    ``limit`` items per scenario (None: all), greedy decoding; deterministic on the CPU.
    """

    kind = "microworld"
    supports_loaded = True

    def __init__(self, scenarios: list[str] | None = None, limit: int | None = None, device: str = "cpu",
                 batch_size: int = 64):
        from . import microworld as mw  # deferred: PIL (an optional extra) and torch

        self.mw = mw
        if scenarios:
            bad = [s for s in scenarios if s not in mw.SCENARIOS]
            if bad:
                raise SkillgraftError(f"unknown scenario {bad[0]!r}; choose from {', '.join(mw.SCENARIOS)}")
        self._scenarios = list(scenarios) if scenarios else list(mw.SCENARIOS)
        self.limit = limit
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "MicroworldEvaluator":
        return cls(spec.get("scenarios"), spec.get("limit"), spec.get("device", "cpu"), spec.get("batch_size", 64))

    def spec(self) -> dict[str, Any]:
        return {"kind": "microworld", "scenarios": self._scenarios, "limit": self.limit, "device": self.device,
                "batch_size": self.batch_size}

    def scenarios(self) -> list[str] | None:
        return list(self._scenarios)

    def item_counts(self) -> dict[str, int] | None:
        return {s: len(self.mw.benchmark_items(s)[: self.limit or None]) for s in self._scenarios}

    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        res = self.mw.evaluate(str(model_dir), scenarios=self._scenarios, limit=self.limit, device=self.device,
                               batch_size=self.batch_size, progress=False)
        return {k: float(res[k]) for k in self._scenarios}

    def evaluate_loaded(self, model: Any, processor: Any) -> dict[str, float]:
        res = self.mw.evaluate_loaded(model, processor, scenarios=self._scenarios, limit=self.limit,
                                      device=self.device, batch_size=self.batch_size, progress=False)
        return {k: float(res[k]) for k in self._scenarios}

    def load(self, model_dir: str | Path) -> tuple[Any, Any]:
        loader = getattr(self.mw, "load", None) or getattr(self.mw, "load_model", None)
        if callable(loader):
            return loader(str(model_dir), device=self.device)
        return load_model(model_dir, self.device)
