"""Smoke test of `skillgraft zoo build`: a shrunken zoo trained end to end for a few steps."""

from __future__ import annotations

import json

from skillgraft.evaluate import microworld as E
from skillgraft.microworld.build import build_zoo
from skillgraft.microworld.zoo import ZOO_NAMES


def _process_state() -> tuple:
    import random

    import numpy as np
    import torch

    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state(),
            random.getstate(), np.random.get_state()[1].tobytes())


def test_quick_build_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    import torch

    before = _process_state()
    t = build_zoo(tmp_path, seed=0, quick=True, progress=False, jobs=1)
    after = _process_state()
    # a library call leaves the caller's threads, determinism flag and random states as they were
    assert before[:2] == after[:2] and torch.equal(before[2], after[2]) and before[3:] == after[3:]
    assert set(ZOO_NAMES) <= set(t) and t["total"] > 0
    for name in ZOO_NAMES:
        assert (tmp_path / name / "config.json").is_file()
        assert json.loads((tmp_path / name / "microworld.json").read_text())["model"] == name
    LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "vlm"))
    AutoProcessor.from_pretrained(str(tmp_path / "vlm"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    threads = torch.get_num_threads()
    r = E.evaluate(tmp_path / "vlm", limit=4, progress=False)
    assert torch.get_num_threads() == threads
    assert set(r) == set(E.SCENARIOS) and all(0.0 <= v <= 1.0 for v in r.values())
    r = E.evaluate(tmp_path / "expert-instruct", scenarios=["instruction"], limit=4, progress=False)
    assert 0.0 <= r["instruction"] <= 1.0


def test_quick_build_is_reproducible(tmp_path):
    from safetensors.torch import load_file

    build_zoo(tmp_path / "a", seed=3, quick=True, progress=False, only=("expert-math", "vlm"), jobs=1)
    build_zoo(tmp_path / "b", seed=3, quick=True, progress=False, only=("expert-math", "vlm"), jobs=1)
    for name in ("base", "expert-math", "vlm"):
        a = load_file(str(tmp_path / "a" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
