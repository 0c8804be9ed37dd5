"""mergekit configurations as skillgraft recipes.

A mergekit YAML (``merge_method``, ``base_model``, ``models[].parameters.weight/density``, gradients,
``dtype``, ``tokenizer_source``) describes a merge of LLMs. Given the VLM to inject into, it becomes a
recipe that merges the same way, with mergekit's defaults kept where they differ from ours:

- TIES and DELLA normalise by the agreeing weights (``normalize: true``); the other task-arithmetic
  methods do not;
- DARE and DELLA rescale the dropped task vector to keep its L1 norm (ours: ``rescale: l1``);
- a gradient (a list of values) is a per-layer schedule with the same interpolation over the depth.

The VLM's place: when ``vlm`` is one of the config's ``models``, it takes that model's place and the
merge is symmetric (the VLM's delta is weighted and sparsified as the config says: mergekit's own
arithmetic, to the last bit for deterministic methods). Otherwise the VLM is kept whole and the
config's models are injected as experts (inject mode). Anything without a counterpart (slices,
per-module filters, SCE, Karcher, ...) is refused by name rather than approximated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from ..methods import METHODS
from ..recipe import Recipe, read_yaml

# mergekit method -> (skillgraft method, mergekit's defaults for the shared parameters)
METHOD_MAP: dict[str, tuple[str, dict[str, Any]]] = {
    "task_arithmetic": ("ta", {}),
    "ties": ("ties", {"normalize": True}),
    "dare_ties": ("dare_ties", {"normalize": False, "rescale": True}),
    "dare_linear": ("dare", {"rescale": True}),
    "breadcrumbs": ("breadcrumbs", {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"normalize": False}),
    "della": ("della", {"normalize": True, "rescale": True}),
    "della_linear": ("della_linear", {"rescale": True}),
    "linear": ("linear", {"normalize": True}),
    "slerp": ("slerp", {}),
    "model_stock": ("model_stock", {}),
}
REFUSED = {
    "passthrough": "it stacks layers from different models (frankenmerges), which a VLM's language model cannot take",
    "sce": "SCE's variance-based selection has no skillgraft counterpart",
    "karcher": "the Karcher mean has no skillgraft counterpart",
    "nuslerp": "NuSLERP has no skillgraft counterpart (use slerp)",
    "multislerp": "Multi-SLERP has no skillgraft counterpart (use slerp with one expert)",
    "arcee_fusion": "Arcee Fusion has no skillgraft counterpart",
    "nearswap": "NearSwap has no skillgraft counterpart",
    "ram": "RAM has no skillgraft counterpart",
    "ramplus_tl": "RAM+ has no skillgraft counterpart",
}
# per-method parameters that mergekit sets per model but skillgraft holds once per merge
_SHARED_PER_MODEL = ("epsilon", "gamma")
_TOP_LEVEL = {"normalize", "rescale", "lambda", "t", "int8_mask", "epsilon", "gamma"}
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_IGNORED_KEYS = {"chat_template", "name"}  # harmless: the VLM's own chat template is kept


def is_mergekit_config(data: Any) -> bool:
    """A mapping with mergekit's ``merge_method`` key (and none of a skillgraft recipe's)."""
    return isinstance(data, dict) and "merge_method" in data and "experts" not in data


def load_config(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path, "mergekit config")
    if not is_mergekit_config(data):
        raise SkillgraftError(f"{Path(path)}: not a mergekit config (no merge_method)")
    return data


def convert_mergekit(config: dict[str, Any] | str | Path, vlm: str, *, source: str | None = None) -> Recipe:
    """The skillgraft recipe that merges like the mergekit ``config`` (a mapping or a YAML file),
    with ``vlm`` (a checkpoint directory or hub id) as the model that receives the merge."""
    if not isinstance(config, dict):
        source = source or str(config)
        config = load_config(config)
    where = source or "mergekit config"

    def fail(msg: str) -> SkillgraftError:
        return SkillgraftError(f"{where}: {msg}")

    method_mk = str(config.get("merge_method", ""))
    if method_mk in REFUSED:
        raise fail(f"merge_method {method_mk} is not supported: {REFUSED[method_mk]}")
    if method_mk not in METHOD_MAP:
        raise fail(f"merge_method {method_mk!r} is not supported; supported: {', '.join(METHOD_MAP)}")
    method, defaults = METHOD_MAP[method_mk]
    if "slices" in config:
        raise fail("slices (layer ranges per model) are not supported; describe the merge with models:")
    unknown = set(config) - {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                             "tokenizer_source", "tokenizer"} - _IGNORED_KEYS
    if unknown:
        raise fail(f"key {sorted(unknown)[0]!r} is not supported")
    models = config.get("models") or []
    if not isinstance(models, list) or not models:
        raise fail("models: expected a list of {model: ..., parameters: ...}")
    base = _ref(config.get("base_model"), "base_model", fail)

    top = dict(config.get("parameters") or {})
    bad = set(top) - _TOP_LEVEL
    if bad:
        raise fail(f"parameter {sorted(bad)[0]!r} is not supported")
    for k, v in top.items():
        _scalar(v, f"parameters.{k}", fail)
    params: dict[str, Any] = {}
    for k, v in {**defaults, **{k: v for k, v in top.items() if k in ("normalize", "rescale")}}.items():
        if k == "rescale":
            params["rescale"] = "l1" if v else False  # mergekit's rescale keeps the L1 norm
        elif k == "normalize" and _has_param(method, k):
            params[k] = bool(v)
        elif k == "normalize" and v:
            raise fail(f"normalize: true is not supported for {method_mk}")
    if "lambda" in top and _has_param(method, "lambda"):
        params["lambda"] = float(top["lambda"])
    if "t" in top:
        if method != "slerp":
            raise fail("parameter t belongs to slerp")
        params["t"] = top["t"]

    entries = []
    per_model: dict[str, set[float]] = {k: set() for k in _SHARED_PER_MODEL}
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise fail(f"models[{i}]: expected a mapping with a model key")
        ref = _ref(m["model"], f"models[{i}].model", fail)
        p = dict(m.get("parameters") or {})
        extra = set(p) - {"weight", "density", *_SHARED_PER_MODEL}
        if extra:
            raise fail(f"models[{i}]: parameter {sorted(extra)[0]!r} is not supported")
        weight = _gradient(p.get("weight", 1.0), f"models[{i}].weight", fail)
        density = _density(p.get("density", 1.0), f"models[{i}].density", fail)
        for k in _SHARED_PER_MODEL:
            if k in p:
                per_model[k].add(_scalar(p[k], f"models[{i}].{k}", fail))
        entries.append((ref, weight, density))
    for k, values in per_model.items():
        if k in top:
            values.add(_scalar(top[k], f"parameters.{k}", fail))
        if len(values) > 1:
            raise fail(f"{k} differs between models; skillgraft uses one {k} per merge")
        if values:
            params[k] = values.pop()

    def same(a: str | None, b: str | None) -> bool:
        if a is None or b is None:
            return False
        if a == b:
            return True
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()

    dtype = config.get("out_dtype") or config.get("dtype")
    recipe: dict[str, Any] = {"vlm": vlm, "base": base, "method": method, "parameters": params}
    if dtype is not None:
        if str(dtype) not in _DTYPES:
            raise fail(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
        recipe["dtype"] = _DTYPES[str(dtype)]
    _check_tokenizer(config, vlm, base, same, fail)

    kind_interp = method in ("linear", "slerp")
    mine = [e for e in entries if same(e[0], vlm)]
    others = [e for e in entries if not same(e[0], vlm) and not (base is not None and same(e[0], base) and not kind_interp)]
    if method == "slerp":
        return _slerp(recipe, config, entries, vlm, base, same, fail, where)
    if mine:
        _ref_, w, d = mine[0]
        if isinstance(w, list) or isinstance(d, list):
            what = "weight" if isinstance(w, list) else "density"
            raise fail(f"the VLM's own {what} cannot be a gradient; give it a number")
        recipe["vlm_weight"] = w
        recipe["vlm_density"] = d
        recipe["mode"] = "inject" if kind_interp else "symmetric"
    elif kind_interp:
        raise fail(f"{method_mk} averages the models listed; the VLM ({vlm}) must be one of them")
    else:
        recipe["mode"] = "inject"
    if not others:
        raise fail("no model left to inject: list the expert(s) under models")
    recipe["experts"] = [{"model": r, "scale": w, "density": d} for r, w, d in others]
    return Recipe.from_dict(recipe, where)


def _slerp(recipe: dict[str, Any], config: dict[str, Any], entries: list, vlm: str, base: str | None,
           same: Any, fail: Any, where: str) -> Recipe:
    """mergekit's slerp runs from ``base_model`` (t=0) to the other model (t=1)."""
    refs = [e[0] for e in entries]
    if base is not None and not any(same(r, base) for r in refs):
        refs = [base, *refs]
    if len(refs) != 2:
        raise fail("slerp interpolates exactly two models")
    if not any(same(r, vlm) for r in refs):
        raise fail(f"slerp interpolates the two models listed; the VLM ({vlm}) must be one of them")
    other = next(r for r in refs if not same(r, vlm))
    t = recipe["parameters"].get("t", 0.5)
    if isinstance(t, list):
        raise fail("a gradient of t is not supported; give one number")
    t = float(t)
    vlm_is_start = base is None or same(base, vlm)
    recipe["parameters"]["t"] = t if vlm_is_start else 1.0 - t
    recipe["base"] = None
    recipe["mode"] = "inject"
    recipe["experts"] = [{"model": other}]
    return Recipe.from_dict(recipe, where)


