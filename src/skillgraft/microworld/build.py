"""Train the micro-world zoo from seed on CPU: base LLM, three experts, and a LLaVA VLM.

    base                 LlamaForCausalLM pre-trained on English scene text (with questions and
                         answers), French scene text, a bilingual lexicon, capital forms and
                         arithmetic facts: French, formats and sums are latent in it.
    expert-multilingual  base fine-tuned on French questions/answers over text scenes
    expert-instruct      base fine-tuned on English questions with format instructions
    expert-math          base fine-tuned on arithmetic over counts in text scenes
    expert-multilingual-lora
                         a PEFT LoRA adapter of base trained on expert-multilingual's data
                         (LORA: rank, alpha, learning rate; the other models do not depend on it)
    vlm                  LlavaForConditionalGeneration: tiny CLIP vision tower + projector + LM
                         initialised from base. Stage 0 pre-trains the vision tower alone to
                         name what each cell of a picture holds (as a real VLM starts from a
                         pre-trained CLIP); stage 1 trains vision+projector with the LM frozen,
                         stage 2 trains everything (the LM at a low learning rate, so it stays
                         close to the base, as a real VLM's LM stays close to its LLM), on
                         English image questions only. Its LM trains with attention dropout
                         (`vlm_attention_dropout`, a regulariser; inactive at inference), which
                         measurably makes its own skill survive an added task vector (README,
                         "The micro-world").

Each expert's data also holds a share of plain English questions over text scenes (`replay`),
as a real fine-tune mixes in general data; the VLM never sees French, format instructions or
arithmetic. Everything is seeded and deterministic on CPU for a fixed thread count (the base
on BASE_THREADS threads, every other model on one).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
import multiprocessing as mp
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from . import world as W
from ..torch_state import torch_settings
from .scenarios import EXPERT_NAMES, EXPERT_SCENARIO
from .tokenizer import build_tokenizer

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    # language model
    hidden: int = 128
    intermediate: int = 256
    layers: int = 4
    heads: int = 4
    # vision tower
    v_hidden: int = 64
    v_intermediate: int = 128
    v_layers: int = 2
    v_heads: int = 4
    patch: int = 16
    # schedule (steps, learning rate), batch size
    batch: int = 64
    base_steps: int = 3000
    base_lr: float = 3e-3
    expert_steps: int = 800
    expert_lr: float = 1e-3
    replay: float = 0.25
    vision_steps: int = 300
    vision_lr: float = 2e-3
    vlm1_steps: int = 600
    vlm1_lr: float = 2e-3
    vlm2_steps: int = 2000
    vlm2_lr_lm: float = 3e-4
    vlm2_lr_vision: float = 1e-3
    vlm_attention_dropout: float = 0.12
    warmup: int = 50


FULL = Settings()
QUICK = Settings(hidden=32, intermediate=64, layers=2, heads=2, v_hidden=16, v_intermediate=32, v_layers=1,
                 v_heads=2, batch=8, base_steps=3, expert_steps=2, vision_steps=2, vlm1_steps=2, vlm2_steps=2, warmup=1)



# --------------------------------------------------------------------------- models


def lm_config(tok, s: Settings):
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def vlm_config(tok, s: Settings):
    vision = CLIPVisionConfig(
        hidden_size=s.v_hidden,
        intermediate_size=s.v_intermediate,
        num_hidden_layers=s.v_layers,
        num_attention_heads=s.v_heads,
        image_size=W.IMAGE_SIZE,
        patch_size=s.patch,
        projection_dim=s.v_hidden,
    )
    text = lm_config(tok, s)
    # dropout on the VLM's attention weights while it trains (inactive in eval mode): a VLM trained
    # this way keeps more of its own skill when an expert's task vector is added (README, "The micro-world")
    text.attention_dropout = s.vlm_attention_dropout
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(W.IMAGE_TOKEN),
        image_seq_length=(W.IMAGE_SIZE // s.patch) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def make_processor(tok, s: Settings):
    ip = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": W.IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": W.IMAGE_SIZE, "width": W.IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=s.patch,
        vision_feature_select_strategy="default",
        image_token=W.IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def images_uint8(images) -> torch.Tensor:
    """[N, 3, H, W] uint8 tensor of PIL images."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).contiguous()


def normalize(u8: torch.Tensor) -> torch.Tensor:
    """Same tensor the saved image processor produces (rescale 1/255, normalize 0.5/0.5)."""
    return (u8.float() / 255.0 - 0.5) / 0.5


def pixels(images) -> torch.Tensor:
    return normalize(images_uint8(images))


