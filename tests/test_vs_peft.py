"""Differential tests against PEFT's ``peft.utils.merge_utils`` (code we did not write).

PEFT's conventions, and how we select them:
- TIES sign election on the *unweighted* trimmed task vectors (``majority_sign_method="total"``) or on
  the count of signs (``"frequency"``): our ``sign_from="unweighted"`` / ``"count"``.
- Disjoint merge divides by the *number* of agreeing entries: our ``normalize="count"``.
- Magnitude pruning keeps ``int(density * n)`` entries, like ours (we keep at least one; PEFT may keep
  none when ``density * n < 1``; the tensors here are large enough that this never happens).
- DARE draws ``torch.bernoulli(full_like(t, density))`` from the global generator; ours, with
  ``sampler: bernoulli``, draws the same call from the generator it is given, so seeding both the same
  way gives the same masks and the comparison is exact. (Our default ``sampler: uniform`` draws
  ``rand < density``: the same distribution, a different stream, about 4x faster.)
- ``magnitude_prune`` (trim, then weighted sum) is our ``breadcrumbs`` with ``gamma=0``.
"""

from __future__ import annotations

import pytest
import torch

merge_utils = pytest.importorskip("peft.utils.merge_utils", reason="peft is a test dependency: pip install peft")

from skillgraft.methods import METHODS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The density")

SHAPES = [(64, 48), (300,), (8, 16, 5)]


def ours(name, deltas, weights, density, seed=0, **params):
    m = METHODS[name]
    return m.fn(
        deltas,
        weights,
        [density] * len(deltas),
        generator=torch.Generator().manual_seed(seed),
        **m.resolve_params(params),
    )


def task_vectors(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


WEIGHTS = [[1.0, 1.0, 1.0], [0.7, 1.3, 0.4], [1.0, -0.5, 2.0]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_task_arithmetic(shape, weights):
    tv = task_vectors(shape)
    ref = merge_utils.task_arithmetic(tv, torch.tensor(weights))
    assert torch.allclose(ours("ta", tv, weights, 1.0), ref, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_magnitude_prune(shape, weights, density):
    tv = task_vectors(shape)
    ref = merge_utils.magnitude_prune(tv, torch.tensor(weights), density)
    assert torch.allclose(ours("breadcrumbs", tv, weights, density, gamma=0.0), ref, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("peft_sign, our_sign", [("total", "unweighted"), ("frequency", "count")])
def test_ties(shape, weights, density, peft_sign, our_sign):
    if our_sign == "count" and min(weights) < 0:
        pytest.skip("PEFT's 'frequency' counts signs of unweighted vectors, ours of weighted ones: equal for w > 0")
    tv = task_vectors(shape)
    ref = merge_utils.ties(tv, torch.tensor(weights), density, majority_sign_method=peft_sign)
    got = ours("ties", tv, weights, density, sign_from=our_sign, normalize="count")
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS[:2])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_linear_exact_with_the_same_seed(shape, weights, density):
    tv = task_vectors(shape)
    torch.manual_seed(1234)
    ref = merge_utils.dare_linear(tv, torch.tensor(weights), density)
    got = ours("dare", tv, weights, density, seed=1234, sampler="bernoulli")
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS[:2])
@pytest.mark.parametrize("density", [0.3, 0.7])
@pytest.mark.parametrize("peft_sign, our_sign", [("total", "unweighted"), ("frequency", "count")])
def test_dare_ties_exact_with_the_same_seed(shape, weights, density, peft_sign, our_sign):
    tv = task_vectors(shape)
    torch.manual_seed(99)
    ref = merge_utils.dare_ties(tv, torch.tensor(weights), density, majority_sign_method=peft_sign)
    got = ours("dare_ties", tv, weights, density, seed=99, sampler="bernoulli", sign_from=our_sign, normalize="count")
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_dare_rescales_by_one_over_density_in_both(density):
    """DARE's rescale: kept entries are tau / density, in PEFT (>= 0.10) and in ours.

    Older PEFT releases and one published VLM-merging script kept tau unscaled; with such a bug the
    kept entries would equal tau here and this test would fail.
    """
    tau = torch.full((20_000,), 3.0)
    torch.manual_seed(7)
    ref = merge_utils.dare_linear([tau], torch.tensor([1.0]), density)
    got = ours("dare", [tau], [1.0], density, seed=7, sampler="bernoulli")
    for out in (ref, got):
        kept = out[out != 0]
        assert torch.allclose(kept, torch.tensor(3.0 / density))
        assert abs(kept.numel() / tau.numel() - density) < 0.02
        assert abs(out.mean().item() - 3.0) < 0.15
    assert torch.equal(got != 0, ref != 0)


def test_our_default_sign_election_is_mergekits_not_pefts():
    """Named difference: by default we elect on weighted deltas and do not normalise; PEFT elects on
    unweighted ones and divides by the count. The defaults therefore differ whenever weights differ."""
    a, b = torch.tensor([1.0]), torch.tensor([-3.0])
    ref = merge_utils.ties([a, b], torch.tensor([5.0, 1.0]), 1.0)  # unweighted sum -2: elects -, keeps -3
    assert ref.item() == -3.0
    assert ours("ties", [a, b], [5.0, 1.0], 1.0).item() == 5.0  # weighted sum +2: elects +, keeps 5*1
    assert ours("ties", [a, b], [5.0, 1.0], 1.0, sign_from="unweighted", normalize="count").item() == -3.0
