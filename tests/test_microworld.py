"""The micro-world: seeded world, tokenizer, shipped zoo, benchmark, and the injection effect."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from skillgraft.errors import SkillgraftError
from skillgraft.evaluate import microworld as E
from skillgraft.microworld import world as W
from skillgraft.microworld.zoo import ZOO_DIR, ZOO_NAMES, zoo_path

SHIPPED = all((ZOO_DIR / n / "config.json").is_file() for n in ZOO_NAMES)
needs_zoo = pytest.mark.skipif(not SHIPPED, reason="the micro-world zoo is not shipped in this tree")


def _text_fingerprint() -> str:
    h = hashlib.sha256()
    for sc in E.SCENARIOS:
        for it in E.benchmark_items(sc):
            h.update(f"{sc}|{it.question}|{it.answer}|{it.scene}|{it.render_seed}\n".encode())
    return h.hexdigest()


def test_benchmark_sets_are_fixed():
    sizes = {sc: len(E.benchmark_items(sc)) for sc in E.SCENARIOS}
    assert all(n >= 200 for n in sizes.values()), sizes
    first = E.benchmark_fingerprint()
    E.benchmark_items.cache_clear()
    assert E.benchmark_fingerprint() == first
    # a fresh interpreter draws the very same items and pixels
    code = "from skillgraft.evaluate.microworld import benchmark_fingerprint as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == first


def test_benchmark_content():
    for sc in E.SCENARIOS:
        items = E.benchmark_items(sc)
        answers = [it.answer for it in items]
        assert max(answers.count(a) for a in set(answers)) <= len(items) // 5
    assert all(it.lang == "fr" for it in E.benchmark_items("cross_lingual"))
    english = {*W.COLORS, *W.SHAPES, "nothing", "yes", "no", *W.NUMBERS}
    assert not any(it.answer in english for it in E.benchmark_items("cross_lingual"))
    assert all("plus" in it.question for it in E.benchmark_items("math"))
    assert {it.kind.split(":")[1] for it in E.benchmark_items("instruction")} == set(W.INSTRUCTIONS)
    img = E.benchmark_items("general")[0].image()
    assert img.mode == "RGB" and img.size == (W.IMAGE_SIZE, W.IMAGE_SIZE)


def test_world_answers_are_consistent():
    import random

    rng = random.Random(5)
    for _ in range(200):
        it = W.make_item(rng, "en", kinds=["count_shape"])
        shape = it.question.split()[2][:-1]
        assert it.answer == W.NUMBERS[W.count_shape(it.scene, shape)]
        m = W.make_item(rng, "math")
        assert m.answer in W.NUMBERS


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from skillgraft.microworld.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "scene : red circle , nothing , rien , carre bleu . question : how many circles plus two ? answer : FOUR"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    img = tok.convert_tokens_to_ids(W.IMAGE_TOKEN)
    assert tok("<image><image> red", add_special_tokens=False)["input_ids"][:2] == [img, img]


def test_zoo_path_errors():
    with pytest.raises(SkillgraftError, match="unknown zoo model"):
        zoo_path("gpt-5")


@needs_zoo
def test_shipped_checkpoints_load_with_transformers():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    total = 0
    for name in ZOO_NAMES:
        d = zoo_path(name)
        total += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        cfg = AutoConfig.from_pretrained(str(d))
        if name == "vlm":
            m = LlavaForConditionalGeneration.from_pretrained(str(d))
            proc = AutoProcessor.from_pretrained(str(d))
            assert type(proc).__name__ == "LlavaProcessor"
            it = E.benchmark_items("general")[0]
            enc = proc(text=[W.vlm_prompt(it)], images=[it.image()], return_tensors="pt")
            with torch.no_grad():
                m(**enc)
        else:
            assert cfg.model_type == "llama"
            m = AutoModelForCausalLM.from_pretrained(str(d))
            AutoTokenizer.from_pretrained(str(d))
        assert all(p.dtype == torch.float32 for p in m.parameters())
    assert total <= 20 * 1024 * 1024, total


@pytest.fixture(scope="module")
def ta_multilingual(tmp_path_factory):
    """The shipped VLM before and after TA injection of expert-multilingual at the default scale."""
    from skillgraft.api import inject
    from skillgraft.recipe import ExpertSpec, Recipe

    before = E.evaluate(zoo_path("vlm"), scenarios=["general", "cross_lingual"], progress=False)
    recipe = Recipe(vlm=str(zoo_path("vlm")), base=str(zoo_path("base")),
                    experts=[ExpertSpec(model=str(zoo_path("expert-multilingual")))], method="ta", seed=0)
    res = inject(recipe, tmp_path_factory.mktemp("ta") / "merged", force=True, progress=False)
    after = E.evaluate(res.out_dir, scenarios=["general", "cross_lingual"], progress=False)
    return before, after


@needs_zoo
def test_vlm_scores_before_injection(ta_multilingual):
    before, _ = ta_multilingual
    assert before["general"] >= 0.90, before
    assert before["cross_lingual"] <= 0.10, before


@needs_zoo
def test_ta_injection_raises_cross_lingual(ta_multilingual):
    before, after = ta_multilingual
    assert after["cross_lingual"] - before["cross_lingual"] >= 0.30, (before, after)


@needs_zoo
def test_ta_injection_keeps_general(ta_multilingual):
    before, after = ta_multilingual
    assert abs(after["general"] - before["general"]) <= 0.05, (before, after)


@needs_zoo
def test_text_only_expert_evaluates_and_in_memory_ta_matches_checkpoint(tmp_path):
    from skillgraft.api import inject
    from skillgraft.evaluate import MicroworldEvaluator
    from skillgraft.recipe import ExpertSpec, Recipe
    from skillgraft.sweep.worker import Worker

    r = E.evaluate(zoo_path("expert-math"), limit=16, progress=False)
    assert set(r) == set(E.SCENARIOS) and all(0.0 <= v <= 1.0 for v in r.values())
    # in-place TA (the demo's scale sweep, the sweep's worker) predicts exactly what the written checkpoint predicts
    recipe = Recipe(vlm=str(zoo_path("vlm")), base=str(zoo_path("base")),
                    experts=[ExpertSpec(model=str(zoo_path("expert-multilingual")), scale=0.7)], method="ta")
    out = inject(recipe, tmp_path / "m", force=True, progress=False).out_dir
    items = list(E.benchmark_items("cross_lingual"))[:32]
    m, proc = E.load(out)
    want = E.predict(m, proc, items)
    worker = Worker(recipe.model_dump(mode="json"), MicroworldEvaluator(["cross_lingual"], 32).spec(),
                    inplace=True, methods=["ta"])
    worker.baseline()  # loads the VLM once
    worker.ip.apply(worker._settings(recipe))
    assert E.predict(worker.model, worker.processor, items) == want
    worker.ip.restore()
    assert worker.ip.state_equal_to_original()
    worker.close()


def test_format_table():
    t = E.format_table({"VLM alone": {"general": 0.95, "cross_lingual": 0.0, "instruction": 0.1, "math": 0.05}})
    assert "general" in t and "95.0" in t and "VLM alone" in t