def generation_config(tok):
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )


# --------------------------------------------------------------------------- data


@dataclass
class Example:
    ids: list[int]
    loss_from: int  # first position whose token is predicted (labels before it are -100)
    image: int = -1  # index into the image tensor, -1 for text-only
    targets: list[bool] | None = None  # per-token: is it predicted (overrides loss_from)


def _ids(tok, text: str, bos: bool = False) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if bos else []) + ids


def qa_example(tok, prompt: str, answer: str, image: int = -1, n_image_tokens: int = 0) -> Example:
    if n_image_tokens:
        prompt = prompt.replace(W.IMAGE_TOKEN, W.IMAGE_TOKEN * n_image_tokens)
    p = _ids(tok, prompt, bos=True)
    a = _ids(tok, answer) + [tok.eos_token_id]
    return Example(p + a, len(p), image)


def text_example(tok, text: str) -> Example:
    ids = _ids(tok, text, bos=True) + [tok.eos_token_id]
    return Example(ids, 1)


def scene_qa(rng: random.Random, task: str, scene_lang: str) -> tuple[str, str]:
    item = W.make_item(rng, task)
    return W.text_prompt(item, scene_lang), item.answer


def scene_questions(tok, rng: random.Random) -> Example:
    """One English scene with 1-4 questions, each answer followed by `</s>`; only answers are targets.

    Predicting the random scene and question words teaches nothing; putting the loss on the
    answers alone makes the base learn to read a scene several times faster.
    """
    scene = W.random_scene(rng)
    ids = _ids(tok, f"scene : {W.describe(scene, 'en')} .", bos=True)
    targets = [False] * len(ids)
    for _ in range(rng.randint(1, 4)):
        it = W.make_item(rng, "en", scene=scene)
        q = _ids(tok, f"question : {it.question} answer :")
        a = _ids(tok, it.answer) + [tok.eos_token_id]
        ids += q + a
        targets += [False] * len(q) + [True] * len(a)
    return Example(ids, 1, targets=targets)


def base_corpus(tok, rng: random.Random, n: int) -> list[Example]:
    lex = W.lexicon_lines()
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.55:  # English scene text with questions and their answers (answers are the targets)
            out.append(scene_questions(tok, rng))
        elif r < 0.65:  # English scene + statements
            s = W.random_scene(rng)
            out.append(text_example(tok, f"scene : {W.describe(s, 'en')} . {W.statements(s, rng, 'en')}"))
        elif r < 0.82:  # French scene + statements
            s = W.random_scene(rng)
            out.append(text_example(tok, f"scene : {W.describe(s, 'fr')} . {W.statements(s, rng, 'fr')}"))
        else:  # lexicon, capitals, arithmetic facts
            out.append(text_example(tok, " ".join(rng.choice(lex) for _ in range(4))))
    return out


def expert_corpus(tok, name: str, rng: random.Random, n: int, replay: float) -> list[Example]:
    out = []
    for _ in range(n):
        if rng.random() < replay:
            p, a = scene_qa(rng, "en", "en")
        elif name == "expert-multilingual":
            p, a = scene_qa(rng, "fr", rng.choice(("en", "fr")))
        elif name == "expert-instruct":
            p, a = scene_qa(rng, "instruction", "en")
        elif name == "expert-math":
            p, a = scene_qa(rng, "math", "en")
        else:
            raise ValueError(name)
        out.append(qa_example(tok, p, a))
    return out


def vlm_corpus(tok, rng: random.Random, n: int, n_image_tokens: int) -> tuple[list[Example], torch.Tensor]:
    out, images = [], []
    for i in range(n):
        item = W.make_item(rng, "en")
        images.append(item.image())
        out.append(qa_example(tok, W.vlm_prompt(item), item.answer, image=i, n_image_tokens=n_image_tokens))
    return out, images_uint8(images)


