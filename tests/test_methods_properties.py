"""Property tests (hypothesis) that every merge method must satisfy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillgraft.methods import METHODS

DELTA = sorted(n for n, m in METHODS.items() if m.kind == "delta")
INTERP = sorted(n for n, m in METHODS.items() if m.kind == "interp")
STOCHASTIC = sorted(n for n, m in METHODS.items() if m.stochastic)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.sampled_from([(5,), (4, 6), (9, 3), (2, 3, 4), (16, 8)])
seeds = st.integers(0, 2**31 - 1)


def tensors(seed: int, shape, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def run(name, xs, weights, densities=None, seed=0, **params):
    return METHODS[name].fn(xs, weights, densities, generator=torch.Generator().manual_seed(seed), **params)


def della_safe(name: str, density: float) -> tuple[float, dict]:
    """DELLA needs density +/- epsilon inside (0, 1): round densities near 1 up to 1, epsilon 0.05."""
    if not name.startswith("della"):
        return density, {}
    return (1.0 if density > 0.9 else density), {"epsilon": 0.05}


def n_needed(name: str) -> int:
    return max(2, METHODS[name].min_inputs)


# ----------------------------------------------------------------- density 1 reduces to TA


@SETTINGS
@given(seed=seeds, shape=shapes, w=st.lists(st.floats(-2, 2), min_size=1, max_size=3))
@pytest.mark.parametrize("name", ["dare", "breadcrumbs", "della_linear"])
def test_linear_family_at_density_one_is_ta(name, seed, shape, w):
    xs = tensors(seed, shape, len(w))
    assert torch.allclose(run(name, xs, w), run("ta", xs, w), atol=1e-6)


@SETTINGS
@given(seed=seeds, shape=shapes, w=st.floats(-3, 3))
@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_ties_family_single_vector_at_density_one_is_ta(name, seed, shape, w):
    # one task vector never disagrees with itself: with normalize off TIES adds lambda*tau, exactly TA
    xs = tensors(seed, shape, 1)
    assert torch.allclose(run(name, xs, [w]), run("ta", xs, [w]), atol=1e-6)


@SETTINGS
@given(seed=seeds, shape=shapes)
@pytest.mark.parametrize("name", ["ties", "dare_ties"])
def test_ties_family_with_agreeing_signs_at_density_one_is_ta(name, seed, shape):
    a = tensors(seed, shape, 1)[0]
    xs = [a, 0.5 * a, 2.0 * a]  # same signs everywhere: nothing is elected away
    w = [1.0, 0.3, 0.7]
    assert torch.allclose(run(name, xs, w), run("ta", xs, w), atol=1e-5)


# ----------------------------------------------------------------- scale 0 returns the VLM


@SETTINGS
@given(seed=seeds, shape=shapes, density=st.floats(0.2, 1.0))
@pytest.mark.parametrize("name", DELTA)
def test_scale_zero_returns_the_vlm_bit_for_bit(name, seed, shape, density):
    """Inject mode: theta_V + M(expert deltas at scale 0) must be theta_V exactly."""
    n = n_needed(name)
    theta_v, *deltas = tensors(seed, shape, n + 1)
    theta_v = theta_v.to(torch.bfloat16).to(torch.float32)
    density, params = della_safe(name, density)
    out = theta_v + run(name, deltas, [0.0] * n, [density] * n, seed=seed, **params)
    assert torch.equal(out, theta_v)
    assert torch.equal(out.to(torch.bfloat16), theta_v.to(torch.bfloat16))


@SETTINGS
@given(seed=seeds, shape=shapes)
@pytest.mark.parametrize("name", INTERP)
def test_interp_expert_weight_zero_returns_the_vlm(name, seed, shape):
    v, e = tensors(seed, shape, 2)
    assert torch.equal(run(name, [v, e], [1.0, 0.0]), v)


# ----------------------------------------------------------------- base merged with itself


@SETTINGS
@given(seed=seeds, shape=shapes, w=st.floats(-2, 2), density=st.floats(0.2, 1.0))
@pytest.mark.parametrize("name", DELTA)
def test_merging_the_base_with_itself_is_the_identity(name, seed, shape, w, density):
    n = n_needed(name)
    base = tensors(seed, shape, 1)[0]
    zeros = [base - base for _ in range(n)]
    density, params = della_safe(name, density)
    delta = run(name, zeros, [w] * n, [density] * n, seed=seed, **params)
    assert torch.equal(base + delta, base)


@SETTINGS
@given(seed=seeds, shape=shapes, w=st.floats(0.1, 3))
@pytest.mark.parametrize("name", INTERP)
def test_interpolating_a_model_with_itself_is_the_identity(name, seed, shape, w):
    v = tensors(seed, shape, 1)[0]
    assert torch.allclose(run(name, [v, v.clone()], [1.0, w]), v, atol=1e-6)


# ----------------------------------------------------------------- seeds


@SETTINGS
@given(seed=seeds, shape=shapes, density=st.floats(0.3, 0.7))
@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeds_make_random_methods_reproducible(name, seed, shape, density):
    xs = tensors(seed, shape, 2)
    a = run(name, xs, [1.0, 0.5], [density, density], seed=seed)
    b = run(name, xs, [1.0, 0.5], [density, density], seed=seed)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seeds_give_different_masks(name):
    xs = tensors(0, (64, 64), 2)
    a = run(name, xs, [1.0, 0.5], [0.5, 0.5], seed=1)
    b = run(name, xs, [1.0, 0.5], [0.5, 0.5], seed=2)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_never_modify_their_inputs(name):
    n = n_needed(name)
    xs = tensors(3, (12, 10), n)
    copies = [x.clone() for x in xs]
    run(name, xs, [0.7] * n, [0.5] * n if METHODS[name].kind == "delta" else None)
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))


# ----------------------------------------------------------------- DARE in distribution


@SETTINGS
@given(seed=seeds, density=st.floats(0.1, 0.9))
def test_dare_kept_fraction_and_unbiased_mean(seed, density):
    x = torch.full((40_000,), 1.5)
    out = run("dare", [x], [1.0], [density], seed=seed)
    kept = (out != 0).float().mean().item()
    assert abs(kept - density) < 5 * (density * (1 - density) / x.numel()) ** 0.5 + 1e-3
    assert torch.allclose(out[out != 0], torch.tensor(1.5 / density))
    assert abs(out.mean().item() - 1.5) < 0.05 * 1.5 / density ** 0.5
