"""Tiny, real-transformers checkpoint triples (VLM, base LLM, expert LLM) per VLM family.

Every family here builds, into a directory, with the real transformers classes:

- ``base/``   a tiny text-only causal LM (random init, seeded) + tokenizer,
- ``expert/`` the same causal LM with a small perturbation of every weight (the "skill"),
- ``vlm/``    a tiny VLM of the family whose language model is *derived from base*
  (base weights copied into the VLM's LM, then a different small perturbation), with a
  larger vocabulary (extra image / special tokens) for most families, + tokenizer
  (and an image processor where one can be built without extra packages).

The VLM checkpoint can be written in three layouts:

- ``"saved"``:  exactly what ``save_pretrained`` of the installed transformers (5.24) writes.
  It reverse-converts the LM to the hub keys (``language_model.model.layers.N``,
  ``language_model.lm_head``; Qwen2-VL/2.5-VL ``model.layers.N``, ``visual.``), but for
  LLaVA-style models with a CLIP/SigLIP tower (LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video,
  LLaVA-OneVision, Gemma 3, PaliGemma, Aya Vision) it writes ``vision_tower.embeddings...``
  without the hub's inner ``vision_model.``: a layout of its own.
- ``"legacy"``: the hub layout (``vision_tower.vision_model.*`` for CLIP/SigLIP towers).
  Identical to "saved" for Qwen2-VL, Qwen2.5-VL, Mistral 3, InternVL, Mllama.
- ``"v5"``:     the transformers 5 module names (``model.language_model.*``,
  ``model.vision_tower.*``, ``lm_head.*``), i.e. the in-memory ``state_dict`` names.

transformers 5.24 loads all three layouts of every family back to the same weights (no
missing or unexpected keys). Families without a key conversion in transformers (Idefics2,
Idefics3, SmolVLM, Qwen3-VL: ``model.text_model.*`` / ``model.language_model.*`` on the hub)
have one layout only: legacy == v5 == saved; ``distinct_layouts`` lists what differs on disk.

Vocabularies: base/expert have BASE_VOCAB (96) rows; the VLMs add their image/special tokens
(100 or 104 rows). Mllama keeps lm_head at 96 rows and has embed_tokens with 96 + 8 rows
(its ``<|image|>`` token, id 96, lives in the extra rows), as Llama 3.2 Vision does.
Gemma 3, PaliGemma and Aya Vision (a Cohere2 LM) tie embeddings (no lm_head in the file); all
others are untied.

Nothing here imports skillgraft: this is the independent side of the engine tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transformers as tf

BASE_VOCAB = 96
SEED = 1234
# perturbations relative to each tensor's RMS: fine-tunes move weights by a few percent
VLM_NOISE = 0.02
EXPERT_NOISE = 0.04

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------


def _base_vocab_tokens(n: int = BASE_VOCAB) -> list[str]:
    words = [f"w{i}" for i in range(n - len(SPECIALS))]
    return SPECIALS + words


def make_tokenizer(extra_tokens: list[str]) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer: 4 specials + words (BASE_VOCAB in all), then ``extra_tokens``
    as added special tokens (ids BASE_VOCAB, BASE_VOCAB+1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    toks = _base_vocab_tokens()
    vocab = {t: i for i, t in enumerate(toks)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    assert len(fast) == BASE_VOCAB + len(extra_tokens), (len(fast), extra_tokens)
    return fast


# --------------------------------------------------------------------------------------
# family description
# --------------------------------------------------------------------------------------


@dataclass
class Family:
    name: str
    vlm_cls: type
    base_cls: type
    # builds (vlm_config, base_config); receives the token->id map of the VLM tokenizer
    configs: Callable[[dict[str, int]], tuple[Any, Any]]
    extra_tokens: list[str]
    # inputs(model, config, tok_ids) -> dict of tensors for one forward pass with an image
    make_inputs: Callable[[Any, Any, dict[str, int]], dict[str, torch.Tensor]]
    # in-memory (v5) prefix of the LM's base model inside the VLM ("model." in the LLM)
    lm_prefix: str = "model.language_model."
    # in-memory -> hub legacy rename, ordered (first matching prefix wins)
    legacy_renames: list[tuple[str, str]] = field(default_factory=list)
    # LLM layer i -> VLM layer j (Mllama); None: identity
    layer_map: Callable[[Any], dict[int, int]] | None = None
    tied: bool = False
    # does transformers' save_pretrained write exactly the hub legacy keys? (LLaVA-style models with a
    # CLIP/SigLIP tower: no - transformers 5 drops the tower's inner "vision_model." prefix)
    saved_is_legacy: bool = True
    image_processor: Callable[[Any], Any] | None = None
    notes: str = ""

    # -- naming --------------------------------------------------------------------
    def to_legacy(self, key: str) -> str:
        for src, dst in self.legacy_renames:
            if key.startswith(src):
                return dst + key[len(src):]
        return key

    @property
    def has_legacy(self) -> bool:
        return bool(self.legacy_renames)


# LLaVA-style in-memory -> hub names. Vision towers that are CLIP/SigLIP vision models keep
# their inner "vision_model." prefix on the hub (transformers 5 strips it in memory).
def _llava_renames(vision_inner: str = "vision_model.", extra: list[tuple[str, str]] | None = None):
    r = [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower." + vision_inner),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ]
    return r + (extra or [])


# --------------------------------------------------------------------------------------
# small config helpers
# --------------------------------------------------------------------------------------

H = 32  # text hidden
I = 64  # text intermediate
L = 2  # text layers
NH = 4
KV = 2


def _llama(vocab: int, **kw):
    return tf.LlamaConfig(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw,
    )


def _mistral(vocab: int, **kw):
    return tf.MistralConfig(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, max_position_embeddings=256, tie_word_embeddings=False, head_dim=H // NH,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, sliding_window=None, **kw,
    )


def _qwen2(vocab: int, **kw):
    return tf.Qwen2Config(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw,
    )


def _clip_vision(image_size=28, patch=14):
    return tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )


def _siglip_vision(image_size=28, patch=14, hidden=32):
    return tf.SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )


def _ids(tok_ids: dict[str, int], n_image: int, image_tok: str, before: list[str] | None = None,
         after: list[str] | None = None, bos: bool = True) -> torch.Tensor:
    seq: list[int] = [1] if bos else []
    seq += [10, 11]
    seq += [tok_ids[t] for t in (before or [])]
    seq += [tok_ids[image_tok]] * n_image
    seq += [tok_ids[t] for t in (after or [])]
    seq += [12, 13, 14]
    return torch.tensor([seq], dtype=torch.long)


def _pix(*shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(*shape, generator=g)


# --------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------

# ---- LLaVA 1.5 -----------------------------------------------------------------------
def _llava_configs(t):
    vocab = BASE_VOCAB + 4  # <image> + 3 padding rows (hub LLaVA pads the vocab too)
    cfg = tf.LlavaConfig(vision_config=_clip_vision(), text_config=_llama(vocab), image_token_id=t["<image>"],
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=4, tie_word_embeddings=False)
    return cfg, _llama(BASE_VOCAB)


def _llava_inputs(model, cfg, t):
    return {"pixel_values": _pix(1, 3, 28, 28), "input_ids": _ids(t, 4, "<image>")}


def _clip_image_processor(size: int):
    def make(cfg):
        return tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return make


def _image_processor(cls_name: str, **kw):
    def make(cfg):
        return getattr(tf, cls_name)(**kw)
    return make


# ---- LLaVA-NeXT ----------------------------------------------------------------------
def _llava_next_configs(t):
    vocab = BASE_VOCAB + 4
    cfg = tf.LlavaNextConfig(vision_config=_clip_vision(), text_config=_mistral(vocab), image_token_index=t["<image>"],
                             image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=4, tie_word_embeddings=False)
    return cfg, _mistral(BASE_VOCAB)


def _count_image_features(model, **kw) -> int:
    with torch.no_grad():
        out = model.model.get_image_features(**kw)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
    return feats.reshape(-1, feats.shape[-1]).shape[0]


def _llava_next_inputs(model, cfg, t):
    # one image of 28x56 -> best pinpoint [28, 56]: base crop + 2 tiles
    pv = _pix(1, 3, 3, 28, 28)
    sizes = torch.tensor([[28, 56]])
    n = _count_image_features(model, pixel_values=pv, image_sizes=sizes)
    return {"pixel_values": pv, "image_sizes": sizes, "input_ids": _ids(t, n, "<image>")}


# ---- LLaVA-NeXT-Video ----------------------------------------------------------------
def _llava_next_video_configs(t):
    vocab = BASE_VOCAB + 4
    cfg = tf.LlavaNextVideoConfig(vision_config=_clip_vision(), text_config=_llama(vocab),
                                  image_token_index=t["<image>"], video_token_index=t["<video>"],
                                  image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]], vision_feature_layer=-2,
                                  vision_feature_select_strategy="default", spatial_pool_stride=2,
                                  image_seq_length=4, video_seq_length=1, tie_word_embeddings=False)
    return cfg, _llama(BASE_VOCAB)


def _llava_next_video_inputs(model, cfg, t):
    """One image (28x56: base crop + 2 tiles) and one video of 2 frames, in one sequence."""
    pv = _pix(1, 3, 3, 28, 28)
    sizes = torch.tensor([[28, 56]])
    n_image = _count_image_features(model, pixel_values=pv, image_sizes=sizes)
    video = _pix(1, 2, 3, 28, 28)
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=video)
    feats = getattr(out, "pooler_output", out)
    n_video = feats.reshape(-1, feats.shape[-1]).shape[0]
    ids = _ids(t, n_image, "<image>", after=["<video>"] * n_video)
    return {"pixel_values": pv, "image_sizes": sizes, "pixel_values_videos": video, "input_ids": ids}


# ---- LLaVA-OneVision -----------------------------------------------------------------
def _llava_ov_configs(t):
    vocab = BASE_VOCAB + 4
    cfg = tf.LlavaOnevisionConfig(vision_config=_siglip_vision(), text_config=_qwen2(vocab),
                                  image_token_index=t["<image>"], video_token_index=t["<video>"],
                                  image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  tie_word_embeddings=False)
    return cfg, _qwen2(BASE_VOCAB)


def _llava_ov_inputs(model, cfg, t):
    pv = _pix(1, 3, 3, 28, 28)
    sizes = torch.tensor([[28, 56]])
    n = _count_image_features(model, pixel_values=pv, image_sizes=sizes)
    return {"pixel_values": pv, "image_sizes": sizes, "input_ids": _ids(t, n, "<image>")}


# ---- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ------------------------------------------------
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_ids(t, n):
    return _ids(t, n, "<|image_pad|>", before=["<|vision_start|>"], after=["<|vision_end|>"])


def _qwen2_vl_configs(t):
    vocab = BASE_VOCAB + 8
    text = dict(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                num_key_value_heads=KV, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(depth=2, embed_dim=32, hidden_size=H, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=t["<|image_pad|>"],
                           video_token_id=t["<|video_pad|>"], vision_start_token_id=t["<|vision_start|>"],
                           vision_end_token_id=t["<|vision_end|>"], tie_word_embeddings=False)
    return cfg, _qwen2(BASE_VOCAB)


def _qwen_vl_inputs(patch: int):
    def make(model, cfg, t):
        grid = torch.tensor([[1, 4, 4]])
        pv = _pix(16, 3 * 2 * patch * patch)
        ids = _qwen_ids(t, 4)
        mm = (ids == t["<|image_pad|>"]).long()  # 0 text, 1 image, 2 video
        return {"pixel_values": pv, "image_grid_thw": grid, "input_ids": ids, "mm_token_type_ids": mm}
    return make


def _qwen25_vl_configs(t):
    vocab = BASE_VOCAB + 8
    text = dict(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                num_key_value_heads=KV, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=H, fullatt_block_indexes=[1])
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=t["<|image_pad|>"],
                              video_token_id=t["<|video_pad|>"], vision_start_token_id=t["<|vision_start|>"],
                              vision_end_token_id=t["<|vision_end|>"], tie_word_embeddings=False)
    return cfg, _qwen2(BASE_VOCAB)


def _qwen3(vocab: int, **kw):
    return tf.Qwen3Config(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw,
    )


def _qwen3_vl_configs(t):
    vocab = BASE_VOCAB + 8
    text = dict(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                num_key_value_heads=KV, head_dim=8, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=H, num_position_embeddings=16, deepstack_visual_indexes=[0])
    cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=t["<|image_pad|>"],
                           video_token_id=t["<|video_pad|>"], vision_start_token_id=t["<|vision_start|>"],
                           vision_end_token_id=t["<|vision_end|>"], tie_word_embeddings=False)
    return cfg, _qwen3(BASE_VOCAB)


# ---- Idefics2 ------------------------------------------------------------------------
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def _idefics2_configs(t):
    vocab = BASE_VOCAB + 4
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14)
    perceiver = dict(hidden_act="silu", resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=8, num_key_value_heads=1)
    cfg = tf.Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=_mistral(vocab).to_dict(),
                            image_token_id=t["<image>"], tie_word_embeddings=False)
    return cfg, _mistral(BASE_VOCAB)


def _idefics_inputs(n_tokens: int, size: int):
    def make(model, cfg, t):
        pv = _pix(1, 1, 3, size, size)
        mask = torch.ones(1, 1, size, size, dtype=torch.bool)
        ids = _ids(t, n_tokens, "<image>", before=["<fake_token_around_image>"], after=["<fake_token_around_image>"])
        return {"pixel_values": pv, "pixel_attention_mask": mask, "input_ids": ids}
    return make


# ---- Idefics3 / SmolVLM -------------------------------------------------------------
def _idefics3_configs(t):
    vocab = BASE_VOCAB + 4
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    cfg = tf.Idefics3Config(vision_config=vision, text_config=_llama(vocab).to_dict(), image_token_id=t["<image>"],
                            scale_factor=2, tie_word_embeddings=False)
    return cfg, _llama(BASE_VOCAB)


def _smolvlm_configs(t):
    vocab = BASE_VOCAB + 4
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    cfg = tf.SmolVLMConfig(vision_config=vision, text_config=_llama(vocab).to_dict(), image_token_id=t["<image>"],
                           scale_factor=2, tie_word_embeddings=False)
    return cfg, _llama(BASE_VOCAB)


# ---- Gemma 3 -------------------------------------------------------------------------
GEMMA3_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _gemma3_text(vocab: int):
    return tf.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=256,
        sliding_window=16, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def _gemma3_configs(t):
    vocab = BASE_VOCAB + 4
    cfg = tf.Gemma3Config(text_config=_gemma3_text(vocab), vision_config=_siglip_vision(image_size=56),
                          mm_tokens_per_image=4, boi_token_index=t["<start_of_image>"],
                          eoi_token_index=t["<end_of_image>"], image_token_index=t["<image_soft_token>"],
                          tie_word_embeddings=True)
    return cfg, _gemma3_text(BASE_VOCAB)


def _gemma3_inputs(model, cfg, t):
    ids = _ids(t, 4, "<image_soft_token>", before=["<start_of_image>"], after=["<end_of_image>"])
    tt = (ids == t["<image_soft_token>"]).long()
    return {"pixel_values": _pix(1, 3, 56, 56), "input_ids": ids, "token_type_ids": tt}


# ---- Mistral 3 -----------------------------------------------------------------------
MISTRAL3_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def _mistral3_configs(t):
    vocab = BASE_VOCAB + 4
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14, head_dim=8)
    cfg = tf.Mistral3Config(vision_config=vision, text_config=_mistral(vocab), image_token_index=t["[IMG]"],
                            spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    return cfg, _mistral(BASE_VOCAB)


def _mistral3_inputs(model, cfg, t):
    ids = _ids(t, 2, "[IMG]", after=["[IMG_BREAK]", "[IMG]", "[IMG]", "[IMG_END]"])
    return {"pixel_values": _pix(1, 3, 56, 56), "image_sizes": torch.tensor([[56, 56]]), "input_ids": ids}


# ---- InternVL (transformers-native) ---------------------------------------------------
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]


def _internvl_configs(t):
    vocab = BASE_VOCAB + 4
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=[56, 56], patch_size=[14, 14])
    cfg = tf.InternVLConfig(vision_config=vision, text_config=_qwen2(vocab), image_token_id=t["<IMG_CONTEXT>"],
                            image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
                            tie_word_embeddings=False)
    return cfg, _qwen2(BASE_VOCAB)


def _internvl_inputs(model, cfg, t):
    ids = _ids(t, 4, "<IMG_CONTEXT>", before=["<img>"], after=["</img>"])
    return {"pixel_values": _pix(1, 3, 56, 56), "input_ids": ids}


# ---- PaliGemma -----------------------------------------------------------------------
def _gemma(vocab: int):
    return tf.GemmaConfig(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def _paligemma_configs(t):
    vocab = BASE_VOCAB + 4
    cfg = tf.PaliGemmaConfig(vision_config=_siglip_vision(), text_config=_gemma(vocab), image_token_index=t["<image>"],
                             projection_dim=H, tie_word_embeddings=True)
    return cfg, _gemma(BASE_VOCAB)


def _paligemma_inputs(model, cfg, t):
    seq = [t["<image>"]] * 4 + [1, 10, 11, 12, 2]
    ids = torch.tensor([seq])
    tt = torch.tensor([[0] * len(seq)])
    return {"pixel_values": _pix(1, 3, 28, 28), "input_ids": ids, "token_type_ids": tt}


# ---- Aya Vision ----------------------------------------------------------------------
AYA_TOKENS = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>"]


def _cohere2(vocab: int):
    return tf.Cohere2Config(
        vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, max_position_embeddings=256, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def _aya_vision_configs(t):
    vocab = BASE_VOCAB + 4
    cfg = tf.AyaVisionConfig(vision_config=_siglip_vision(image_size=56), text_config=_cohere2(vocab),
                             image_token_index=t["<|IMG_PATCH|>"], downsample_factor=2,
                             vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True)
    return cfg, _cohere2(BASE_VOCAB)


def _aya_vision_inputs(model, cfg, t):
    # 56x56 at patch 14: 16 patches, pixel-shuffled by 2 into 4 image tokens
    ids = _ids(t, 4, "<|IMG_PATCH|>", before=["<|START_OF_IMG|>"], after=["<|END_OF_IMG|>"])
    return {"pixel_values": _pix(1, 3, 56, 56), "input_ids": ids}


# ---- Mllama (Llama 3.2 Vision) -------------------------------------------------------
MLLAMA_CROSS = [1, 4]  # text layers 0..5: 1 and 4 are cross-attention, LLM layers 0..3 -> 0, 2, 3, 5
MLLAMA_LLM_LAYERS = 4


def _mllama_configs(t):
    # lm_head/vocab_size == base vocab; embed_tokens has vocab_size + 8 rows (the <|image|> token lives there)
    text = tf.MllamaTextConfig(vocab_size=BASE_VOCAB, hidden_size=H, intermediate_size=I,
                               num_hidden_layers=MLLAMA_LLM_LAYERS + len(MLLAMA_CROSS), num_attention_heads=NH,
                               num_key_value_heads=KV, max_position_embeddings=256,
                               cross_attention_layers=list(MLLAMA_CROSS), tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2, pad_token_id=3,
                               rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    vision = tf.MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                                   intermediate_size=64, vision_output_dim=64, image_size=28, patch_size=14,
                                   max_num_tiles=2, intermediate_layers_indices=[0],
                                   supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    cfg = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=BASE_VOCAB)
    base = tf.LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=H, intermediate_size=I, num_hidden_layers=MLLAMA_LLM_LAYERS,
                          num_attention_heads=NH, num_key_value_heads=KV, max_position_embeddings=256,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return cfg, base


def _mllama_layer_map(cfg) -> dict[int, int]:
    n = cfg.text_config.num_hidden_layers
    self_layers = [j for j in range(n) if j not in set(cfg.text_config.cross_attention_layers)]
    return {i: j for i, j in enumerate(self_layers)}


def _mllama_inputs(model, cfg, t):
    ids = _ids(t, 1, "<|image|>")
    seq = ids.shape[1]
    pv = _pix(1, 1, 2, 3, 28, 28)
    ar_ids = torch.tensor([[2]])  # aspect ratio [1, 2] -> 2 tiles
    ar_mask = torch.tensor([[[1, 1]]])
    img_pos = int((ids[0] == t["<|image|>"]).nonzero()[0])
    cam = torch.zeros(1, seq, 1, 2, dtype=torch.long)
    cam[0, img_pos:, 0, :] = 1
    return {"pixel_values": pv, "aspect_ratio_ids": ar_ids, "aspect_ratio_mask": ar_mask, "input_ids": ids,
            "cross_attention_mask": cam}


FAMILIES: dict[str, Family] = {}


def _register(f: Family) -> None:
    FAMILIES[f.name] = f


_register(Family("llava", tf.LlavaForConditionalGeneration, tf.LlamaForCausalLM, _llava_configs, ["<image>"],
                 _llava_inputs, legacy_renames=_llava_renames(), image_processor=_clip_image_processor(28), saved_is_legacy=False))
_register(Family("llava_next", tf.LlavaNextForConditionalGeneration, tf.MistralForCausalLM, _llava_next_configs,
                 ["<image>"], _llava_next_inputs,
                 legacy_renames=_llava_renames(extra=[("model.image_newline", "image_newline")]), saved_is_legacy=False))
_register(Family("llava_onevision", tf.LlavaOnevisionForConditionalGeneration, tf.Qwen2ForCausalLM,
                 _llava_ov_configs, ["<image>", "<video>"], _llava_ov_inputs,
                 legacy_renames=_llava_renames(extra=[("model.image_newline", "image_newline")]), saved_is_legacy=False))
_register(Family("llava_next_video", tf.LlavaNextVideoForConditionalGeneration, tf.LlamaForCausalLM,
                 _llava_next_video_configs, ["<image>", "<video>"], _llava_next_video_inputs,
                 legacy_renames=_llava_renames(extra=[("model.image_newline", "image_newline")]), saved_is_legacy=False))
_register(Family("qwen2_vl", tf.Qwen2VLForConditionalGeneration, tf.Qwen2ForCausalLM, _qwen2_vl_configs,
                 QWEN_TOKENS, _qwen_vl_inputs(14),
                 legacy_renames=[("model.language_model.", "model."), ("model.visual.", "visual.")],
                 image_processor=_image_processor("Qwen2VLImageProcessorPil", patch_size=14, merge_size=2)))
_register(Family("qwen2_5_vl", tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2ForCausalLM, _qwen25_vl_configs,
                 QWEN_TOKENS, _qwen_vl_inputs(14),
                 legacy_renames=[("model.language_model.", "model."), ("model.visual.", "visual.")]))
_register(Family("qwen3_vl", tf.Qwen3VLForConditionalGeneration, tf.Qwen3ForCausalLM, _qwen3_vl_configs,
                 QWEN_TOKENS, _qwen_vl_inputs(16)))
_register(Family("idefics2", tf.Idefics2ForConditionalGeneration, tf.MistralForCausalLM, _idefics2_configs,
                 IDEFICS_TOKENS, _idefics_inputs(4, 28), lm_prefix="model.text_model."))
_register(Family("idefics3", tf.Idefics3ForConditionalGeneration, tf.LlamaForCausalLM, _idefics3_configs,
                 IDEFICS_TOKENS, _idefics_inputs(4, 56), lm_prefix="model.text_model.",
                 image_processor=_image_processor("Idefics3ImageProcessorPil")))
_register(Family("smolvlm", tf.SmolVLMForConditionalGeneration, tf.LlamaForCausalLM, _smolvlm_configs,
                 IDEFICS_TOKENS, _idefics_inputs(4, 56), lm_prefix="model.text_model."))
_register(Family("gemma3", tf.Gemma3ForConditionalGeneration, tf.Gemma3ForCausalLM, _gemma3_configs,
                 GEMMA3_TOKENS, _gemma3_inputs, legacy_renames=_llava_renames(), tied=True, saved_is_legacy=False,
                 image_processor=_image_processor("Gemma3ImageProcessorPil", size={"height": 56, "width": 56})))
_register(Family("mistral3", tf.Mistral3ForConditionalGeneration, tf.MistralForCausalLM, _mistral3_configs,
                 MISTRAL3_TOKENS, _mistral3_inputs, legacy_renames=_llava_renames(vision_inner="")))
_register(Family("internvl", tf.InternVLForConditionalGeneration, tf.Qwen2ForCausalLM, _internvl_configs,
                 INTERNVL_TOKENS, _internvl_inputs, legacy_renames=_llava_renames(vision_inner="")))
_register(Family("paligemma", tf.PaliGemmaForConditionalGeneration, tf.GemmaForCausalLM, _paligemma_configs,
                 ["<image>"], _paligemma_inputs, legacy_renames=_llava_renames(), tied=True, saved_is_legacy=False,
                 image_processor=_image_processor("SiglipImageProcessorPil", size={"height": 28, "width": 28})))
_register(Family("aya_vision", tf.AyaVisionForConditionalGeneration, tf.Cohere2ForCausalLM, _aya_vision_configs,
                 AYA_TOKENS, _aya_vision_inputs, legacy_renames=_llava_renames(), tied=True, saved_is_legacy=False))
_register(Family("mllama", tf.MllamaForConditionalGeneration, tf.LlamaForCausalLM, _mllama_configs, ["<|image|>"],
                 _mllama_inputs,
                 legacy_renames=[("model.language_model.", "language_model.model."),
                                 ("lm_head.", "language_model.lm_head."),
                                 ("model.vision_model.", "vision_model."),
                                 ("model.multi_modal_projector.", "multi_modal_projector.")],
                 layer_map=_mllama_layer_map))

FAMILY_NAMES = list(FAMILIES)
LAYOUTS = ("saved", "legacy", "v5")


# --------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------


@dataclass
class Built:
    """One family's checkpoint triple. ``vlm`` is in ``layout``; ``v5_names`` maps every
    safetensors key of ``vlm`` to its transformers-5 module name."""

    family: Family
    root: Path
    vlm: Path
    base: Path
    expert: Path
    layout: str
    vlm_config: Any
    tok_ids: dict[str, int]
    # transformers-5 module name -> tensor, exactly the tensors of the VLM checkpoint
    v5_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def inputs(self, model=None) -> dict[str, torch.Tensor]:
        return inputs(self.vlm, model=model, family=self.family)

    def with_layout(self, layout: str) -> "Built":
        return relayout(self, layout)


def read_safetensors(d: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def _perturb(t: torch.Tensor, rel: float, g: torch.Generator) -> torch.Tensor:
    """``t`` + noise of RMS ``rel`` * RMS(t) (at least ``rel`` * 0.01, so zero biases move too)."""
    rms = max(t.float().pow(2).mean().sqrt().item(), 0.01) if t.numel() else 0.0
    return t + rel * rms * torch.randn(t.shape, generator=g, dtype=t.dtype)


def llm_to_vlm_key(fam: Family, cfg, llm_key: str) -> str:
    """Base/expert causal-LM key -> VLM in-memory (v5) key."""
    if llm_key.startswith("lm_head."):
        return llm_key
    assert llm_key.startswith("model."), llm_key
    rest = llm_key[len("model."):]
    if fam.layer_map is not None:
        m = re.match(r"layers\.(\d+)\.(.*)", rest)
        if m:
            rest = f"layers.{fam.layer_map(cfg)[int(m.group(1))]}.{m.group(2)}"
    return fam.lm_prefix + rest


def build(family: str, root: str | Path, layout: str = "saved", seed: int = SEED,
          dtype: torch.dtype | None = None) -> Built:
    """Write base/, expert/ and vlm/ (in ``layout``) for ``family`` under ``root``.

    ``dtype``: cast all three models to it before saving (e.g. torch.bfloat16, as on the hub)."""
    fam = FAMILIES[family]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    vtok = make_tokenizer(fam.extra_tokens)
    btok = make_tokenizer([])
    tok_ids = {t: vtok.convert_tokens_to_ids(t) for t in fam.extra_tokens}
    vcfg, bcfg = fam.configs(tok_ids)

    # base + expert
    base = fam.base_cls(bcfg).eval()
    expert = fam.base_cls(bcfg).eval()
    with torch.no_grad():
        bsd = base.state_dict()
        esd = {k: _perturb(v, EXPERT_NOISE, g) for k, v in bsd.items()}
        expert.load_state_dict(esd)
    if dtype is not None:
        base.to(dtype)
        expert.to(dtype)
    base.save_pretrained(root / "base")
    btok.save_pretrained(root / "base")
    expert.save_pretrained(root / "expert")
    btok.save_pretrained(root / "expert")

    # VLM derived from base: LM = base + small noise on the overlapping rows
    vlm = fam.vlm_cls(vcfg).eval()
    with torch.no_grad():
        vsd = vlm.state_dict()
        for k, bv in bsd.items():
            if k == "lm_head.weight" and bcfg.tie_word_embeddings:
                continue
            vk = llm_to_vlm_key(fam, vcfg, k)
            assert vk in vsd, (family, k, vk)
            tgt = vsd[vk]
            assert tgt.shape[1:] == bv.shape[1:], (vk, tgt.shape, bv.shape)
            if bv.ndim == 0:
                tgt.copy_(_perturb(bv, VLM_NOISE, g))
            else:
                r = min(tgt.shape[0], bv.shape[0])
                tgt[:r].copy_(_perturb(bv[:r], VLM_NOISE, g))
    if dtype is not None:
        vlm.to(dtype)
    vdir = root / "vlm"
    vlm.save_pretrained(vdir)
    vtok.save_pretrained(vdir)
    if fam.image_processor is not None:
        fam.image_processor(vcfg).save_pretrained(vdir)
    v5 = {k: v.detach().clone().contiguous() for k, v in vlm.state_dict().items()}
    if fam.tied:
        v5.pop("lm_head.weight", None)
    built = Built(fam, root, vdir, root / "base", root / "expert", "saved", vcfg, tok_ids, v5)
    n_saved = len(read_safetensors(vdir))
    assert n_saved == len(v5), (family, n_saved, len(v5))
    if layout != "saved":
        built = relayout(built, layout, dest=vdir)
    return built


def relayout(built: Built, layout: str, dest: str | Path | None = None, max_shard_size: str | None = None) -> Built:
    """A copy of ``built.vlm`` (or ``dest`` in place) whose safetensors keys are in ``layout``.

    Everything but the weights (config, tokenizer, processor files) is copied as is.
    ``max_shard_size`` (layout "saved" only): write a sharded checkpoint with an index, as the hub has."""
    import shutil

    fam = built.family
    if layout not in LAYOUTS:
        raise ValueError(layout)
    if max_shard_size is not None and layout != "saved":
        raise ValueError("sharding is only written for layout 'saved'")
    suffix = "_sharded" if max_shard_size else ""
    dest = Path(dest) if dest is not None else built.root / f"vlm_{layout}{suffix}"
    if dest != built.vlm:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(built.vlm, dest)
    for f in list(dest.glob("*.safetensors")) + list(dest.glob("*.safetensors.index.json")):
        f.unlink()
    if layout == "saved":
        model = fam.vlm_cls(built.vlm_config)
        model.load_state_dict(built.v5_state, strict=False)
        model.save_pretrained(dest, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    else:
        sd = built.v5_state if layout == "v5" else {fam.to_legacy(k): v for k, v in built.v5_state.items()}
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return Built(fam, built.root, dest, built.base, built.expert, layout, built.vlm_config, built.tok_ids,
                 built.v5_state)


def distinct_layouts(family: str) -> list[str]:
    """The layouts whose keys differ on disk for ``family`` (always starts with "saved")."""
    fam = FAMILIES[family]
    if not fam.has_legacy:
        return ["saved"]
    return ["saved", "v5"] if fam.saved_is_legacy else ["saved", "legacy", "v5"]


def inputs(vlm_dir: str | Path, model=None, family: Family | str | None = None) -> dict[str, torch.Tensor]:
    """Tensors for one forward pass with an image through the VLM saved in ``vlm_dir``."""
    vlm_dir = Path(vlm_dir)
    if family is None:
        family = family_of(vlm_dir)
    fam = FAMILIES[family] if isinstance(family, str) else family
    cfg = model.config if model is not None else tf.AutoConfig.from_pretrained(vlm_dir)
    tok = tf.AutoTokenizer.from_pretrained(vlm_dir)
    tok_ids = {t: tok.convert_tokens_to_ids(t) for t in fam.extra_tokens}
    assert all(i is not None and i >= BASE_VOCAB for i in tok_ids.values()), tok_ids
    if model is None:
        model = fam.vlm_cls.from_pretrained(vlm_dir).eval()
    return fam.make_inputs(model, cfg, tok_ids)


def family_of(vlm_dir: str | Path) -> str:
    """The family name of a VLM dir (family names are the transformers model_type)."""
    return json.loads((Path(vlm_dir) / "config.json").read_text())["model_type"]


def forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits
