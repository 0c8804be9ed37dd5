"""Streamed merges: the engine's block-by-block passes give the whole-tensor result.

Methods whose statistic is a top-k threshold (TIES, Breadcrumbs, consensus over TIES) or whose
randomness is row-local (DARE, DELLA) are exact at any block size: same bits. Methods whose
statistic is a float reduction over the whole tensor (a norm-matching rescale, SLERP's angle,
Model Stock's cosine) assemble it from per-block reductions in float64, so with more than one block
they differ from a single float32 reduction by rounding only (bit for bit with one block, which
the bit-identity test covers). The float32 whole-tensor sum is the less accurate of the two: over
these 210k entries its relative error reaches ~1e-4, so streamed and whole results agree to 1e-3 of
the merged delta's largest entry.
"""

from __future__ import annotations

import pytest
import torch

from skillgraft import engine
from skillgraft.engine import Budget, MergeSettings, merge_tensor
from skillgraft.mapping.plan import Entry
from skillgraft.methods import METHODS
from skillgraft.methods.sparsify import magnitude_mask
from skillgraft.methods.streams import BlockStreams
from skillgraft.methods.topk import TopK, keep_count
from skillgraft.sources import Inputs

SHAPE = (700, 300)  # 210k entries: more than the exact-threshold size, so the sampled bracket is used


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(SHAPE, generator=g)
    # heavy ties in magnitude (a coarse grid), so ties across block borders are exercised
    v = b + (torch.randn(SHAPE, generator=g) * 16).round() / 320
    es = [b + (torch.randn(SHAPE, generator=g) * 16).round() / 320 for _ in range(2)]
    return v, b, es


def merged(tensors, name, params, density, mode, block_entries):
    v, b, es = tensors
    m = METHODS[name]
    n = 1 if name == "slerp" else 2
    s = MergeSettings(m, m.resolve_params(params), mode, [0.8, 0.6][:n], [density] * n, vlm_density=density, seed=3,
                      n_layers=2)
    entry = Entry("w", SHAPE, torch.float32, "merge", "t", lm_name="layers.1.mlp.up_proj.weight",
                  expert_names=("w",) * n, base_name="w")
    saved = engine.IN_MEMORY
    engine.IN_MEMORY = Budget(0, block_entries=block_entries, hold=1 << 62, band_cap=50_000)
    try:
        return merge_tensor(entry, Inputs(v, b, es[:n]), s, torch.device("cpu"), torch.float32)[0]
    finally:
        engine.IN_MEMORY = saved


EXACT = [("ties", {}, 0.3), ("ties", {"normalize": True, "sign_from": "count"}, 0.6),
         ("breadcrumbs", {"gamma": 0.05}, 0.4), ("breadcrumbs_ties", {"gamma": 0.02}, 0.7),
         ("consensus", {"base": "ties", "k": 1}, 0.5), ("della", {}, 0.5), ("della_linear", {"epsilon": 0.2}, 0.4),
         ("dare", {}, 0.3), ("dare_ties", {"sampler": "bernoulli"}, 0.5), ("tsv", {}, 1.0), ("iso_c", {}, 1.0),
         ("linear", {}, 1.0), ("ta", {}, 1.0), ("model_stock", {"filter_wise": True}, 1.0)]
ROUNDED = [("dare", {"rescale": "l1"}, 0.4), ("della", {"rescale": "l2"}, 0.5), ("dare_ties", {"rescale": "linf"}, 0.5),
           ("model_stock", {}, 1.0), ("slerp", {}, 1.0), ("slerp", {"t": 0.3}, 1.0)]


@pytest.mark.parametrize("mode", ["inject", "symmetric"])
@pytest.mark.parametrize("name, params, density", EXACT)
def test_streamed_equals_whole_tensor_exactly(tensors, name, params, density, mode):
    whole = merged(tensors, name, params, density, mode, 1 << 22)
    for block in (9000, 2100):  # 30 and 7 rows per block
        assert torch.equal(merged(tensors, name, params, density, mode, block), whole), block


@pytest.mark.parametrize("mode", ["inject", "symmetric"])
@pytest.mark.parametrize("name, params, density", ROUNDED)
def test_streamed_whole_tensor_reductions_within_rounding(tensors, name, params, density, mode):
    whole = merged(tensors, name, params, density, mode, 1 << 22)
    streamed = merged(tensors, name, params, density, mode, 3000)
    scale = float((whole - tensors[0]).abs().max())
    assert float((streamed - whole).abs().max()) <= 1e-3 * scale
    # the random masks themselves are the same: the same entries are kept
    assert torch.equal(streamed != tensors[0], whole != tensors[0]) or name in ("model_stock", "slerp")


def test_whole_tensor_method_equals_its_one_call_form(tensors):
    """The engine's streamed TIES equals ``Method.fn`` on the whole task vectors."""
    v, b, es = tensors
    m = METHODS["ties"]
    taus = [e - b for e in es]
    want = v + m.fn(taus, [0.8, 0.6], [0.3, 0.3])
    assert torch.equal(merged(tensors, "ties", {}, 0.3, "inject", 3000), want)


