"""Merge methods on plain tensors: the registry, hand-computed cases, and the sparsifiers."""

from __future__ import annotations

import math

import pytest
import torch

from skillgraft.methods import METHODS, get_method
from skillgraft.methods.sparsify import (
    della_probabilities,
    keep_count,
    magnitude_mask,
    outlier_mask,
    random_mask,
)

T = torch.tensor


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(name, deltas, weights, densities=None, seed=0, **params):
    m = METHODS[name]
    p = m.resolve_params(params)
    if m.kind == "delta":
        densities = densities or [1.0] * len(deltas)
        return m.fn(deltas, weights, densities, generator=gen(seed), **p)
    return m.fn(deltas, weights, generator=gen(seed), **p)


# --------------------------------------------------------------------------- registry


EXPECTED = {
    "ta", "ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "consensus", "tsv", "iso_c", "linear", "slerp", "model_stock", "layerswap",
}


def test_registry_has_every_method_with_paper_and_docstring():
    assert set(METHODS) == EXPECTED
    for name, m in METHODS.items():
        assert m.name == name
        assert m.paper and m.summary
        assert m.fn.__doc__, name
        assert len({p.name for p in m.params}) == len(m.params)
        assert m.kind in ("delta", "interp")
    assert METHODS["layerswap"].layer_rule == "layerswap"
    assert all(m.layer_rule is None for n, m in METHODS.items() if n != "layerswap")
    assert {n for n, m in METHODS.items() if m.stochastic} == {"dare", "dare_ties", "della", "della_linear"}
    assert not METHODS["linear"].needs_base and METHODS["ta"].needs_base


def test_get_method_and_resolve_params_errors():
    with pytest.raises(ValueError, match="choose one of"):
        get_method("nope")
    m = get_method("ties")
    assert m.resolve_params({}) == {"sign_from": "weighted", "normalize": False, "lambda": 1.0}
    with pytest.raises(ValueError, match="has no parameter 'gama'"):
        get_method("breadcrumbs").resolve_params({"gama": 0.1})
    with pytest.raises(ValueError, match="must be one of"):
        m.resolve_params({"sign_from": "majority"})


