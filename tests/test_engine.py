"""The injection engine end to end on tiny LLaVA checkpoints: exact values, copies, dtypes, randomness."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import build_llava_triple, load_weights

from skillgraft.api import inject, plan_only
from skillgraft.recipe import ExpertSpec, Recipe
from skillgraft.sources import Inputs

LM_PREFIX = "language_model.model."


def _recipe(t, **kw) -> Recipe:
    expert = {k: kw.pop(k) for k in ("scale", "density") if k in kw}
    return Recipe(vlm=str(t.vlm), base=str(t.base), experts=[ExpertSpec(model=str(t.expert), **expert)], **kw)


def _expected_ta(v, b, e, scale):
    """theta_V + scale*(theta_E - theta_B) on the overlapping rows, written independently of the engine."""
    out = {}
    for name, tv in v.items():
        if name == "language_model.lm_head.weight":
            src = "lm_head.weight"
        elif name.startswith(LM_PREFIX):
            src = "model." + name[len(LM_PREFIX):]
        else:
            out[name] = tv
            continue
        r = b[src].shape[0]
        t = tv.float().clone()
        t[:r] += scale * (e[src].float() - b[src].float())
        out[name] = t.to(tv.dtype)
    return out


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_ta_exact_values(llava_triple, tmp_path, scale):
    res = inject(_recipe(llava_triple, scale=scale), tmp_path / "out", progress=False)
    got = load_weights(res.out_dir)
    v, b, e = (load_weights(p) for p in (llava_triple.vlm, llava_triple.base, llava_triple.expert))
    want = _expected_ta(v, b, e, scale)
    assert set(got) == set(v)
    for name in v:
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(got[name], v[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    c = res.report["counts"]
    assert c == {"merged": 21, "row_sliced": 2, "copied": 27, "total": 48}
    assert res.report["unmatched"]["vlm"] == []
    assert res.report["tensors"]["language_model.model.embed_tokens.weight"]["rows"] == [0, 64]
    # the image-token rows the base has never seen are the VLM's own
    assert torch.equal(got["language_model.model.embed_tokens.weight"][64:], v["language_model.model.embed_tokens.weight"][64:])


def test_output_is_complete_and_loads(llava_triple, tmp_path):
    from transformers import LlavaForConditionalGeneration

    res = inject(_recipe(llava_triple, scale=0.5), tmp_path / "out", progress=False)
    files = {p.name for p in res.out_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
            "model.safetensors", "skillgraft_recipe.yaml", "skillgraft_report.json", "README.md"} <= files
    report = json.loads((res.out_dir / "skillgraft_report.json").read_text())
    assert report["counts"] == res.report["counts"]
    assert "scale" in (res.out_dir / "README.md").read_text()
    model = LlavaForConditionalGeneration.from_pretrained(res.out_dir)
    ids = torch.tensor([[1, 2, 67, 67, 67, 67, 3]])  # (28/14)^2 = 4 image patches -> 4 image tokens
    pixel = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel).logits
    assert logits.shape == (1, 7, 68) and torch.isfinite(logits).all()


def test_scale_zero_is_the_vlm_bit_for_bit(llava_triple, tmp_path):
    res = inject(_recipe(llava_triple, scale=0.0), tmp_path / "out", progress=False)
    got, v = load_weights(res.out_dir), load_weights(llava_triple.vlm)
    assert all(torch.equal(got[k], v[k]) for k in v)


def test_saved_recipe_reproduces_the_run(llava_triple, tmp_path, monkeypatch):
    first = inject(_recipe(llava_triple, method="dare", scale=0.8, density=0.4, seed=3), tmp_path / "a", progress=False)
    monkeypatch.chdir(tmp_path)  # the saved recipe holds absolute paths
    again = inject(Recipe.load(first.out_dir / "skillgraft_recipe.yaml"), tmp_path / "b", progress=False)
    assert (first.out_dir / "model.safetensors").read_bytes() == (again.out_dir / "model.safetensors").read_bytes()
    saved = yaml.safe_load((first.out_dir / "skillgraft_recipe.yaml").read_text())
    assert saved["method"] == "dare" and saved["seed"] == 3 and saved["experts"][0]["density"] == 0.4


def test_dtype_and_shards(llava_triple, tmp_path):
    from transformers import LlavaForConditionalGeneration

    res = inject(_recipe(llava_triple, dtype="bfloat16"), tmp_path / "out", shard_size=20_000, progress=False)
    shards = sorted(p.name for p in res.out_dir.glob("*.safetensors"))
    assert len(shards) > 3 and (res.out_dir / "model.safetensors.index.json").is_file()
    got = load_weights(res.out_dir)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    model = LlavaForConditionalGeneration.from_pretrained(res.out_dir)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_bin_checkpoints_are_read(tmp_path):
    t = build_llava_triple(tmp_path / "bin", bin_files=True)
    assert (t.expert / "pytorch_model.bin").is_file() and not (t.expert / "model.safetensors").exists()
    res = inject(_recipe(t, scale=1.0), tmp_path / "out", progress=False)
    assert res.report["counts"]["merged"] == 21
    ref = build_llava_triple(tmp_path / "st")  # same seed, safetensors: same merge
    want = inject(_recipe(ref, scale=1.0), tmp_path / "out-st", progress=False)
    got, exp = load_weights(res.out_dir), load_weights(want.out_dir)
    assert all(torch.equal(got[k], exp[k]) for k in exp)


def test_plain_llm_target(llava_triple, tmp_path):
    """An LLM as the target: every tensor is language model."""
    r = Recipe(vlm=str(llava_triple.expert), base=str(llava_triple.base),
               experts=[ExpertSpec(model=str(llava_triple.expert), name="again", scale=1.0)])
    res = inject(r, tmp_path / "out", progress=False)
    assert res.report["counts"]["copied"] == 0 and res.report["counts"]["merged"] == res.report["counts"]["total"]
    e, b = load_weights(llava_triple.expert), load_weights(llava_triple.base)
    got = load_weights(res.out_dir)
    for k in e:
        torch.testing.assert_close(got[k], e[k] + (e[k] - b[k]), rtol=0, atol=1e-6)


def test_dare_reproducible_and_unbiased(llava_triple, tmp_path):
    """Fixed seed: identical bytes. Across seeds: kept fraction ~ density, mean delta ~ TA."""
    density, scale, seeds = 0.3, 1.0, 40
    a = inject(_recipe(llava_triple, method="dare", density=density, seed=7), tmp_path / "a", progress=False)
    b = inject(_recipe(llava_triple, method="dare", density=density, seed=7), tmp_path / "b", progress=False)
    assert (a.out_dir / "model.safetensors").read_bytes() == (b.out_dir / "model.safetensors").read_bytes()

    v, base, e = (load_weights(p) for p in (llava_triple.vlm, llava_triple.base, llava_triple.expert))
    name, src = "language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    ta = scale * (e[src] - base[src])
    kept, total = 0, 0
    acc = torch.zeros_like(ta)
    for seed in range(seeds):
        out = inject(_recipe(llava_triple, method="dare", density=density, scale=scale, seed=seed),
                     tmp_path / f"s{seed}", progress=False)
        delta = load_weights(out.out_dir)[name] - v[name]
        kept += int((delta != 0).sum())
        total += delta.numel()
        acc += delta
        # kept entries are rescaled by 1/density
        nz = delta != 0
        torch.testing.assert_close(delta[nz], ta[nz] / density, rtol=1e-4, atol=1e-6)
    frac = kept / total
    # binomial: sd = sqrt(p(1-p)/n) ~ 0.0016 for n = 40*2048; allow 5 sd
    assert abs(frac - density) < 5 * (density * (1 - density) / total) ** 0.5
    mean = acc / seeds
    # relative error of the mean: expected sqrt((1-p)/(p*seeds)) ~ 0.24; allow 1.5x that
    rel = float((mean - ta).norm() / ta.norm())
    expected = ((1 - density) / (density * seeds)) ** 0.5
    assert rel < 1.5 * expected
    assert abs(float(mean.sum() - ta.sum())) < 0.1 * float(ta.abs().sum())


def _two_expert_triple(tmp_path):
    t = build_llava_triple(tmp_path / "t")
    from transformers import LlamaForCausalLM

    e2 = LlamaForCausalLM.from_pretrained(t.base)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in e2.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    e2.save_pretrained(tmp_path / "t" / "expert2")
    return t, tmp_path / "t" / "expert2"


def test_two_expert_ties_matches_hand_computation(tmp_path):
    t, e2_dir = _two_expert_triple(tmp_path)
    recipe = Recipe(
        vlm=str(t.vlm), base=str(t.base), method="ties",
        experts=[ExpertSpec(model=str(t.expert), name="one", scale=0.6, density=0.5),
                 ExpertSpec(model=str(e2_dir), name="two", scale=0.9, density=0.3)],
    )
    res = inject(recipe, tmp_path / "out", progress=False)
    v, b = load_weights(t.vlm), load_weights(t.base)
    e1, e2 = load_weights(t.expert), load_weights(e2_dir)
    name, src = "language_model.model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    taus = [e1[src] - b[src], e2[src] - b[src]]
    trimmed = []
    for tau, d in zip(taus, (0.5, 0.3)):
        k = int(round(d * tau.numel()))
        thresh = tau.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau)))
    weighted = [0.6 * trimmed[0], 0.9 * trimmed[1]]
    sign = torch.sign(weighted[0] + weighted[1])
    sign[sign == 0] = 1
    merged = sum(torch.where(torch.sign(w) == sign, w, torch.zeros_like(w)) for w in weighted)
    torch.testing.assert_close(load_weights(res.out_dir)[name], v[name] + merged, rtol=0, atol=1e-6)


def test_dry_run_plan_reads_no_weights(llava_triple, monkeypatch):
    from skillgraft.io.reader import CheckpointReader

    def boom(*a, **k):
        raise AssertionError("a weight was read during planning")

    monkeypatch.setattr(CheckpointReader, "get", boom)
    monkeypatch.setattr(CheckpointReader, "get_rows", boom)
    plan = plan_only(_recipe(llava_triple))
    assert plan.counts()["merged"] == 21 and plan.n_layers == 2


def test_exclude_keeps_embeddings_and_head_from_the_vlm(llava_triple, tmp_path):
    res = inject(_recipe(llava_triple, exclude=["embed", "lm_head"]), tmp_path / "out", progress=False)
    got, v = load_weights(res.out_dir), load_weights(llava_triple.vlm)
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert torch.equal(got[name], v[name])
        assert res.report["tensors"][name]["reason"].startswith("excluded")
    assert not torch.equal(got["language_model.model.layers.0.mlp.up_proj.weight"], v["language_model.model.layers.0.mlp.up_proj.weight"])
    assert res.report["exclude"] == ["embed", "lm_head"] and res.report["counts"]["merged"] == 19


def test_regex_exclude_and_bad_regex(llava_triple, tmp_path):
    from skillgraft.errors import SkillgraftError

    res = inject(_recipe(llava_triple, exclude=[r"layers\.1\."]), tmp_path / "out", progress=False)
    got, v = load_weights(res.out_dir), load_weights(llava_triple.vlm)
    assert all(torch.equal(got[k], v[k]) for k in v if ".layers.1." in k)
    with pytest.raises(SkillgraftError, match="neither a module kind"):
        inject(_recipe(llava_triple, exclude=["layers.(1"]), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_layer_schedule_and_layerswap(llava_triple, tmp_path):
    """A [0, 1] schedule over 2 layers: layer 0 and the embedding stay the VLM's, layer 1 gets full TA.
    Layerswap with first_k=1 keeps layer 0 and the embedding, merges the rest."""
    v, b, e = (load_weights(p) for p in (llava_triple.vlm, llava_triple.base, llava_triple.expert))
    ta = _expected_ta(v, b, e, 1.0)
    sched = inject(_recipe(llava_triple, schedule=[0.0, 1.0]), tmp_path / "sched", progress=False)
    swap = inject(_recipe(llava_triple, method="layerswap", parameters={"first_k": 1, "last_k": 0}),
                  tmp_path / "swap", progress=False)
    for res in (sched, swap):
        got = load_weights(res.out_dir)
        for k in v:
            kept = ".layers.0." in k or "embed_tokens" in k or not k.startswith("language_model")
            want = v[k] if kept else ta[k]
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode", ["inject", "symmetric"])
@pytest.mark.parametrize("method", ["ta", "ties"])
def test_merge_entry_large_tensor_formula_and_sampled_statistics(mode, method):
    """Above 1M entries the merge is still exact and the norm statistics, measured on every 8th
    row, stay within a few percent of the exact ones."""
    from skillgraft import engine
    from skillgraft.mapping.plan import Entry
    from skillgraft.methods import get_method

    g = torch.Generator().manual_seed(0)
    shape = (2048, 1024)  # 2M entries: statistics on every 8th row
    b = torch.randn(shape, generator=g)
    v = b + 0.05 * torch.randn(shape, generator=g)
    e = b + 0.05 * torch.randn(shape, generator=g)
    entry = Entry("w", shape, torch.float32, "merge", "test", lm_name="w", expert_names=("w",), base_name="w")
    assert engine.stats_stride(entry) == engine.STATS_STRIDE
    assert engine.stats_stride(Entry("n", (1024,), torch.float32, "merge", "t")) == 1
    density = 1.0 if method == "ta" else 0.5
    m = get_method(method)
    s = engine.MergeSettings(method=m, params=m.resolve_params({}), mode=mode, scales=[0.8], densities=[density],
                             vlm_density=density)
    out, norms = engine.merge_tensor(entry, Inputs(v, b, [e]), s, torch.device("cpu"), torch.float32)
    if method == "ta":
        want = v + 0.8 * (e - b) if mode == "inject" else b + (v - b) + 0.8 * (e - b)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    exact_change = float(torch.linalg.vector_norm(out - v) / torch.linalg.vector_norm(v))
    exact_delta = float(torch.linalg.vector_norm(e - b) / torch.linalg.vector_norm(b))
    assert norms.rel_change() == pytest.approx(exact_change, rel=0.05)
    assert norms.rel_deltas()[0] == pytest.approx(exact_delta, rel=0.05)


# ------------------------------------------------------------------------------- streaming and memory


def _run_with(recipe, out, budget=None, max_memory=None, workers=1):
    """``inject`` through ``engine.run`` with an explicit budget (block size, read-ahead, hold limit)."""
    from contextlib import ExitStack

    from skillgraft import engine
    from skillgraft.io.writer import ShardedWriter
    from skillgraft.pipeline import prepare

    out.mkdir()
    with ExitStack() as stack:
        prep = prepare(recipe, stack)
        writer = ShardedWriter(out, engine.output_specs(prep.plan, recipe.dtype), 10**9)
        stats = engine.run(prep.plan, prep.settings, writer, progress=False, budget=budget, max_memory=max_memory,
                           workers=workers)
        writer.finish()
    return stats


@pytest.fixture(scope="module")
def bitid(tmp_path_factory):
    from test_bit_identity import FIXTURES, build_fixture

    root = tmp_path_factory.mktemp("stream")
    return {name: build_fixture(root / name, **FIXTURES[name]) for name in ("small", "large")}


STREAMED = ["large_ties", "large_dare_ties", "large_della", "large_breadcrumbs_ties_symmetric", "large_dare",
            "large_consensus", "ties_two_normalize", "dare_ties_symmetric", "della", "consensus_ties_symmetric",
            "slerp", "model_stock", "dare_l1"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", STREAMED)
def test_output_bits_do_not_depend_on_the_memory_budget_or_workers(bitid, tmp_path, case, workers):
    """Tiny row blocks, no holding between passes (every pass re-reads the files, thresholds from sampled
    rows), a small read-ahead, one or two merge workers: the bits recorded on the whole-tensor engine."""
    from test_bit_identity import CASES, DATA, _recipe, weights_digest

    from skillgraft.engine import Budget

    fixture, fields = CASES[case]
    # the small fixture's tensors hold 64..1536 entries: 300-entry blocks still split them
    block = 50_000 if fixture == "large" else 300
    budget = Budget(max_memory=0, block_entries=block, ahead=300_000, hold=0, band_cap=20_000)
    if case in ("slerp", "model_stock", "dare_l1"):  # whole-tensor float reductions: one block per tensor
        budget = Budget(max_memory=0, ahead=300_000, hold=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the recorded hashes were
    try:
        _run_with(_recipe(bitid[fixture], fields), tmp_path / "o", budget=budget, workers=workers)
    finally:
        torch.set_num_threads(threads)
    assert weights_digest(tmp_path / "o") == json.loads(DATA.read_text())[case]


def test_max_memory_too_small_is_refused_up_front(llava_triple, tmp_path):
    from skillgraft.errors import SkillgraftError
    from skillgraft.memory import rss_bytes

    with pytest.raises(SkillgraftError, match="max_memory .* too small"):
        inject(_recipe(llava_triple), tmp_path / "o", progress=False, max_memory=rss_bytes() // 2)
    assert not (tmp_path / "o").exists()


def test_whole_matrix_methods_say_so_and_are_bounded(bitid, tmp_path):
    from skillgraft.errors import SkillgraftError
    from skillgraft.memory import rss_bytes

    r = Recipe(vlm=str(bitid["large"]["vlm"]), base=str(bitid["large"]["base"]), method="iso_c",
               experts=[ExpertSpec(model=str(bitid["large"]["expert-a"]))])
    # one 2100 x 2048 float32 matrix with its SVD is ~70 MB: allow a little less than that beyond this process
    with pytest.raises(SkillgraftError, match="holds each matrix whole for its SVD.*2100 x 2048"):
        inject(r, tmp_path / "o", progress=False, max_memory=rss_bytes() + 150 * 2**20)
    from contextlib import ExitStack

    from skillgraft.engine import describe_plan
    from skillgraft.pipeline import prepare

    with ExitStack() as stack:
        prep = prepare(r, stack)
        lines = describe_plan(prep.plan, prep.settings)
    assert "iso_c holds each of 9 matrices whole for its SVD (largest: language_model.lm_head.weight, 2100 x 2048" \
        in lines[0]


def test_run_changes_no_process_wide_state(llava_triple, tmp_path, monkeypatch):
    import ctypes

    real = ctypes.CDLL

    class NoSettings:
        """libc, less mallopt: handing free pages back is allowed, changing the allocator is the CLI's."""

        def __init__(self, *a, **k):
            self.lib = real(*a, **k)

        def __getattr__(self, name):
            if name == "mallopt":
                raise AssertionError("the engine changed an allocator setting (that is the CLI's)")
            return getattr(self.lib, name)

    monkeypatch.setattr(ctypes, "CDLL", NoSettings)
    threads = torch.get_num_threads()
    inject(_recipe(llava_triple, method="ties", density=0.5), tmp_path / "o", progress=False)
    assert torch.get_num_threads() == threads