def _check_tokenizer(config: dict[str, Any], vlm: str, base: str | None, same: Any, fail: Any) -> None:
    """skillgraft keeps the VLM's tokenizer and processor; a config that asks for another is refused."""
    src = config.get("tokenizer_source")
    if "tokenizer" in config:
        raise fail("tokenizer: (a merged vocabulary) is not supported; the VLM's tokenizer is kept")
    if src is None or same(str(src), vlm) or (src == "base" and same(base, vlm)):
        return
    raise fail(f"tokenizer_source: {src} is not supported: the output keeps the VLM's tokenizer and processor "
               f"(omit tokenizer_source, or name the VLM)")


def _has_param(method: str, name: str) -> bool:
    return any(p.name == name for p in METHODS[method].params)


def _ref(v: Any, where: str, fail: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):  # mergekit's {model: ..., lora: ...} form
        if set(v) - {"model"}:
            raise fail(f"{where}: only a plain model reference is supported (no LoRA or overrides)")
        v = v.get("model")
    if not isinstance(v, str) or not v:
        raise fail(f"{where}: expected a model path or hub id")
    if "+" in v:
        raise fail(f"{where}: model+lora references are not supported")
    return v


def _scalar(v: Any, where: str, fail: Any) -> float:
    if isinstance(v, list):
        if any(isinstance(x, dict) for x in v):
            raise fail(f"{where}: per-module filters are not supported; give one value or a gradient")
        raise fail(f"{where}: a gradient is not supported here; give one number")
    if isinstance(v, dict):
        raise fail(f"{where}: per-module filters are not supported; give one value")
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise fail(f"{where}: {v!r} is not a number") from None


def _gradient(v: Any, where: str, fail: Any) -> float | list[float]:
    """A number, or a gradient (list of numbers) = a per-layer schedule with mergekit's interpolation."""
    if isinstance(v, list):
        if not v:
            raise fail(f"{where}: an empty gradient")
        if any(isinstance(x, dict) for x in v):
            raise fail(f"{where}: per-module filters (filter: ...) are not supported; give one value or a gradient")
        out = [_scalar(x, where, fail) for x in v]
        return out[0] if len(out) == 1 else out
    return _scalar(v, where, fail)


def _density(v: Any, where: str, fail: Any) -> float | list[float]:
    """A density in (0, 1], or a gradient of them: a per-layer density schedule, interpolated like a weight's."""
    d = _gradient(v, where, fail)
    if not all(0 < x <= 1 for x in (d if isinstance(d, list) else [d])):
        raise fail(f"{where}: density must lie in (0, 1]")
    return d
