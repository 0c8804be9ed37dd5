"""`tune`: the search logic on known curves, the label-free signals on the real micro-world, a pick in
the labelled zone's neighbourhood written exactly as `inject` writes it, and one-line errors for bad
probe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_weights

from skillgraft import cli
from skillgraft.errors import SkillgraftError
from skillgraft.io.outdir import foreign_entries
from skillgraft.microworld.probes import write_probes
from skillgraft.microworld.zoo import zoo_path
from skillgraft.pipeline import inject
from skillgraft.recipe import Recipe
from skillgraft.tune import DEFAULT_CONFIDENCE, TuneSettings, layer_groups, tune
from skillgraft.tune.objective import Candidate, Reference, best, candidate, z_of
from skillgraft.tune.run import schedule_of
from skillgraft.tune.search import global_search, group_search
from skillgraft.tune.signals import Score


# ------------------------------------------------------------------ objective and search, no model


def _score(kept: list[bool], nll: list[float], tokens: list[int]) -> Score:
    return Score(torch.tensor(kept), torch.tensor(nll, dtype=torch.float64), torch.tensor(tokens),
                 torch.tensor(tokens))


def test_retention_and_uptake_by_hand():
    vlm_image = _score([True] * 3, [0.0, 0.6931471805599453, 2.302585092994046], [1, 1, 1])  # c = 1, 0.5, 0.1
    ref = Reference.from_scores(vlm_image, _score([False], [8.0], [2]), _score([True], [1.0], [2]))
    cand = _score([True, False, True], [0.1, 0.1, 0.1], [1, 1, 1])
    assert ref.retention(cand) == pytest.approx((1 + 0.1) / 1.6)
    # a partial score (the first prompt only, changed) is bounded above: the rest count as kept
    assert ref.retention(_score([False], [0.1], [1])) == pytest.approx((0.5 + 0.1) / 1.6)
    assert ref.uptake(_score([False], [5.0], [2])) == pytest.approx((4 - 2.5) / (4 - 0.5))
    with pytest.raises(SkillgraftError, match="do not exercise"):
        Reference.from_scores(vlm_image, _score([True], [1.0], [2]), _score([True], [1.0], [2]))


def _ref(confidence: list[float]) -> Reference:
    vlm_image = _score([True] * len(confidence), [-float(torch.tensor(c).log()) for c in confidence], [1] * len(confidence))
    return Reference.from_scores(vlm_image, _score([False], [8.0], [2]), _score([True], [1.0], [2]))


def test_retention_standard_error_and_lower_bound_by_hand():
    ref = _ref([1.0, 0.5, 0.1, 0.4])
    cand = _score([True, False, True, True], [0.1] * 4, [1] * 4)
    r = (1 + 0.1 + 0.4) / 2.0
    assert ref.retention(cand) == pytest.approx(r)
    # delta method for a ratio of means: sqrt(n/(n-1) * sum (c_i (k_i - r))^2) / sum c_i
    terms = [(1.0 * (1 - r)) ** 2, (0.5 * (0 - r)) ** 2, (0.1 * (1 - r)) ** 2, (0.4 * (1 - r)) ** 2]
    se = (4 / 3 * sum(terms)) ** 0.5 / 2.0
    assert ref.retention_se(cand) == pytest.approx(se)
    assert ref.retention_se(_score([True] * 4, [0.1] * 4, [1] * 4)) == 0.0  # nothing changed: no doubt
    assert z_of(0.5) == 0.0 and z_of(0.8413447460685429) == pytest.approx(1.0)
    # the estimate clears 0.7, its one-standard-error lower bound does not
    loose = candidate((1.0,), ref, cand, None, 0.7, z=0.0)
    strict = candidate((1.0,), ref, cand, None, 0.7, z=1.0)
    assert loose.feasible and loose.retention_lcb is None
    assert not strict.feasible and strict.retention_lcb == pytest.approx(r - se) and strict.retention_se == pytest.approx(se)
    # a changed answer the VLM doubted costs less retention and leaves less doubt
    unsure = _ref([1.0, 0.1, 0.5, 0.4])
    changed_unsure = _score([True, False, True, True], [0.1] * 4, [1] * 4)
    assert unsure.retention_se(changed_unsure) < se
    # a partial score is never feasible and has no standard error
    part = candidate((1.0,), ref, _score([True], [0.1], [1]), None, 0.7, z=1.0)
    assert not part.feasible and part.retention_se == 0.0


def test_retention_standard_error_matches_the_spread_over_prompt_samples():
    """Over many samples of 256 prompts from one population, the estimate's spread is what the
    standard error of each sample says."""
    g = torch.Generator().manual_seed(0)
    pop_c = torch.rand(20000, generator=g) ** 0.5
    pop_k = torch.rand(20000, generator=g) < (0.9 + 0.1 * pop_c)  # confident answers are kept more often
    estimates, ses = [], []
    for _ in range(400):
        i = torch.randint(0, 20000, (256,), generator=g)
        ref = _ref(pop_c[i].tolist())
        s = _score(pop_k[i].tolist(), [0.1] * 256, [1] * 256)
        estimates.append(ref.retention(s))
        ses.append(ref.retention_se(s))
    spread = torch.tensor(estimates).std().item()
    assert spread == pytest.approx(sum(ses) / len(ses), rel=0.15)


def _curve(boundary: float, peak: float | None = None, calls: list | None = None):
    def evaluate(scales, stage):
        if calls is not None:
            calls.append(tuple(scales))
        s = sum(scales) / len(scales)
        up = s if peak is None else s * (2 * peak - s)
        return Candidate(tuple(scales), 1 - s / 10, up, s <= boundary, stage=stage)
    return evaluate


def test_global_search_finds_the_retention_boundary():
    calls: list = []
    start = Candidate((0.0,), 1.0, 0.0, True)
    cands = global_search(_curve(0.93, calls=calls), start, 0.0, 2.0, budget=12)
    pick = best(cands)
    assert 0.93 - 0.05 < pick.scale <= 0.93
    assert len(calls) <= 12 and len(set(calls)) == len(calls)  # the budget, and no point twice


def test_global_search_finds_an_uptake_peak_inside_the_feasible_range():
    cands = global_search(_curve(10.0, peak=0.7), Candidate((0.0,), 1.0, 0.0, True), 0.0, 2.0, budget=12)
    assert best(cands).scale == pytest.approx(0.7, abs=0.05)


def test_global_search_when_nothing_but_the_vlm_is_feasible():
    cands = global_search(_curve(0.0), Candidate((0.0,), 1.0, 0.0, True), 0.0, 2.0, budget=6)
    assert best(cands).scale == 0.0


def test_group_search_moves_scale_to_the_group_that_pays():
    # uptake from group 0 only, retention spent by every group alike: scale moves from 1 and 2 to 0
    def evaluate(scales, stage):
        return Candidate(tuple(scales), 1 - sum(scales) / 10, scales[0], sum(scales) <= 3.0, stage=stage)
    start = Candidate((1.0, 1.0, 1.0), 0.7, 1.0, True)
    pick = best(group_search(evaluate, start, budget=20, step=0.25))
    assert pick.scales[0] > 1.5 and sum(pick.scales) <= 3.0


def test_cli_default_confidence_is_the_librarys():
    args = cli.build_parser().parse_args(["tune", "v", "e", "--image-prompts", "i", "--text-prompts", "t", "-o", "o"])
    assert args.confidence == DEFAULT_CONFIDENCE == TuneSettings().confidence


def test_layer_groups_and_schedules():
    assert layer_groups(4, 3) == [[0], [1], [2, 3]]
    assert layer_groups(2, 3) == [[0], [1]]
    assert schedule_of((0.5,), [[0, 1]], 2) == 0.5
    assert schedule_of((0.5, 1.0, 2.0), layer_groups(4, 3), 4) == [0.5, 1.0, 2.0, 2.0]


# ------------------------------------------------------------------ the micro-world

EXPERT = "expert-multilingual"
ZONE = (0.9, 1.0)  # the labelled 16-point TA sweep's zone for this expert (docs/tuning.md)
ZONE_MARGIN = 0.4  # below it: 96 probes leave the estimate a standard error of about 0.015, one of which is held back


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, Path]:
    return write_probes(EXPERT, tmp_path_factory.mktemp("probes"), 96)


def _recipe(scale: float = 1.0) -> Recipe:
    return Recipe(vlm=str(zoo_path("vlm")), base=str(zoo_path("base")),
                  experts=[{"model": str(zoo_path(EXPERT)), "scale": scale}])


@pytest.fixture(scope="module")
def tuned(probes, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    return tune(_recipe(), probes["image_prompts"], probes["text_prompts"], out, progress=False,
                settings=TuneSettings(budget=6, batch_size=96))


def test_tune_picks_a_scale_near_the_labelled_zone(tuned):
    c = tuned.chosen
    assert ZONE[0] - ZONE_MARGIN <= tuned.scale <= ZONE[1] + 0.2
    # feasible by the default rule: the estimate less one standard error clears 0.95
    assert c.feasible and c.retention_se > 0 and c.retention_lcb >= 0.95
    assert c.retention_lcb == pytest.approx(c.retention - z_of(DEFAULT_CONFIDENCE) * c.retention_se)
    # the pick is the rule's best: every candidate with more uptake fails the bound
    assert all(not o.feasible for o in tuned.candidates if o.uptake is not None and o.uptake > c.uptake)
    assert len(tuned.candidates) <= 6 + 1  # the budget, plus the VLM itself
    data = json.loads((tuned.out_dir / "skillgraft_tune.json").read_text())
    assert data["chosen"]["scale"] == tuned.scale and len(data["candidates"]) == len(tuned.candidates)
    assert "(pick)" in (tuned.out_dir / "skillgraft_tune.md").read_text()
    assert foreign_entries(tuned.out_dir) == []  # every file is listed as skillgraft's: --force may replace it


def test_tuned_checkpoint_is_what_inject_writes_and_loads(tuned, tmp_path):
    from transformers import LlavaForConditionalGeneration

    ref = inject(_recipe(tuned.scale), tmp_path / "ref", progress=False)
    got, want = load_weights(tuned.out_dir), load_weights(ref.out_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    model = LlavaForConditionalGeneration.from_pretrained(str(tuned.out_dir))
    assert model.config.text_config.num_hidden_layers == 4


def test_kept_means_greedy_decoding_gives_the_teachers_answer(probes):
    """`kept` (teacher-forced argmax agreement) is exactly "generate returns the same answer"."""
    from skillgraft.evaluate import load_model
    from skillgraft.tune.prompts import read_image_prompts
    from skillgraft.tune.signals import score, teacher_answers

    model, proc = load_model(zoo_path("vlm"))
    items = read_image_prompts(probes["image_prompts"], 48)
    teacher = teacher_answers(model, proc, items, batch_size=48)
    assert score(model, teacher).kept_rate == 1.0
    with torch.no_grad():  # a perturbed model: some answers change
        for p in model.model.language_model.layers[3].mlp.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    s = score(model, teacher)
    again = teacher_answers(model, proc, items, batch_size=48)
    assert 0 < s.kept_rate < 1
    assert [a == b for a, b in zip(again.texts, teacher.texts)] == s.kept.tolist()


# ------------------------------------------------------------------ bad probe files


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["missing_image", "empty", "bad_json", "not_object", "answers", "no_prompt",
                                  "missing_file", "not_an_image"])
def test_bad_probe_files_give_one_error_line(case, probes, tmp_path, capsys):
    img, txt = probes["image_prompts"], probes["text_prompts"]
    if case == "missing_image":
        img = _write(tmp_path / "i.jsonl", '{"image": "nope.png", "prompt": "what ?"}\n')
    elif case == "empty":
        txt = _write(tmp_path / "t.txt", "\n\n")
    elif case == "bad_json":
        txt = _write(tmp_path / "t.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    elif case == "not_object":
        img = _write(tmp_path / "i.jsonl", '["a.png", "what ?"]\n')
    elif case == "answers":
        txt = _write(tmp_path / "t.jsonl", '{"prompt": "a ?", "answer": "b"}\n')
    elif case == "no_prompt":
        txt = _write(tmp_path / "t.jsonl", '{"text": "a ?"}\n')
    elif case == "missing_file":
        img = tmp_path / "none.jsonl"
    elif case == "not_an_image":
        (tmp_path / "x.png").write_text("not a picture")
        img = _write(tmp_path / "i.jsonl", '{"image": "x.png", "prompt": "what ?"}\n')
    out = tmp_path / "out"
    argv = ["tune", str(zoo_path("vlm")), str(zoo_path(EXPERT)), "--base", str(zoo_path("base")),
            "--image-prompts", str(img), "--text-prompts", str(txt), "-o", str(out), "-q"]
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


def test_bad_tune_settings(probes, tmp_path, capsys):
    base = ["tune", str(zoo_path("vlm")), str(zoo_path(EXPERT)), "--base", str(zoo_path("base")),
            "--image-prompts", str(probes["image_prompts"]), "--text-prompts", str(probes["text_prompts"]),
            "-o", str(tmp_path / "out"), "-q"]
    lora = [a if a != str(zoo_path(EXPERT)) else str(zoo_path("expert-multilingual-lora")) for a in base]
    for argv in [base + ["--range", "1:0"], base + ["--budget", "0"], base + ["--min-retention", "1.5"],
                 base + ["--confidence", "1"], base + ["--confidence", "0.3"],
                 base + ["--dtype", "bfloat16"], lora]:  # a LoRA adapter cannot answer the text prompts
        assert cli.main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