def test_check_rejects_impossible_settings_before_any_weight_is_read():
    get_method("ta").check([1.0])
    with pytest.raises(ValueError, match="at least 2 task vectors.*symmetric"):
        get_method("model_stock").check([1.0])
    get_method("model_stock").check([1.0, 1.0])
    with pytest.raises(ValueError, match="k=2 needs at least 2"):
        get_method("consensus").check([1.0])
    get_method("consensus").check([1.0], {"k": 1})
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        get_method("della").check([0.1], {"epsilon": 0.15})
    get_method("della").check([0.5, 1.0])
    with pytest.raises(ValueError, match="at most 2"):
        get_method("slerp").check([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2 models"):
        get_method("linear").check([1.0])
    with pytest.raises(ValueError, match="first_k"):
        get_method("layerswap").check([1.0], {"first_k": -1})
    with pytest.raises(ValueError, match="density must be in"):
        get_method("ties").check([0.0])


def test_unknown_kwarg_is_an_error_not_silently_ignored():
    with pytest.raises(TypeError):
        METHODS["ta"].fn([T([1.0])], [1.0], [1.0], generator=None, densty=0.5)


# --------------------------------------------------------------------------- worked example (docs)


def test_worked_example_inject_vs_symmetric():
    base = torch.zeros(4)
    tau_v = T([4.0, -1.0, 2.0, 0.5])
    tau_e = T([-3.0, 2.0, 0.2, 1.0])
    theta_v = base + tau_v
    ties = METHODS["ties"].fn
    inject = theta_v + ties([tau_e], [1.0], [0.5], generator=None)
    assert inject.tolist() == [1.0, 1.0, 2.0, 0.5]
    symmetric = base + ties([tau_v, tau_e], [1.0, 1.0], [0.5, 0.5], generator=None)
    assert symmetric.tolist() == [4.0, 2.0, 2.0, 0.0]


# --------------------------------------------------------------------------- TA


def test_ta_is_weighted_sum_times_lambda():
    a, b = T([1.0, -2.0, 3.0]), T([0.5, 0.5, -1.0])
    assert torch.allclose(call("ta", [a, b], [2.0, -1.0]), T([1.5, -4.5, 7.0]))
    assert torch.allclose(call("ta", [a, b], [2.0, -1.0], **{"lambda": 0.5}), T([0.75, -2.25, 3.5]))


# --------------------------------------------------------------------------- TIES, two experts by hand

# tau_1 and tau_2 with density 0.5 on 4 entries keep 2 entries each:
A = T([3.0, -2.0, 0.5, 1.0])  # trim -> [3, -2, 0, 0]
B = T([-1.0, -4.0, 2.0, 0.1])  # trim -> [0, -4, 2, 0]


@pytest.mark.parametrize(
    "weights, sign_from, normalize, expected",
    [
        # elected: [+, -, +, +]; agreeing entries: pos0 A only, pos1 both, pos2 B only
        ([1.0, 1.0], "weighted", False, [3.0, -6.0, 2.0, 0.0]),
        ([1.0, 1.0], "weighted", "weights", [3.0, -3.0, 2.0, 0.0]),
        ([1.0, 1.0], "weighted", "count", [3.0, -3.0, 2.0, 0.0]),
        # weights 0.5 and 2: weighted sums [1.5, -9, 4, 0] -> same signs; sum = [1.5, -1 - 8, 4, 0]
        ([0.5, 2.0], "weighted", False, [1.5, -9.0, 4.0, 0.0]),
        ([0.5, 2.0], "weighted", "weights", [3.0, -9.0 / 2.5, 2.0, 0.0]),
        ([0.5, 2.0], "unweighted", "count", [1.5, -4.5, 4.0, 0.0]),
    ],
)
def test_ties_two_experts_by_hand(weights, sign_from, normalize, expected):
    out = call("ties", [A, B], weights, [0.5, 0.5], sign_from=sign_from, normalize=normalize)
    assert torch.allclose(out, T(expected)), out


def test_ties_weighted_vs_unweighted_sign_election_differ_by_hand():
    # entry: tau_1 = 1, tau_2 = -3; weights 5 and 1 -> weighted mass 5 - 3 = 2 (+), unweighted 1 - 3 = -2 (-)
    a, b = T([1.0]), T([-3.0])
    assert call("ties", [a, b], [5.0, 1.0], sign_from="weighted").item() == 5.0
    assert call("ties", [a, b], [5.0, 1.0], sign_from="unweighted").item() == -3.0
    # count: one + and one - -> sum 0 elects +
    assert call("ties", [a, b], [5.0, 1.0], sign_from="count").item() == 5.0


def test_ties_negative_weight_flips_agreement_in_weighted_mode():
    a, b = T([2.0]), T([1.0])
    # weighted entries: -2 and +1 -> elected -, only the first (weighted -2) agrees
    assert call("ties", [a, b], [-1.0, 1.0]).item() == -2.0


def test_ties_zero_sum_elects_plus_and_zeros_never_count():
    a, b = T([2.0, 0.0]), T([-2.0, 0.0])
    out = call("ties", [a, b], [1.0, 1.0], normalize="count")
    assert out.tolist() == [2.0, 0.0]


def test_ties_single_expert_default_is_lambda_times_trim():
    torch.manual_seed(1)
    tau = torch.randn(64, 32)
    out = call("ties", [tau], [0.7], [0.3])
    mask = magnitude_mask(tau, 0.3)
    assert torch.allclose(out, 0.7 * tau * mask)
    # mergekit-style normalisation divides lambda back out
    out_n = call("ties", [tau], [0.7], [0.3], normalize=True)
    assert torch.allclose(out_n, tau * mask)


# --------------------------------------------------------------------------- DARE / DARE-TIES by hand


def test_dare_rescales_kept_entries_by_one_over_density():
    tau = torch.full((10_000,), 2.0)
    out = call("dare", [tau], [1.0], [0.25], seed=3)
    kept = out != 0
    assert torch.all(out[kept] == 8.0)  # 2 / 0.25, never 2 (the forgotten-rescale bug)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert abs(out.mean().item() - 2.0) < 0.1
    no = call("dare", [tau], [1.0], [0.25], seed=3, rescale=False)
    assert torch.all(no[no != 0] == 2.0)
    l1 = call("dare", [tau], [1.0], [0.25], seed=3, rescale="l1")
    assert math.isclose(l1.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)


def test_dare_ties_two_experts_by_hand():
    torch.manual_seed(0)
    a, b = torch.randn(50, 40), torch.randn(50, 40)
    g = gen(11)
    ma, mb = random_mask(a, 0.4, g), random_mask(b, 0.6, g)  # same draws the method makes, in order
    da, db = a * ma / 0.4, b * mb / 0.6
    wa, wb = 0.8, 1.5
    mass = wa * da + wb * db
    pos = mass >= 0
    agree_a = torch.where(pos, da > 0, da < 0)
    agree_b = torch.where(pos, db > 0, db < 0)
    expected = wa * da * agree_a + wb * db * agree_b
    out = call("dare_ties", [a, b], [wa, wb], [0.4, 0.6], seed=11)
    assert torch.allclose(out, expected, atol=1e-6)
    norm = call("dare_ties", [a, b], [wa, wb], [0.4, 0.6], seed=11, normalize=True)
    div = wa * agree_a.float() + wb * agree_b.float()
    div[div == 0] = 1
    assert torch.allclose(norm, expected / div, atol=1e-6)


@pytest.mark.parametrize("sampler", ["uniform", "bernoulli"])
def test_dare_draws_one_mask_per_task_vector_in_order(sampler):
    a = torch.ones(1000)
    g = gen(5)
    m1 = random_mask(a, 0.5, g, sampler)
    m2 = random_mask(a, 0.5, g, sampler)
    out = call("dare", [a, a], [1.0, 0.0], [0.5, 0.5], seed=5, sampler=sampler)
    assert torch.equal(out != 0, m1)
    out2 = call("dare", [a, a], [0.0, 1.0], [0.5, 0.5], seed=5, sampler=sampler)
    assert torch.equal(out2 != 0, m2)
    assert abs(m1.float().mean().item() - 0.5) < 0.06


# --------------------------------------------------------------------------- sparsifiers


def test_keep_count_follows_mergekit_and_peft_floor():
    assert keep_count(10, 0.35) == 3
    assert keep_count(10, 0.01) == 1  # mergekit keeps at least one
    assert keep_count(10, 1.0) == 10
    assert keep_count(100, 0.29) == int(0.29 * 100)  # 28: float floor, as both tools do


@pytest.mark.parametrize("shape", [(7,), (300, 11), (700, 500)])  # the last one takes the banded path
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_magnitude_mask_is_exact_topk(shape, density):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape)
    m = magnitude_mask(x, density)
    k = keep_count(x.numel(), density)
    assert int(m.sum()) == k
    thr = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    assert bool((x.abs()[m] >= thr).all()) and bool((x.abs()[~m] <= thr).all())


def test_magnitude_mask_with_many_ties_keeps_exact_count_by_position():
    x = torch.ones(400_000)
    x[::3] = 2.0
    m = magnitude_mask(x, 0.5)
    assert int(m.sum()) == 200_000
    assert bool(m[::3].all())  # all the 2s
    ones_kept = m & (x == 1.0)
    idx = ones_kept.nonzero().flatten()
    assert idx.max() < (x == 1.0).nonzero().flatten()[int(ones_kept.sum())]  # the first ones by position


def test_outlier_mask_by_hand():
    x = T([0.1, -5.0, 3.0, 0.2, -2.0, 1.0, 0.05, 4.0, -0.3, 0.4])
    # density 0.5 -> keep 5; gamma 0.1 -> drop the top 1 (|-5|), then keep the next 5 by magnitude
    m = outlier_mask(x, 0.5, 0.1)
    assert m.tolist() == [False, False, True, False, True, True, False, True, False, True]
    # density + gamma > 1: outlier removal shrinks so 9 are still kept
    assert int(outlier_mask(x, 0.9, 0.2).sum()) == 9
    out = call("breadcrumbs", [x], [2.0], [0.5], gamma=0.1)
    assert torch.allclose(out, 2.0 * x * m)


def test_della_probabilities_by_hand():
    x = T([[0.1, -3.0, 2.0], [5.0, 0.0, -1.0]])
    p = della_probabilities(x, 0.5, 0.2)
    assert torch.allclose(p, T([[0.3, 0.7, 0.5], [0.7, 0.3, 0.5]]))
    p1 = della_probabilities(T([1.0, -4.0, 2.0, 0.0, 3.0]), 0.5, 0.1)  # 1-D: one row
    assert torch.allclose(p1, T([0.45, 0.6, 0.5, 0.4, 0.55]))


def test_della_rescales_by_keep_probability():
    x = torch.arange(1.0, 2001.0).reshape(1, -1)
    out = call("della_linear", [x], [1.0], [0.5], seed=2, epsilon=0.2)
    p = della_probabilities(x, 0.5, 0.2)
    kept = out != 0
    assert torch.allclose(out[kept], (x / p)[kept])
    assert abs(kept[:, :500].float().mean().item() - 0.35) < 0.06  # small entries kept less
    assert abs(kept[:, -500:].float().mean().item() - 0.65) < 0.06
    with_eps0 = call("della_linear", [x], [1.0], [0.5], seed=2, epsilon=0.0)
    assert abs((with_eps0 != 0).float().mean().item() - 0.5) < 0.05


def test_della_is_ties_election_after_magprune():
    torch.manual_seed(4)
    a, b = torch.randn(30, 20), torch.randn(30, 20)
    lin_a = call("della_linear", [a, b], [1.0, 0.0], [0.5, 0.5], seed=9)
    lin_b = call("della_linear", [a, b], [0.0, 1.0], [0.5, 0.5], seed=9)
    out = call("della", [a, b], [1.0, 1.0], [0.5, 0.5], seed=9)
    pos = (lin_a + lin_b) >= 0
    exp = lin_a * torch.where(pos, lin_a > 0, lin_a < 0) + lin_b * torch.where(pos, lin_b > 0, lin_b < 0)
    assert torch.allclose(out, exp, atol=1e-6)


# --------------------------------------------------------------------------- consensus / TALL


def test_consensus_by_hand():
    t1 = T([1.0, 1.0, 0.0, 2.0])
    t2 = T([1.0, -0.1, 1.0, -2.0])
    # total = [2, 0.9, 1, 0]; TALL (lambda 1): t1: |1|>=|1| y, |1|>=|-.1| y, 0>=1 n, 2>=2 y
    #                                          t2: y, |.1|>=1 n, 1>=0 y, 2>=2 y
    out = call("consensus", [t1, t2], [1.0, 1.0], tall_lambda=1.0, k=2)
    assert out.tolist() == [2.0, 0.0, 0.0, 0.0]
    out1 = call("consensus", [t1, t2], [1.0, 1.0], tall_lambda=1.0, k=1)
    assert torch.allclose(out1, T([2.0, 0.9, 1.0, 0.0]))
    with pytest.raises(ValueError, match="k=2 needs"):
        call("consensus", [t1], [1.0])


# --------------------------------------------------------------------------- subspace


def test_tsv_single_task_default_returns_the_task_vector():
    torch.manual_seed(0)
    tau = torch.randn(24, 16)
    assert torch.allclose(call("tsv", [tau], [0.5]), 0.5 * tau, atol=1e-5)
    v = torch.randn(16)
    assert torch.allclose(call("tsv", [v, 3 * v], [1.0, 1.0]), 2 * v)  # 1-D: mean


def test_tsv_orthogonal_low_rank_tasks_are_kept_exactly():
    # two rank-1 task vectors in orthogonal subspaces: TSV keeps both, decorrelation changes nothing
    e = torch.eye(6)
    t1 = 3.0 * torch.outer(e[0], e[1])
    t2 = 2.0 * torch.outer(e[2], e[3])
    out = call("tsv", [t1, t2], [1.0, 1.0], rank=1)
    assert torch.allclose(out, t1 + t2, atol=1e-5)


def test_tsv_rank_truncation_by_hand():
    t1 = torch.diag(T([4.0, 1.0, 0.0]))
    out = call("tsv", [t1], [1.0], rank=1)
    assert torch.allclose(out, torch.diag(T([4.0, 0.0, 0.0])), atol=1e-5)


def test_iso_c_flattens_the_spectrum():
    t = torch.diag(T([4.0, -2.0, 3.0]))
    out = call("iso_c", [t], [1.0])  # mean singular value 3 on every direction, signs kept
    assert torch.allclose(out, torch.diag(T([3.0, -3.0, 3.0])), atol=1e-5)
    v = T([1.0, 2.0])
    assert torch.allclose(call("iso_c", [v, v], [1.0, 0.5]), 1.5 * v)  # 1-D: TA


# --------------------------------------------------------------------------- interpolation


def test_linear_weighted_average():
    v, e = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.allclose(call("linear", [v, e], [1.0, 1.0]), T([2.0, 4.0]))
    assert torch.allclose(call("linear", [v, e], [3.0, 1.0]), T([1.5, 3.0]))
    assert torch.allclose(call("linear", [v, e], [1.0, 0.5], normalize=False), T([2.5, 5.0]))


def test_slerp_orthogonal_unit_vectors_midpoint():
    v, e = T([1.0, 0.0]), T([0.0, 1.0])
    out = call("slerp", [v, e], [1.0, 1.0])  # t = 1/(1+1) = 0.5
    s = math.sqrt(0.5)
    assert torch.allclose(out, T([s, s]), atol=1e-6)
    out_t = call("slerp", [v, e], [1.0, 1.0], t=1 / 3)
    assert torch.allclose(out_t, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    # collinear: linear interpolation
    assert torch.allclose(call("slerp", [v, 3 * v], [1.0, 1.0]), T([2.0, 0.0]))


# --------------------------------------------------------------------------- model stock


def test_model_stock_by_hand():
    # two task vectors at 60 degrees with equal norm: cos = 0.5, t = 2*0.5/(1+0.5) = 2/3
    t1 = T([1.0, 0.0])
    t2 = T([0.5, math.sqrt(3) / 2])
    out = call("model_stock", [t1, t2], [1.0, 1.0])
    assert torch.allclose(out, (2 / 3) * (t1 + t2) / 2, atol=1e-6)
    # opposite vectors: denominator 0 -> keep the base
    assert torch.equal(call("model_stock", [t1, -t1], [1.0, 1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="at least two"):
        call("model_stock", [t1], [1.0])


def test_layerswap_fn_is_ta():
    a, b = T([1.0, 2.0]), T([3.0, -1.0])
    assert torch.allclose(call("layerswap", [a, b], [1.0, 0.5]), call("ta", [a, b], [1.0, 0.5]))


# --------------------------------------------------------------------------- streamed (chunked) paths


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks and the sampled-band threshold path on small tensors."""
    from skillgraft.methods import sparsify

    monkeypatch.setattr(sparsify, "CHUNK", 997)
    monkeypatch.setattr(sparsify, "_EXACT_BELOW", 500)
    monkeypatch.setattr(sparsify, "_SAMPLE", 256)


def _naive_mask(x, k):
    """Reference: top-k by |x|, ties broken by position (stable sort on -|x|)."""
    order = torch.sort(-x.abs().flatten(), stable=True).indices[:k]
    m = torch.zeros(x.numel(), dtype=torch.bool)
    m[order] = True
    return m.view(x.shape)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
def test_streamed_topk_matches_reference_with_ties_across_chunks(small_chunks, density):
    g = gen(1)
    x = (torch.randn(40, 250, generator=g) * 8).round() / 8  # heavy ties, spanning chunk borders
    k = keep_count(x.numel(), density)
    assert torch.equal(magnitude_mask(x, density), _naive_mask(x, k))


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0)])
def test_streamed_outlier_mask_matches_reference(small_chunks, density, gamma):
    g = gen(2)
    x = (torch.randn(60, 130, generator=g) * 16).round() / 16
    n = x.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_top = n - target - max(0, n - target - n_top)
    ref = _naive_mask(x, target + n_top) & ~_naive_mask(x, n_top)
    assert torch.equal(outlier_mask(x, density, gamma), ref)


def test_streamed_ties_equals_unchunked(small_chunks):
    from skillgraft.methods.ties import elect_and_merge

    g = gen(3)
    xs = [torch.randn(50, 77, generator=g) for _ in range(3)]
    ws, ds = [1.0, 0.6, -0.3], [0.4, 0.7, 0.2]
    trimmed = [x * _naive_mask(x, keep_count(x.numel(), d)) for x, d in zip(xs, ds)]
    for mode in (False, "weights", "count"):
        ref = elect_and_merge(trimmed, ws, normalize=mode)
        got = call("ties", xs, ws, ds, normalize=mode)
        assert torch.allclose(got, ref, atol=1e-6)
    crumbs = call("breadcrumbs_ties", xs, ws, ds, gamma=0.0)
    assert torch.allclose(crumbs, elect_and_merge(trimmed, ws), atol=1e-6)


@pytest.mark.parametrize("name", ["ta", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_out_over_first_delta_gives_the_same_result(small_chunks, name):
    """``writes_out`` methods may write over their first delta (the engine's memory saving)."""
    m = METHODS[name]
    assert m.writes_out
    extra = {"gamma": 0.05} if "crumbs" in name else {}
    g = gen(6)
    xs = [(torch.randn(50, 77, generator=g) * 8).round() / 8 for _ in range(2)]  # ties across chunks
    kept = [x.clone() for x in xs]
    ref = call(name, xs, [1.0, 0.7], [0.4, 0.6], **extra)
    assert all(torch.equal(x, k) for x, k in zip(xs, kept))  # without out: inputs untouched
    got = m.fn(xs, [1.0, 0.7], [0.4, 0.6], generator=None, out=xs[0], **m.resolve_params(extra))
    assert got.data_ptr() == xs[0].data_ptr()
    assert torch.equal(got, ref)


def test_only_streaming_methods_write_out():
    assert {n for n, m in METHODS.items() if m.writes_out} == {"ta", "ties", "breadcrumbs", "breadcrumbs_ties"}


def test_elementwise_flags_follow_parameters():
    """Row-block safety (the engine merges elementwise methods in blocks of whole rows)."""
    assert METHODS["ta"].is_elementwise()
    assert METHODS["dare_ties"].is_elementwise() and not METHODS["dare_ties"].is_elementwise({"rescale": "l1"})
    assert not METHODS["ties"].is_elementwise()  # the trim threshold is global
    assert METHODS["consensus"].is_elementwise() and not METHODS["consensus"].is_elementwise({"base": "ties"})
    # DELLA is row-wise: its keep probabilities of a row block are those of the whole tensor's rows
    x = torch.randn(12, 30, generator=gen(4))
    assert torch.equal(della_probabilities(x, 0.5, 0.1)[3:7], della_probabilities(x[3:7], 0.5, 0.1))
    # elementwise methods give the same result on blocks as on the whole tensor (deterministic ones)
    xs = [torch.randn(12, 30, generator=gen(5)) for _ in range(2)]
    for name in ("ta", "consensus", "layerswap"):
        whole = call(name, xs, [1.0, 0.5])
        blocks = torch.cat([call(name, [x[i : i + 5] for x in xs], [1.0, 0.5]) for i in range(0, 12, 5)])
        assert torch.allclose(whole, blocks), name
