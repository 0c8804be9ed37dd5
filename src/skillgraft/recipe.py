"""The recipe: everything that determines a merge, as a pydantic model, YAML in and out.

A recipe written next to a merged checkpoint (`skillgraft_recipe.yaml`) reproduces it
exactly with `skillgraft inject --recipe skillgraft_recipe.yaml -o OUT`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SkillgraftError
from .methods import METHODS

DType = Literal["auto", "float32", "bfloat16", "float16"]
Mode = Literal["inject", "symmetric"]
MAX_WEIGHT = 100.0  # |scale|, |vlm_weight| and schedule multipliers: far past any useful merge, well short of overflow


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in ``text``; invalid YAML is a one-line error naming ``source``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SkillgraftError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in the file ``path``; a missing file is a one-line error naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise SkillgraftError(f"{what} not found: {p}")
    return parse_yaml(p.read_text(), str(p))


def _weight(v: Any, what: str) -> float:
    """``v`` as a float when it is a finite number within +-MAX_WEIGHT, else a ValueError saying so."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"{what} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} must be a number, got {v!r}")
    if not math.isfinite(v) or abs(v) > MAX_WEIGHT:
        raise ValueError(f"{what} must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {v!r}")
    return float(v)


# Every float in a recipe is finite (pydantic refuses NaN and infinities), and assignments are validated too.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


class ExpertSpec(BaseModel):
    """One expert LLM and how strongly its task vector is applied."""

    model_config = _STRICT

    model: str = Field(description="checkpoint directory or hub id of the expert LLM")
    name: str | None = Field(default=None, description="label used in reports; defaults to the directory name")
    scale: float | list[float] = Field(
        default=1.0,
        description="lambda: weight of this expert's task vector, or a per-layer schedule "
        "(values spread evenly over the decoder depth and interpolated; N values for N layers = per layer)",
    )
    density: float | list[float] = Field(
        default=1.0,
        description="fraction of the delta kept by sparsifying methods, in (0, 1], or a per-layer schedule like scale",
    )

    @field_validator("scale", mode="before")
    @classmethod
    def _finite_scale(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [_weight(x, "every scale in a schedule") for x in v]
        return _weight(v, "scale")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        ref = self.model.rstrip("/")
        name = Path(ref).name or self.model
        if "@" in name and not Path(ref).expanduser().is_dir():  # a hub id's revision is not part of its name
            name = name.split("@", 1)[0]
        return name


class Recipe(BaseModel):
    """A complete merge: the VLM, its base LLM, the experts, the method and its settings."""

    model_config = _STRICT

    vlm: str = Field(description="target model: a VLM (or an LLM) checkpoint directory or hub id")
    base: str | None = Field(default=None, description="base LLM both the VLM's LM and the experts derive from")
    experts: list[ExpertSpec] = Field(min_length=1)
    method: str = "ta"
    mode: Mode = Field(
        default="inject",
        description="inject: VLM kept whole, only expert deltas are merged; "
        "symmetric: the VLM delta is one more task vector",
    )
    vlm_weight: float = Field(default=1.0, description="weight of the VLM's own delta (symmetric mode)")
    vlm_density: float = Field(default=1.0, gt=0.0, le=1.0, description="density of the VLM's delta (symmetric mode)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="method-specific parameters")
    seed: int = 0
    dtype: DType = "auto"
    exclude: list[str] = Field(
        default_factory=list,
        description="LM module kinds (attention, mlp, norm, embed, lm_head) or regexes on LM-relative "
        "names (e.g. 'layers\\.(0|1)\\.') whose tensors are kept from the VLM",
    )
    schedule: list[float] | None = Field(
        default=None,
        description="multiplier of every expert's scale over the decoder depth (mergekit-gradient semantics)",
    )
    allow_arch_mismatch: bool = Field(
        default=False,
        description="merge an expert whose model_type differs from the VLM's language model (shapes must still match)",
    )
    allow_vocab_mismatch: bool = Field(
        default=False, description="merge vocabulary rows although the tokenizers assign different ids to tokens"
    )

    @field_validator("parameters")
    @classmethod
    def _finite_parameters(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name, x in v.items():
            for item in x if isinstance(x, (list, tuple)) else [x]:
                try:  # "nan" and "inf" read as words: still not finite
                    number = float(item) if isinstance(item, (float, str)) else 0.0
                except ValueError:
                    continue
                if not math.isfinite(number):
                    raise ValueError(f"method parameter {name} must be a finite number, got {item!r}")
        return v

    @field_validator("vlm_weight")
    @classmethod
    def _finite_vlm_weight(cls, v: float) -> float:
        return _weight(v, "vlm_weight")

    @field_validator("schedule")
    @classmethod
    def _finite_schedule(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("a schedule needs at least one value")
            v = [_weight(x, "every schedule value") for x in v]
        return v

    @field_validator("experts")
    @classmethod
    def _schedules_not_empty(cls, v: list[ExpertSpec]) -> list[ExpertSpec]:
        for e in v:
            for what, value in (("scale", e.scale), ("density", e.density)):
                if isinstance(value, list) and not value:
                    raise ValueError(f"a {what} schedule needs at least one value")
            for d in e.density if isinstance(e.density, list) else [e.density]:
                if not 0.0 < d <= 1.0:
                    raise ValueError(f"density must be in (0, 1], got {d}")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of: {', '.join(sorted(METHODS))}")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "recipe") -> "Recipe":
        return cls._from_document(parse_yaml(text, source), source)

    @classmethod
    def _from_document(cls, data: Any, source: str) -> "Recipe":
        if not isinstance(data, dict):
            raise SkillgraftError(f"{source}: expected a mapping with keys vlm, base, experts, ...")
        if "merge_method" in data and "experts" not in data:
            raise SkillgraftError(
                f"{source} is a mergekit config; convert it with skillgraft.convert_mergekit({source!r}, vlm=VLM)",
                cli=f"{source} is a mergekit config; give the VLM to merge into with --vlm VLM "
                f"(or write a recipe: skillgraft convert {source} --vlm VLM -o recipe.yaml)",
            )
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            msg = first["msg"].removeprefix("Value error, ")
            raise SkillgraftError(f"{source}: {where}: {msg}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls._from_document(read_yaml(path, "recipe file"), str(Path(path)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())
