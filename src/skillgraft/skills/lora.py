"""Read a PEFT LoRA adapter directory as a task-vector checkpoint (see :mod:`skillgraft.skills.delta`).

Per target module the delta is ``scaling * B @ A`` (PEFT's ``get_delta_weight``), with
``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA (Kalajdzievski 2023), r and
alpha per module from ``rank_pattern`` / ``alpha_pattern``; embedding LoRAs and ``fan_in_fan_out``
layers store it transposed; ``lora_bias`` adds ``scaling * lora_B.bias`` to the bias. Whole
modules the adapter saves (``modules_to_save``, an embedding's ``base_layer``) become deltas
against the base, which must then be given. Names lose PEFT's ``base_model.model.`` prefix and
the language model's prefix and are served in plain causal-LM layout. DoRA, other PEFT methods
and LoRA variants whose change is not ``B @ A`` are refused by name.

Written by hand rather than through PEFT: PEFT applies an adapter to a loaded model (the whole
base in memory); here each delta is computed lazily, a block of rows at a time, from the files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SkillgraftError
from ..io.reader import CheckpointReader, SafetensorsFile
from ..mapping.families import CAUSAL_LM, FAMILIES
from ..mapping.layout import HEAD, LMLayout, detect_layout
from .delta import DeltaReader, read_json_mapping
from .naming import PLAIN_PREFIX

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# LoRA options whose change to a weight is not scaling * B @ A (or that change more than weights)
REFUSED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (use_dora): its change to a weight depends on that weight's column norms",
    "layer_replication": "layer_replication: it duplicates decoder layers",
    "trainable_token_indices": "trainable_token_indices: it trains single embedding rows outside the LoRA factors",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens): it acts only after given tokens",
    "use_qalora": "QALoRA (use_qalora): it pools its inputs",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config): it mixes adapters per token",
    "target_parameters": "target_parameters: it targets raw parameters, not modules",
}
_LINEAR = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$")
_BIAS = re.compile(r"^(?P<mod>.+)\.lora_B\.bias$")
_EMBED = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>[AB])$")
_BASE_LAYER = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<p>weight|bias)$")
_WHOLE = re.compile(r"^(?P<mod>.+)\.(?P<p>weight|bias)$")
_HEAD_MODULES = ("lm_head", "language_model.lm_head")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching the module."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class _Part:
    """One contribution to a delta: a LoRA product, a LoRA bias, or a whole saved tensor minus the base."""

    kind: str  # "lora" | "bias" | "whole"
    a: str = ""
    b: str = ""
    scaling: float = 1.0
    transposed: bool = False
    base_name: str = ""


@dataclass
class _Delta:
    shape: tuple[int, ...]
    parts: list[_Part] = field(default_factory=list)


def _refuse(root: Path, what: str) -> SkillgraftError:
    return SkillgraftError(f"adapter {root}: {what}; only plain LoRA adapters can be used as experts: merge it into "
                           f"its base with PEFT (merge_and_unload) and give the merged model instead")


def read_adapter_config(root: Path) -> dict[str, Any]:
    """``adapter_config.json``, refusing non-LoRA adapters and LoRA variants by name."""
    cfg = read_json_mapping(root / ADAPTER_CONFIG, f"adapter {root}")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise _refuse(root, f"it is a PEFT {cfg.get('peft_type')!r} adapter, not LoRA")
    for key, why in REFUSED_OPTIONS.items():
        if cfg.get(key):
            raise _refuse(root, f"it is a {why}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise SkillgraftError(f"adapter {root}: {ADAPTER_CONFIG} has no valid {key!r}")
    return cfg


class _Weights:
    """The adapter's tensors, read lazily from safetensors or (weights only) from a PyTorch pickle."""

    def __init__(self, root: Path):
        st, bn = (root / n for n in ADAPTER_WEIGHTS)
        self.st: SafetensorsFile | None = None
        self.state: dict[str, torch.Tensor] = {}
        if st.is_file():
            self.st = SafetensorsFile(st)
            self.shapes = {k: tuple(v[1]) for k, v in self.st.entries.items()}
            self.dtypes = {k: v[0] for k, v in self.st.entries.items()}
        elif bn.is_file():
            try:
                state = torch.load(str(bn), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise SkillgraftError(f"adapter {root}: {bn.name} cannot be read safely with weights_only=True ({e})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise SkillgraftError(f"adapter {root}: {bn.name} is not a state dict of tensors")
            self.state = state
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
            self.dtypes = {k: v.dtype for k, v in state.items()}
        else:
            raise SkillgraftError(f"adapter {root}: {ADAPTER_WEIGHTS[0]} is missing")

    def get(self, key: str, rows: int | None = None) -> torch.Tensor:
        if self.st is not None:
            return self.st.read(key, rows)
        t = self.state[key]
        return t if rows is None else t[:rows]

    def close(self) -> None:
        if self.st is not None:
            self.st.close()


def _lm_prefix(modules: list[str]) -> str:
    """The language model's prefix among the module paths: the longest known one holding decoder layers."""
    prefixes = {p for f in [CAUSAL_LM, *FAMILIES.values()] for p in f.prefixes}
    found = [p for p in prefixes if any(m.startswith(p + "layers.") for m in modules)]
    return max(found, key=len) if found else CAUSAL_LM.prefixes[0]


class LoraReader(DeltaReader):
    """A PEFT LoRA adapter directory as a task-vector checkpoint.

    ``base`` (a reader of the base LLM) is needed only when the adapter saves whole modules;
    ``require_base=False`` opens such an adapter without it, to describe it (its values then
    cannot be read).
    """

    kind = "LoRA adapter"
    format = "lora"

    def __init__(self, root: str | Path, base: CheckpointReader | None = None, *, require_base: bool = True):
        super().__init__(Path(root))
        self.saved_modules: list[str] = []
        self.adapter_config = read_adapter_config(self.root)
        self.w = _Weights(self.root)
        try:
            self._deltas: dict[str, _Delta] = {}
            self._base = base
            self._base_rel: dict[str, str] | None = None
            self._parse()
            if self.saved_modules and base is None and require_base:
                raise SkillgraftError(
                    f"adapter {self.root} saves whole modules ({', '.join(self.saved_modules)}) besides its LoRA "
                    f"factors; their change can only be taken against the base model: give the base")
        except BaseException:
            self.w.close()
            raise
        self._shapes = {n: d.shape for n, d in self._deltas.items()}
        self.lm_layout = LMLayout("peft_lora", PLAIN_PREFIX, HEAD, how="PEFT LoRA adapter (plain causal-LM names)")

    # -- parsing ----------------------------------------------------------------------
    def _parse(self) -> None:
        cfg = self.adapter_config
        keys = list(self.w.shapes)
        if not keys:
            raise SkillgraftError(f"adapter {self.root}: the weight file holds no tensors")
        rel = {k: k.removeprefix(PEFT_PREFIX) for k in keys}
        magnitude = [k for k in keys if "lora_magnitude_vector" in k]
        if magnitude:
            raise _refuse(self.root, "it holds DoRA magnitude vectors (lora_magnitude_vector)")
        modules = [re.sub(r"\.(lora_[AB]\.(weight|bias)|lora_embedding_[AB]|base_layer\.\w+|weight|bias)$", "", r)
                   for r in rel.values()]
        self.prefix = _lm_prefix(modules)
        lora: dict[str, dict[str, str]] = {}
        saved_to = set(cfg.get("modules_to_save") or [])
        for k, r in rel.items():
            m = _LINEAR.match(r) or _EMBED.match(r)
            if m:
                lora.setdefault(m.group("mod"), {})[m.group("ab") + ("e" if "embedding" in r else "")] = k
            elif (m := _BIAS.match(r)):
                lora.setdefault(m.group("mod"), {})["bias"] = k
            elif (m := _BASE_LAYER.match(r)) or ((m := _WHOLE.match(r)) and self._saved(m.group("mod"), saved_to)):
                self._add_whole(m.group("mod"), m.group("p"), k)
            else:
                raise SkillgraftError(f"adapter {self.root}: tensor {k} is neither a LoRA factor (lora_A, lora_B, "
                                      f"lora_embedding_A/B) nor part of a module listed in modules_to_save")
        for mod, parts in lora.items():
            self._add_lora(mod, parts)

    @staticmethod
    def _saved(module: str, saved: set[str]) -> bool:
        return any(module == s or module.endswith("." + s) for s in saved)

    def _plain(self, module: str, param: str = "weight") -> str | None:
        """Plain causal-LM name of ``module.param``; None for modules outside the language model."""
        if module in _HEAD_MODULES or module.endswith(".lm_head"):
            return f"lm_head.{param}"
        if module.startswith(self.prefix):
            return f"{PLAIN_PREFIX}{module[len(self.prefix):]}.{param}"
        return None

    def _entry(self, module: str, param: str, shape: tuple[int, ...]) -> _Delta | None:
        name = self._plain(module, param)
        if name is None:
            self.notes.append(f"adapter {self.root.name}: {module}.{param} is outside the language model; not used")
            return None
        d = self._deltas.setdefault(name, _Delta(tuple(shape)))
        if d.shape != tuple(shape):
            raise SkillgraftError(f"adapter {self.root}: {module}.{param} has two parts of different shapes "
                                  f"({list(d.shape)} and {list(shape)})")
        return d

    def _add_lora(self, module: str, parts: dict[str, str]) -> None:
        cfg = self.adapter_config
        emb = "Ae" in parts or "Be" in parts
        a, b = (parts.get("Ae"), parts.get("Be")) if emb else (parts.get("A"), parts.get("B"))
        if a is None or b is None:
            have, lack = ("lora_A", "lora_B") if a is not None else ("lora_B", "lora_A")
            raise SkillgraftError(f"adapter {self.root}: {module} has {have} but no {lack}")
        sa, sb = self.w.shapes[a], self.w.shapes[b]
        r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise SkillgraftError(f"adapter {self.root}: {module}: lora_A {list(sa)} and lora_B {list(sb)} "
                                  f"do not multiply (wrong shapes)")
        if sa[0] != r:
            raise SkillgraftError(f"adapter {self.root}: {module} has rank {sa[0]} in its weights but {r} in "
                                  f"{ADAPTER_CONFIG} (wrong shapes)")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        transposed = emb or bool(cfg.get("fan_in_fan_out"))
        shape = (sa[1], sb[0]) if transposed else (sb[0], sa[1])
        d = self._entry(module, "weight", shape)
        if d is not None:
            d.parts.append(_Part("lora", a=a, b=b, scaling=scaling, transposed=transposed))
        if "bias" in parts:
            bias = parts["bias"]
            if self.w.shapes[bias] != (sb[0],):
                raise SkillgraftError(f"adapter {self.root}: {module}: lora_B.bias is {list(self.w.shapes[bias])}, "
                                      f"expected [{sb[0]}] (wrong shapes)")
            d = self._entry(module, "bias", (sb[0],))
            if d is not None:
                d.parts.append(_Part("bias", b=bias, scaling=scaling))

    def _base_name(self, plain: str) -> str | None:
        if self._base is None:
            return None
        if self._base_rel is None:
            layout = detect_layout(self._base, "base")
            self._base_rel = {layout.lm_name(n): n for n in self._base.names if layout.lm_name(n) is not None}
        rel = plain.removeprefix(PLAIN_PREFIX)
        return self._base_rel.get(rel)

    def _add_whole(self, module: str, param: str, key: str) -> None:
        shape = self.w.shapes[key]
        plain = self._plain(module, param)
        if plain is None:
            self.notes.append(f"adapter {self.root.name}: {module}.{param} is outside the language model; not used")
            return
        self.saved_modules.append(module)
        if self._base is None:
            d = self._entry(module, param, shape)
            if d is not None:
                d.parts.append(_Part("whole", b=key))
            return
        bn = self._base_name(plain)
        if bn is None:
            raise SkillgraftError(f"adapter {self.root}: the base has no tensor for the saved module {module}.{param}")
        if self._base.shape(bn) != shape:
            raise SkillgraftError(f"adapter {self.root}: saved {module}.{param} is {list(shape)} but the base's "
                                  f"{bn} is {list(self._base.shape(bn))} (wrong shapes)")
        d = self._entry(module, param, shape)
        if d is not None:
            d.parts.append(_Part("whole", b=key, base_name=bn))

    # -- values -----------------------------------------------------------------------
    def _rows(self, name: str, rows: int | None) -> torch.Tensor:
        d = self._deltas[name]
        n = d.shape[0] if rows is None else rows
        out = torch.zeros((n, *d.shape[1:]))
        for p in d.parts:
            if p.kind == "lora":
                a, b = self.w.get(p.a).float(), self.w.get(p.b).float()
                part = (a[:, :n].T @ b.T) if p.transposed else (b[:n] @ a)
                out += part * p.scaling
            elif p.kind == "bias":
                out += self.w.get(p.b).float()[:n] * p.scaling
            elif self._base is None:
                raise SkillgraftError(f"adapter {self.root}: {name} is a saved whole module; give the base model")
            else:
                out += self.w.get(p.b, rows).float() - self._base.get_rows(p.base_name, rows).float()
        return out

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        d = self._deltas.get(name)
        if d is None or len(d.parts) != 1 or d.parts[0].kind != "lora":
            return None
        p = d.parts[0]
        a, b = self.w.get(p.a).float(), self.w.get(p.b).float()
        return (a.T.contiguous(), (b.T * p.scaling).contiguous()) if p.transposed else ((b * p.scaling), a)

    def describe(self) -> dict[str, Any]:
        cfg = self.adapter_config
        return {"kind": "lora", "format": "lora", "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
                "targets": sorted({n.rsplit(".", 1)[0] for n in self._deltas}), "notes": self.notes}

    def close(self) -> None:
        self.w.close()
