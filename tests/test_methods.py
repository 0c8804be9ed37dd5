"""Merge methods on plain tensors: the registry, hand-computed cases, and the sparsifiers."""

from __future__ import annotations

import math

import pytest
import torch

from skillgraft.methods import METHODS, get_method
from skillgraft.methods.sparsify import della_probabilities, magnitude_mask, outlier_mask, random_mask
from skillgraft.methods.topk import keep_count

T = torch.tensor


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(name, xs, weights, densities=None, seed=0, **params):
    """The one call signature of every method, delta or interpolation."""
    return METHODS[name].fn(xs, weights, densities, generator=gen(seed), **params)


# --------------------------------------------------------------------------- registry


EXPECTED = {
    "ta", "ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "consensus", "tsv", "iso_c", "linear", "slerp", "model_stock", "layerswap",
}


def test_registry_has_every_method_with_paper_and_typed_parameters():
    assert set(METHODS) == EXPECTED
    for name, m in METHODS.items():
        assert m.name == name
        assert m.paper and m.summary and m.composition()
        assert len({p.name for p in m.params}) == len(m.params)
        assert m.kind in ("delta", "interp")
        for p in m.params:
            assert p.doc and p.kind in ("float", "int", "choice"), (name, p.name)
            assert p.validate(p.default, name) == p.default  # every default is valid
    assert METHODS["layerswap"].layer_weights is not None
    assert all(m.layer_weights is None for n, m in METHODS.items() if n != "layerswap")
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
    with pytest.raises(ValueError, match="has no parameter 'densty'"):
        METHODS["ta"].fn([T([1.0])], [1.0], [1.0], generator=None, densty=0.5)


@pytest.mark.parametrize("name, params, match", [
    ("breadcrumbs", {"gamma": float("nan")}, "non-finite"),
    ("breadcrumbs", {"gamma": 1.0}, r"float in \[0, 1\)"),
    ("ta", {"lambda": float("inf")}, "non-finite"),
    ("della", {"epsilon": -0.1}, "epsilon"),
    ("consensus", {"k": 0}, "k"),
    ("consensus", {"k": 1.5}, "int"),
    ("layerswap", {"first_k": [1, 2]}, "cannot vary per layer"),
    ("tsv", {"fraction": 0.0}, "fraction"),
    ("slerp", {"t": 1.5}, "float in"),
    ("dare", {"rescale": "l3"}, "one of"),
    ("dare", {"rescale": 1}, "one of"),  # 1 is not True
])
def test_typed_parameters_refuse_bad_values(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_method(name).resolve_params(params)


def test_numeric_parameters_take_per_layer_schedules():
    m = get_method("breadcrumbs")
    assert m.resolve_params({"gamma": [0.0, 0.1]})["gamma"] == [0.0, 0.1]
    assert m.resolve_params({"lambda": [1, 0.5]})["lambda"] == [1.0, 0.5]
    with pytest.raises(ValueError, match="non-finite"):
        m.resolve_params({"gamma": [0.0, float("nan")]})
    specs = {p.name: p for p in get_method("della").params}
    assert specs["epsilon"].per_layer and specs["lambda"].per_layer and not specs["sampler"].per_layer
    assert "per layer" in specs["epsilon"].describe()


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
    with pytest.raises(ValueError, match="at least 2 task vectors"):
        call("model_stock", [t1], [1.0])


def test_interpolation_and_delta_methods_share_one_signature():
    v, e = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.equal(METHODS["linear"].fn([v, e], [1.0, 1.0], [0.3, 0.7]), METHODS["linear"].fn([v, e], [1.0, 1.0]))
    inputs = [v.clone(), e.clone()]
    for name in METHODS:
        if name in ("model_stock", "slerp", "consensus"):
            continue
        METHODS[name].fn(inputs, [1.0, 0.5], [0.6, 0.6], generator=gen(1))
        assert torch.equal(inputs[0], v) and torch.equal(inputs[1], e), name  # inputs never modified


def test_layerswap_fn_is_ta():
    a, b = T([1.0, 2.0]), T([3.0, -1.0])
    assert torch.allclose(call("layerswap", [a, b], [1.0, 0.5]), call("ta", [a, b], [1.0, 0.5]))
