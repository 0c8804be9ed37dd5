"""Micro-world probe prompts for `tune`: answer-free, reproducible, and disjoint from the benchmark."""

from __future__ import annotations

import json

import pytest

from skillgraft import cli
from skillgraft.evaluate.microworld import SCENARIOS, benchmark_items
from skillgraft.microworld import world as W
from skillgraft.microworld.probes import image_probe_items, item_key, text_probe_prompts, write_probes
from skillgraft.microworld.scenarios import EXPERT_NAMES


def _benchmark() -> tuple[set, set, set]:
    items = [it for sc in SCENARIOS for it in benchmark_items(sc)]
    return ({item_key(it) for it in items}, {(it.scene, it.render_seed) for it in items},
            {W.text_prompt(it, lang) for it in items for lang in ("en", "fr")})


def test_probe_items_never_overlap_benchmark_items():
    keys, scenes_drawn, text_prompts = _benchmark()
    images = image_probe_items(256)
    assert len({item_key(it) for it in images}) == 256  # no repeats either
    assert not {item_key(it) for it in images} & keys
    assert not {(it.scene, it.render_seed) for it in images} & scenes_drawn  # not even the same picture
    for expert in EXPERT_NAMES:
        pairs = text_probe_prompts(expert, 256)
        assert not {item_key(it) for it, _ in pairs} & keys, expert
        assert not {p for _, p in pairs} & text_prompts, expert


def test_written_probes_hold_no_answers_and_reproduce(tmp_path):
    a = write_probes("expert-math", tmp_path / "a", 16)
    b = write_probes("expert-math", tmp_path / "b", 16)
    assert a["text_prompts"].read_text() == b["text_prompts"].read_text()
    assert a["image_prompts"].read_text() == b["image_prompts"].read_text()
    images = [json.loads(x) for x in a["image_prompts"].read_text().splitlines()]
    texts = [json.loads(x) for x in a["text_prompts"].read_text().splitlines()]
    assert len(images) == len(texts) == 16
    for rec in images:
        assert set(rec) == {"image", "prompt"} and (tmp_path / "a" / rec["image"]).is_file()
        assert rec["prompt"].endswith("answer :") and W.IMAGE_TOKEN in rec["prompt"]
    for rec in texts:
        assert set(rec) == {"prompt"} and rec["prompt"].endswith("answer :") and "plus" in rec["prompt"]
    assert (tmp_path / "a" / images[0]["image"]).read_bytes() == (tmp_path / "b" / images[0]["image"]).read_bytes()


@pytest.mark.parametrize("expert,marker,words", [("expert-multilingual", "reponse :", ("combien", "quelle", "y a t il")),
                                                 ("expert-instruct", "answer :", tuple(W.INSTRUCTION_TEXT.values()))])
def test_text_probes_are_in_the_experts_domain(expert, marker, words):
    for _, p in text_probe_prompts(expert, 32):
        assert p.endswith(marker) and any(w in p for w in words) and W.IMAGE_TOKEN not in p, p


def test_cli_probes_and_its_errors(tmp_path, capsys):
    assert cli.main(["zoo", "probes", "expert-instruct", "-o", str(tmp_path / "p"), "-n", "4"]) == 0
    assert len((tmp_path / "p" / "image_prompts.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    for argv in (["zoo", "probes", "expert-cooking", "-o", str(tmp_path / "q")],
                 ["zoo", "probes", "expert-instruct", "-o", str(tmp_path / "p")]):  # not empty: refused
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "q").exists()