# ------------------------------------------------------------------------------- non-finite numbers


def _damaged(src, dst, name, value):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t[name] = t[name].clone()
    t[name].view(-1)[3] = value
    save_file(t, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("who, value", [("expert", float("nan")), ("base", float("inf")), ("vlm", float("-inf"))])
def test_non_finite_inputs_are_refused_naming_tensor_and_file(llava_triple, tmp_path, who, value):
    from skillgraft.errors import SkillgraftError

    t = llava_triple
    name = "language_model.model.layers.1.mlp.up_proj.weight" if who == "vlm" else "model.layers.1.mlp.up_proj.weight"
    paths = {"vlm": t.vlm, "base": t.base, "expert": t.expert}
    paths[who] = _damaged(paths[who], tmp_path / who, name, value)
    r = Recipe(vlm=str(paths["vlm"]), base=str(paths["base"]), method="ties",
               experts=[ExpertSpec(model=str(paths["expert"]), density=0.5)])
    with pytest.raises(SkillgraftError, match=r"non-finite values .* in language_model\.model\.layers\.1\.mlp\.up_proj"
                                              rf"\.weight of {tmp_path / who}/model\.safetensors") as err:
        inject(r, tmp_path / "o", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_float16_overflow_is_refused(llava_triple, tmp_path):
    from skillgraft.errors import SkillgraftError

    t = llava_triple
    big = _damaged(t.expert, tmp_path / "expert", "model.layers.0.mlp.up_proj.weight", 1000.0)  # finite, large
    r = Recipe(vlm=str(t.vlm), base=str(t.base), dtype="float16", experts=[ExpertSpec(model=str(big), scale=100)])
    with pytest.raises(SkillgraftError, match=r"merged language_model\..*up_proj.weight overflows float16 \(largest "
                                              r"magnitude 1e\+05\); merge to bfloat16 or float32"):
        inject(r, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- experts that hold task vectors


class DeltaReader:
    """A reader over a dict of task vectors (what a skill or LoRA reader hands the engine)."""

    holds_deltas = True

    def __init__(self, tensors, config):
        self.t, self.config, self.root = tensors, config, "<deltas>"

    @property
    def names(self):
        return list(self.t)

    def __contains__(self, name):
        return name in self.t

    def shape(self, name):
        return tuple(self.t[name].shape)

    def dtype(self, name):
        return self.t[name].dtype

    def nbytes(self, name):
        return self.t[name].numel() * self.t[name].element_size()

    def get(self, name):
        return self.t[name].clone()

    def get_rows(self, name, rows):
        return self.t[name][:rows].clone()


@pytest.mark.parametrize("method, density", [("ta", 1.0), ("ties", 0.4), ("dare_ties", 0.5)])
def test_experts_holding_task_vectors_merge_without_a_base(llava_triple, tmp_path, method, density):
    from skillgraft import engine
    from skillgraft.io.reader import CheckpointReader
    from skillgraft.io.writer import ShardedWriter
    from skillgraft.mapping.plan import build_plan
    from skillgraft.pipeline import _settings

    t = llava_triple
    want = inject(_recipe(t, method=method, density=density, scale=0.7, seed=2), tmp_path / "want", progress=False)
    e, b = load_weights(t.expert), load_weights(t.base)
    skill = DeltaReader({k: v.float() - b[k].float() for k, v in e.items()}, CheckpointReader(t.expert).config)
    recipe = _recipe(t, method=method, density=density, scale=0.7, seed=2)
    settings, _ = _settings(recipe)
    with CheckpointReader(t.vlm) as vlm:
        plan = build_plan(vlm, [("expert", skill)], None)
        assert plan.base is None
        settings.n_layers = plan.n_layers
        (tmp_path / "got").mkdir()
        writer = ShardedWriter(tmp_path / "got", engine.output_specs(plan, "auto"), 10**9)
        engine.run(plan, settings, writer, progress=False)
        writer.finish()
    got, ref = load_weights(tmp_path / "got"), load_weights(want.out_dir)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_cli_max_memory_dry_run_and_refusal(llava_triple, tmp_path, capsys):
    from skillgraft.cli import main

    t = llava_triple
    args = ["inject", str(t.vlm), str(t.expert), "--base", str(t.base), "--method", "ties", "--density", "0.5"]
    assert main([*args, "--dry-run", "--max-memory", "4GB"]) == 0
    out = capsys.readouterr().out
    assert "memory: at most 3.73 GiB; row blocks of up to 4,194,304 entries" in out
    assert "a top-k threshold per task vector" in out
    assert main([*args, "--max-memory", "10MB", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: max_memory 0.01 GB is too small: this process already uses")
    assert main([*args, "--max-memory", "lots", "-o", str(tmp_path / "o")]) == 2
    assert "not a memory size: 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_methods_lists_typed_parameters(capsys):
    from skillgraft.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "--param gamma: float in [0, 1), default 0.01, per layer." in out
    assert "holds each 2-D tensor whole in float32 for its SVD" in out  # tsv, iso_c
    assert "statistics pass: a top-k threshold per task vector" in out


def test_density_and_method_parameters_take_per_layer_schedules(llava_triple, tmp_path):
    """Two layers, density [0.2, 0.8] and gamma [0, 0.1]: each layer's tensors are those of the merge run
    with that layer's values (mergekit-gradient semantics, like scale schedules)."""
    t = llava_triple
    sched = inject(_recipe(t, method="breadcrumbs", density=[0.2, 0.8], parameters={"gamma": [0.0, 0.1]}),
                   tmp_path / "s", progress=False)
    flat = {layer: inject(_recipe(t, method="breadcrumbs", density=d, parameters={"gamma": g}),
                          tmp_path / f"l{layer}", progress=False) for layer, d, g in ((0, 0.2, 0.0), (1, 0.8, 0.1))}
    got = load_weights(sched.out_dir)
    for layer, res in flat.items():
        ref = load_weights(res.out_dir)
        names = [k for k in ref if f".layers.{layer}." in k]
        assert names and all(torch.equal(got[k], ref[k]) for k in names)
    assert not torch.equal(got["language_model.model.layers.0.mlp.up_proj.weight"],
                           load_weights(flat[1].out_dir)["language_model.model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(Exception, match="cannot vary per layer"):
        inject(_recipe(t, method="ties", density=0.5, parameters={"sign_from": ["count"]}), tmp_path / "x",
               progress=False)


# ------------------------------------------------------------------------------- heap guard


def test_heap_guard_releases_only_past_its_limit_and_after_growth(monkeypatch):
    from skillgraft import memory

    rss = [100]
    released = []
    monkeypatch.setattr(memory, "rss_bytes", lambda: rss[0])
    monkeypatch.setattr(memory, "release_free_memory", lambda: released.append(rss[0]) or True)
    guard = memory.HeapGuard(limit=1000, slack=50)
    guard.enabled = True
    guard()
    assert released == []  # under the limit
    rss[0] = 1200
    guard()
    assert released == [1200] and guard.after == 1200
    rss[0] = 1230
    guard()
    assert released == [1200]  # over the limit, but not 50 bytes more since the last release
    rss[0] = 1260
    guard()
    assert released == [1200, 1260] and guard.releases == 2



def test_cli_dry_run_plans_the_budget_the_run_uses(llava_triple, tmp_path, capsys, monkeypatch):
    """--dry-run sizes blocks for the merge workers the real run uses, so what it accepts the run accepts."""
    from skillgraft import pipeline
    from skillgraft.cli import main

    calls = []
    real = pipeline.plan_budget

    def recording(plan, settings, max_memory=None, workers=1):
        calls.append((max_memory, workers))
        return real(plan, settings, max_memory, workers)

    monkeypatch.setattr(pipeline, "plan_budget", recording)
    t = llava_triple
    args = ["inject", str(t.vlm), str(t.expert), "--base", str(t.base), "--method", "ties", "--density", "0.5",
            "--max-memory", "2GB"]
    assert main([*args, "--dry-run"]) == 0
    assert main([*args, "-o", str(tmp_path / "o")]) == 0
    assert len(calls) == 2 and calls[0] == calls[1], calls
    assert f"({calls[0][1]} merged at once)" in capsys.readouterr().out