def collate(batch: list[Example], pad_id: int, pix: torch.Tensor | None) -> dict[str, torch.Tensor]:
    L = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    lab = torch.full((len(batch), L), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        t = torch.tensor(e.ids)
        ids[i, : len(t)] = t
        att[i, : len(t)] = 1
        if e.targets is not None:
            lab[i, : len(t)] = torch.where(torch.tensor(e.targets), t, -100)
        else:
            lab[i, e.loss_from : len(t)] = t[e.loss_from :]
    out = {"input_ids": ids, "attention_mask": att, "labels": lab}
    if pix is not None:
        out["pixel_values"] = normalize(pix[torch.tensor([e.image for e in batch])])
    return out


# --------------------------------------------------------------------------- training


def train(
    model,
    data: list[Example],
    groups: list[tuple[list[torch.nn.Parameter], float]],
    steps: int,
    s: Settings,
    seed: int,
    pad_id: int,
    pix: torch.Tensor | None = None,
    desc: str = "",
    progress: bool = True,
    device: str = "cpu",
) -> float:
    """AdamW with warmup + cosine decay, fixed data order; returns the final mean loss."""
    opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups], weight_decay=0.0, betas=(0.9, 0.98))
    base_lrs = [lr for _, lr in groups]
    g = torch.Generator().manual_seed(seed)
    model.train()
    ema = None
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        f = min(1.0, (step + 1) / max(1, s.warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for pg, lr in zip(opt.param_groups, base_lrs):
            pg["lr"] = lr * f
        idx = torch.randint(len(data), (s.batch,), generator=g).tolist()
        batch = {k: v.to(device) for k, v in collate([data[i] for i in idx], pad_id, pix).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for ps, _ in groups for p in ps], 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return float(ema or 0.0)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_lm(model, tok, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config(tok)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "microworld.json").write_text(json.dumps(meta, indent=2) + "\n")


# the base trains alone, before anything else: two threads (not more: small matmuls stop scaling,
# and a fixed count keeps the weights the same on every machine)
BASE_THREADS = 2

# the settings that determine the base checkpoint (what `resume` compares)
BASE_FIELDS = ("hidden", "intermediate", "layers", "heads", "batch", "base_steps", "base_lr", "warmup")


def _isolated(train_fn: Callable) -> Callable:
    """Run a training function with its fixed thread count, denormal flushing, deterministic algorithms
    and global seeds, and give the caller's process back its own settings and random states after."""

    @functools.wraps(train_fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(train_fn).bind(*args, **kwargs)
        device, threads = bound.arguments["device"], bound.arguments["threads"]
        dev = torch.device(device)
        cuda = [dev.index or 0] if dev.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=cuda), torch_settings(
                threads=threads, flush_denormal=True, deterministic=True, warn_only=dev.type != "cpu"
            ):
                return train_fn(*args, **kwargs)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    return run


def _meta(seed: int, s: Settings) -> dict:
    return {"seed": seed, "settings": dict(s.__dict__)}


def _n_data(s: Settings, steps: int) -> int:
    return max(64, steps * s.batch // 2)  # corpus size: about two epochs


def _load_base_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "base" / "model.safetensors"))


@_isolated
def _train_base(out: Path, seed: int, s: Settings, progress: bool, device: str, threads: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    tok = build_tokenizer()
    _seed_all(seed)
    base = LlamaForCausalLM(lm_config(tok, s)).to(device)
    data = base_corpus(tok, random.Random(seed * 1000 + 1), _n_data(s, s.base_steps))
    loss = train(base, data, [(list(base.parameters()), s.base_lr)], s.base_steps, s, seed + 1, tok.pad_token_id,
                 desc="base", progress=progress, device=device)
    _save_lm(base.cpu(), tok, out / "base", {**_meta(seed, s), "model": "base", "final_loss": loss})
    return time.perf_counter() - t0, loss


@_isolated
def _train_expert(out: Path, name: str, seed: int, s: Settings, progress: bool, device: str,
                  threads: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    tok = build_tokenizer()
    k = EXPERT_NAMES.index(name)
    _seed_all(seed + 10 + k)
    ex = LlamaForCausalLM(lm_config(tok, s))
    ex.load_state_dict(_load_base_state(out))
    ex.to(device)
    data = expert_corpus(tok, name, random.Random(seed * 1000 + 10 + k), _n_data(s, s.expert_steps), s.replay)
    loss = train(ex, data, [(list(ex.parameters()), s.expert_lr)], s.expert_steps, s, seed + 10 + k,
                 tok.pad_token_id, desc=name, progress=progress, device=device)
    _save_lm(ex.cpu(), tok, out / name, {**_meta(seed, s), "model": name, "scenario": EXPERT_SCENARIO[name],
                                          "final_loss": loss})
    return time.perf_counter() - t0, loss


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA expert: PEFT LoRA on every linear layer of the base's decoder, trained on the data
    (and for the steps) of ``of``. Kept apart from Settings, so the other models' metadata is unchanged."""

    of: str = "expert-multilingual"
    rank: int = 8
    alpha: int = 16
    lr: float = 3e-3
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


LORA = LoraSettings()
LORA_EXPERT = "expert-multilingual-lora"


def _has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


@_isolated
def _train_lora_expert(out: Path, seed: int, s: Settings, progress: bool, device: str, threads: int,
                       lo: LoraSettings = LORA) -> tuple[float, float]:
    """A LoRA version of ``lo.of``: same corpus recipe, seeded on its own (seed + 30)."""
    from peft import LoraConfig, get_peft_model  # deferred: peft, an optional (test) dependency

    t0 = time.perf_counter()
    tok = build_tokenizer()
    _seed_all(seed + 30)
    model = LlamaForCausalLM(lm_config(tok, s))
    model.load_state_dict(_load_base_state(out))
    pm = get_peft_model(model, LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=0.0, target_modules=list(lo.targets)))
    pm.to(device)
    data = expert_corpus(tok, lo.of, random.Random(seed * 1000 + 30), _n_data(s, s.expert_steps), s.replay)
    params = [p for p in pm.parameters() if p.requires_grad]
    loss = train(pm, data, [(params, lo.lr)], s.expert_steps, s, seed + 30, tok.pad_token_id,
                 desc=LORA_EXPERT, progress=progress, device=device)
    d = out / LORA_EXPERT
    pm.peft_config["default"].base_model_name_or_path = "base"  # the zoo's base, a sibling directory
    pm.cpu().save_pretrained(str(d))
    (d / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; microworld.json says what it is
    (d / "microworld.json").write_text(json.dumps(
        {**_meta(seed, s), "lora": {k: list(v) if isinstance(v, tuple) else v for k, v in lo.__dict__.items()},
         "model": LORA_EXPERT, "scenario": EXPERT_SCENARIO[lo.of], "final_loss": loss}, indent=2) + "\n")
    return time.perf_counter() - t0, loss


CELL_CLASSES = 1 + len(W.COLORS) * len(W.SHAPES)  # empty, or one (colour, shape) pair


def cell_labels(scene: W.Scene) -> list[int]:
    """Class of each cell in reading order: 0 empty, else 1 + colour * len(SHAPES) + shape."""
    return [0 if c is None else 1 + W.COLORS.index(c[0]) * len(W.SHAPES) + W.SHAPES.index(c[1]) for c in scene]


def pretrain_vision(tower, rng: random.Random, s: Settings, seed: int, progress: bool = True,
                    device: str = "cpu") -> float:
    """Stage 0: train the CLIP tower to tell, from each patch's output, what its cell holds.

    A stand-in for CLIP pre-training: a real VLM starts from a vision encoder that already
    represents what is in a picture. The linear probe used here is thrown away afterwards.
    """
    n_patches = (W.IMAGE_SIZE // s.patch) ** 2
    if n_patches != 4:
        raise ValueError("stage 0 expects one patch per cell (patch = IMAGE_SIZE / 2)")
    scenes = [W.random_scene(rng) for _ in range(max(256, s.vision_steps * s.batch // 4))]
    pix = images_uint8([W.render(sc, random.Random(rng.getrandbits(32))) for sc in scenes])
    labels = torch.tensor([cell_labels(sc) for sc in scenes])
    head = torch.nn.Linear(tower.config.hidden_size, CELL_CLASSES).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.vision_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    tower.train()
    loss = torch.zeros(())
    for step in tqdm(range(s.vision_steps), desc="vision stage 0", disable=not progress, leave=False):
        idx = torch.randint(len(scenes), (s.batch,), generator=g)
        feats = tower(pixel_values=normalize(pix[idx]).to(device)).last_hidden_state[:, 1:]
        loss = torch.nn.functional.cross_entropy(head(feats).reshape(-1, CELL_CLASSES), labels[idx].reshape(-1).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.item())


@_isolated
def _train_vlm(out: Path, seed: int, s: Settings, progress: bool, device: str, threads: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    tok = build_tokenizer()
    pad = tok.pad_token_id
    base_state = _load_base_state(out)
    _seed_all(seed + 20)
    vlm = LlavaForConditionalGeneration(vlm_config(tok, s))
    vlm.model.language_model.load_state_dict({k[len("model."):]: v for k, v in base_state.items()
                                              if k.startswith("model.")})
    vlm.lm_head.load_state_dict({"weight": base_state["lm_head.weight"]})
    n_img = (W.IMAGE_SIZE // s.patch) ** 2
    data, pix = vlm_corpus(tok, random.Random(seed * 1000 + 20), _n_data(s, s.vlm1_steps + s.vlm2_steps), n_img)
    lm_params = list(vlm.model.language_model.parameters()) + list(vlm.lm_head.parameters())
    vis_params = list(vlm.model.vision_tower.parameters()) + list(vlm.model.multi_modal_projector.parameters())
    vlm.to(device)
    loss0 = pretrain_vision(vlm.model.vision_tower, random.Random(seed * 1000 + 23), s, seed + 23,
                            progress=progress, device=device)
    # stage 1: vision tower + projector, language model frozen
    for p in lm_params:
        p.requires_grad_(False)
    loss1 = train(vlm, data, [(vis_params, s.vlm1_lr)], s.vlm1_steps, s, seed + 21, pad, pix,
                  desc="vlm stage 1", progress=progress, device=device)
    # stage 2: everything
    for p in lm_params:
        p.requires_grad_(True)
    loss2 = train(vlm, data, [(vis_params, s.vlm2_lr_vision), (lm_params, s.vlm2_lr_lm)], s.vlm2_steps, s,
                  seed + 22, pad, pix, desc="vlm stage 2", progress=progress, device=device)
    vlm.cpu()
    d = out / "vlm"
    d.mkdir(parents=True, exist_ok=True)
    vlm.generation_config = generation_config(tok)
    vlm.save_pretrained(str(d))
    make_processor(tok, s).save_pretrained(str(d))
    (d / "microworld.json").write_text(json.dumps(
        {**_meta(seed, s), "model": "vlm", "stage0_loss": loss0, "stage1_loss": loss1, "final_loss": loss2}, indent=2) + "\n")
    return time.perf_counter() - t0, loss2


def build_zoo(
    out: Path,
    *,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    settings: Settings | None = None,
    only: tuple[str, ...] | None = None,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    jobs: int = 4,
    resume: bool = False,
) -> dict:
    """Train base, the three experts, the VLM and the LoRA expert into `out/<name>/`; returns seconds per model.

    `quick` shrinks the models and runs a few steps (a smoke test, not a usable zoo).
    The base trains first, alone, on BASE_THREADS threads; every later model on one thread (on a
    small shared machine, oversubscribed OpenMP threads spin and slow training by an order of
    magnitude). Then the experts and the VLM, which only read the saved base, train in `jobs`
    worker processes (jobs=1: one after the other in this process; both give the same weights).
    `resume` reuses an existing `out/base` trained with the same seed and base settings
    (BASE_FIELDS). `only` limits the second phase to the named models.
    """
    s = settings or (QUICK if quick else FULL)
    say = log or (print if progress else (lambda _m: None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    meta_file = out / "base" / "microworld.json"
    reuse = False
    if resume and meta_file.is_file() and (out / "base" / "model.safetensors").is_file():
        m = json.loads(meta_file.read_text())
        want = _meta(seed, s)["settings"]
        have = m.get("settings", {})
        reuse = m.get("seed") == seed and all(have.get(k) == want[k] for k in BASE_FIELDS)
    if reuse:
        say("base: reusing the existing checkpoint (same seed and settings)")
        timings["base"] = 0.0
    else:
        say("training base ...")
        timings["base"], loss = _train_base(out, seed, s, progress, device, threads=BASE_THREADS)
        say(f"base: {timings['base']:.0f}s loss {loss:.3f}")

    todo = [n for n in (*EXPERT_NAMES, "vlm", LORA_EXPERT) if not only or n in only]
    if LORA_EXPERT in todo and not _has_peft():
        say(f"{LORA_EXPERT}: not built (it is trained with PEFT: pip install peft)")
        todo.remove(LORA_EXPERT)

    def job(name: str):
        if name == LORA_EXPERT:
            return _train_lora_expert, (out, seed, s, False if jobs > 1 else progress, device, 1)
        if name == "vlm":
            return _train_vlm, (out, seed, s, False if jobs > 1 else progress, device, 1)
        return _train_expert, (out, name, seed, s, False if jobs > 1 else progress, device, 1)

    if jobs > 1 and len(todo) > 1:
        say(f"training {', '.join(todo)} in {min(jobs, len(todo))} processes ...")
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(fn, *args): name for name in todo for fn, args in [job(name)]}
            for f in as_completed(futs):
                name = futs[f]
                timings[name], loss = f.result()
                say(f"{name}: {timings[name]:.0f}s loss {loss:.3f}")
    else:
        threads = torch.get_num_threads()
        for name in todo:
            fn, args = job(name)
            timings[name], loss = fn(*args)
            say(f"{name}: {timings[name]:.0f}s loss {loss:.3f}")
        torch.set_num_threads(threads)

    timings["total"] = time.perf_counter() - t_start
    (out / "build_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return timings
