"""Where each VLM family keeps its language model, as data.

``prefixes`` are tried in order (the first one under which decoder layers exist wins), so the
longer transformers-5 prefix is listed before a legacy prefix that it extends. ``heads`` are the
possible full names of the LM head; none present means tied embeddings. ``skip_layers_key`` names
the config entry listing decoder layers that have no LLM counterpart (Mllama's cross-attention
layers): they are copied from the VLM, and LLM layer i maps to the i-th remaining layer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: tuple[str, ...]
    heads: tuple[str, ...]
    skip_layers_key: str | None = None
    notes: str = ""


# LLaVA-style: hub checkpoints use language_model.model.*, transformers 5 models hold model.language_model.*
_LLAVA_STYLE = (("model.language_model.", "language_model.model."), ("lm_head.weight", "language_model.lm_head.weight"))
_QWEN_VL = (("model.language_model.", "model."), ("lm_head.weight",))
_IDEFICS = (("model.text_model.",), ("lm_head.weight",))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llava", *_LLAVA_STYLE, notes="LLaVA 1.5"),
        Family("llava_next", *_LLAVA_STYLE, notes="LLaVA-NeXT"),
        Family("llava_next_video", *_LLAVA_STYLE, notes="LLaVA-NeXT-Video"),
        Family("llava_onevision", *_LLAVA_STYLE, notes="LLaVA-OneVision"),
        Family("gemma3", *_LLAVA_STYLE, notes="Gemma 3 (ties embeddings)"),
        Family("mistral3", *_LLAVA_STYLE, notes="Mistral Small 3.1"),
        Family("internvl", *_LLAVA_STYLE, notes="InternVL (transformers-native)"),
        Family("paligemma", *_LLAVA_STYLE, notes="PaliGemma (ties embeddings)"),
        Family("aya_vision", *_LLAVA_STYLE, notes="Aya Vision"),
        Family(
            "mllama",
            *_LLAVA_STYLE,
            skip_layers_key="text_config.cross_attention_layers",
            notes="Llama 3.2 Vision: cross-attention layers are VLM-only",
        ),
        Family("qwen2_vl", *_QWEN_VL, notes="Qwen2-VL (vision under visual.)"),
        Family("qwen2_5_vl", *_QWEN_VL, notes="Qwen2.5-VL (vision under visual.)"),
        Family("qwen3_vl", *_QWEN_VL, notes="Qwen3-VL dense"),
        Family("idefics2", *_IDEFICS, notes="Idefics2"),
        Family("idefics3", *_IDEFICS, notes="Idefics3"),
        Family("smolvlm", *_IDEFICS, notes="SmolVLM"),
    )
}

# A text-only causal LM (the usual expert and base): decoder under model., head lm_head.
CAUSAL_LM = Family("causal_lm", ("model.",), ("lm_head.weight",), notes="text-only causal LM")


def family_for(model_type: str | None) -> Family | None:
    """The known family for a config's ``model_type``, or None (then the layout is auto-detected)."""
    return FAMILIES.get(model_type or "")