# ----------------------------------------------------------------------------------- top-k


def _naive_mask(x, k):
    """Reference: top-k by |x|, ties broken by position (stable sort on -|x|)."""
    order = torch.sort(-x.abs().flatten(), stable=True).indices[:k]
    m = torch.zeros(x.numel(), dtype=torch.bool)
    m[order] = True
    return m.view(x.shape)


def _streamed_mask(x, k, sample, blocks):
    t = TopK(x.numel(), k, sample)
    flat = x.reshape(-1)
    parts = [flat[i : i + blocks] for i in range(0, flat.numel(), blocks)]
    passes = 0
    while True:
        for p in parts:
            t.observe(p.abs())
        t.finish()
        passes += 1
        if not t.refine:
            break
    return torch.cat([t.mask(p.abs()) for p in parts]).view(x.shape), passes


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_topk_band_pass_is_exact_with_ties(density):
    x = (torch.randn(400, 600, generator=torch.Generator().manual_seed(1)) * 8).round() / 8
    k = keep_count(x.numel(), density)
    sample = x.reshape(-1)[::7].abs()
    mask, passes = _streamed_mask(x, k, sample, 5003)
    assert passes == 1 and torch.equal(mask, _naive_mask(x, k))


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_topk_radix_fallback_when_the_sample_misses(density):
    """A sample from another distribution brackets the wrong place: two radix passes find the exact threshold."""
    x = torch.randn(300, 500, generator=torch.Generator().manual_seed(2))
    x[:40] = 0.0  # rows of exact zeros (untrained tokens), and many ties
    k = keep_count(x.numel(), density)
    wrong = torch.rand(50_000, generator=torch.Generator().manual_seed(3)) * 100 + 50
    mask, passes = _streamed_mask(x, k, wrong, 7919)
    assert passes == 3 and torch.equal(mask, _naive_mask(x, k))


def test_topk_band_cap_forces_the_radix_passes():
    x = torch.randn(200, 800, generator=torch.Generator().manual_seed(4))
    k = keep_count(x.numel(), 0.5)
    t = TopK(x.numel(), k, x.reshape(-1)[::3].abs(), band_cap=10)
    for _ in range(3):
        t.observe(x.abs())
        t.finish()
    assert not t.refine and torch.equal(t.mask(x.abs()), _naive_mask(x, k))


def test_magnitude_mask_matches_reference_on_small_and_sampled_sizes():
    for shape in ((7,), (300, 11), (700, 500)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        for d in (0.01, 0.5, 0.97):
            assert torch.equal(magnitude_mask(x, d), _naive_mask(x, keep_count(x.numel(), d)))


# ----------------------------------------------------------------------------------- random streams


@pytest.mark.parametrize("kind", ["words", "floats"])
def test_block_streams_continue_across_pieces(kind):
    """Three drawers over a random block of n entries: drawn whole, or in odd pieces, the same bits."""
    n, p = 10_001, 0.37

    def draw(pieces):
        s = BlockStreams(torch.Generator().manual_seed(9), n, 3, kind)
        out = [[] for _ in range(3)]
        start = 0
        for size in pieces:
            for j in range(3):
                out[j].append(s.keep(j, (size,), p, torch.device("cpu")))
            start += size
        return [torch.cat(o) for o in out]

    whole = [None] * 3
    s = BlockStreams(torch.Generator().manual_seed(9), n, 3, kind)
    for j in range(3):  # drawer by drawer, each its whole block: the order the streams stand for
        whole[j] = s.keep(j, (n,), p, torch.device("cpu"))
    for pieces in ([n], [1, 2, 3, n - 6], [4999, 5002]):
        got = draw(pieces)
        assert all(torch.equal(a, b) for a, b in zip(got, whole)), pieces
    assert abs(float(whole[0].float().mean()) - p) < 0.02


def test_della_ranks_a_vector_as_one_row_whatever_the_block_size():
    """DELLA ranks magnitudes within rows and a 1-D tensor is one row: it is never cut into blocks."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(5000, generator=g)
    es = [b + 0.05 * torch.randn(5000, generator=g)]
    m = METHODS["della"]
    s = MergeSettings(m, m.resolve_params({}), "inject", [1.0], [0.5], seed=1, n_layers=2)
    entry = Entry("v", (5000,), torch.float32, "merge", "t", lm_name="layers.0.input_layernorm.weight",
                  expert_names=("v",), base_name="v")
    outs = []
    for block in (1 << 22, 300):
        saved = engine.IN_MEMORY
        engine.IN_MEMORY = Budget(0, block_entries=block, hold=1 << 62)
        try:
            outs.append(merge_tensor(entry, Inputs(b.clone(), b, es), s, torch.device("cpu"), torch.float32)[0])
        finally:
            engine.IN_MEMORY = saved
    assert torch.equal(outs[0], outs[1])
