"""Per-tensor context: layer indices, module kinds, filters, schedules, layer swap."""

from __future__ import annotations

import pytest

from skillgraft.methods import METHODS, Schedule
from skillgraft.schedule import effective_weights, is_excluded, lm_layer_index, module_kind, validate_exclude, value_at


@pytest.mark.parametrize(
    "name, layer, kind",
    [
        ("layers.3.self_attn.q_proj.weight", 3, "attention"),
        ("layers.10.self_attn.o_proj.bias", 10, "attention"),
        ("layers.0.self_attn.q_norm.weight", 0, "norm"),
        ("layers.7.mlp.down_proj.weight", 7, "mlp"),
        ("layers.2.block_sparse_moe.experts.1.w1.weight", 2, "mlp"),
        ("layers.5.input_layernorm.weight", 5, "norm"),
        ("layers.5.post_attention_layernorm.weight", 5, "norm"),
        ("model.layers.12.mlp.up_proj.weight", 12, "mlp"),
        ("embed_tokens.weight", None, "embed"),
        ("model.embed_tokens.weight", None, "embed"),
        ("norm.weight", None, "norm"),
        ("model.norm.weight", None, "norm"),
        ("lm_head.weight", None, "lm_head"),
        ("rotary_emb.inv_freq", None, "other"),
    ],
)
def test_layer_index_and_kind(name, layer, kind):
    assert lm_layer_index(name) == layer
    assert module_kind(name) == kind


def test_is_excluded_by_kind_and_regex():
    assert is_excluded("embed_tokens.weight", ["embed", "lm_head"])
    assert is_excluded("lm_head.weight", ["embed", "lm_head"])
    assert not is_excluded("layers.0.mlp.up_proj.weight", ["embed", "lm_head"])
    assert is_excluded("layers.0.mlp.up_proj.weight", ["mlp"])
    assert is_excluded("layers.1.self_attn.k_proj.weight", [r"layers\.[01]\."])
    assert not is_excluded("layers.11.self_attn.k_proj.weight", [r"layers\.[01]\."])
    assert is_excluded("layers.3.input_layernorm.weight", ["norm"])
    assert not is_excluded("layers.3.input_layernorm.weight", [])


def test_bad_regex_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"'layers\.\(' is neither a module kind .* nor a valid regex"):
        validate_exclude([r"layers.("])
    with pytest.raises(ValueError, match="neither a module kind"):
        is_excluded("norm.weight", ["["])


def test_schedule_interpolates_like_mergekit_gradients():
    # 5 layers, anchors [0, 1]: t = i/4
    assert [value_at([0.0, 1.0], i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # three anchors over 5 layers: [1, 0, 1] -> 1, .5, 0, .5, 1
    assert [value_at([1.0, 0.0, 1.0], i, 5) for i in range(5)] == [1.0, 0.5, 0.0, 0.5, 1.0]
    # anchors [0, 1] over 4 layers: t = 0, 1/3, 2/3, 1
    vals = [value_at([0.0, 1.0], i, 4) for i in range(4)]
    assert vals == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_explicit_per_layer_list():
    per_layer = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert [value_at(per_layer, i, 6) for i in range(6)] == pytest.approx(per_layer)


def test_scalar_and_single_value_schedules():
    assert value_at(0.7, 3, 10) == 0.7
    assert value_at([0.7], 3, 10) == 0.7
    with pytest.raises(ValueError):
        value_at([], 0, 4)


def test_a_list_of_one_value_per_layer_is_exact():
    # interpolation would give 1 - 1e-16 for some layers of a 0/1 list; one value per layer is indexed
    per_layer = [float(i % 2) for i in range(100)]
    assert [value_at(per_layer, i, 100) for i in range(100)] == per_layer


def test_non_layer_tensors_rule():
    s = [0.0, 1.0]
    # embed at the start, final norm / lm_head at the end of the network, other non-layer tensors at the start
    assert value_at(s, None, 8, "embed") == 0.0
    assert value_at(s, None, 8, "lm_head") == 1.0
    assert value_at(s, None, 8, "norm") == 1.0
    assert value_at(s, None, 8, "other") == 0.0
    # a Schedule may give them their own values
    sched = Schedule((1.0, 1.0), before=0.25, after=0.5, other=0.75)
    assert [value_at(sched, None, 8, k) for k in ("embed", "norm", "lm_head", "other")] == [0.25, 0.5, 0.5, 0.75]
    assert value_at(sched, 3, 8) == 1.0


def _layerswap(first_k, last_k, n):
    m = METHODS["layerswap"]
    return m.layer_weights(m.resolve_params({"first_k": first_k, "last_k": last_k}), n)


def test_layerswap_rule_is_schedule_data():
    n = 8
    assert [value_at(_layerswap(2, 1, n), i, n) for i in range(n)] == [0, 0, 1, 1, 1, 1, 1, 0]
    assert [value_at(_layerswap(0, 3, n), i, n) for i in range(n)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert value_at(_layerswap(2, 0, n), None, n, "embed") == 0.0
    assert value_at(_layerswap(0, 2, n), None, n, "embed") == 1.0
    assert value_at(_layerswap(0, 2, n), None, n, "lm_head") == 0.0
    assert value_at(_layerswap(2, 0, n), None, n, "norm") == 1.0
    assert value_at(_layerswap(2, 2, n), None, n, "other") == 1.0
    # one layer: the layer follows first_k, the head last_k
    assert value_at(_layerswap(1, 0, 1), 0, 1) == 0.0 and value_at(_layerswap(1, 0, 1), None, 1, "lm_head") == 1.0


def test_effective_weights():
    ls = METHODS["layerswap"]
    p = ls.resolve_params({"first_k": 1, "last_k": 1})
    assert effective_weights(ls, p, "layers.0.mlp.up_proj.weight", 4, [1.0]) == [0.0]
    assert effective_weights(ls, p, "layers.1.mlp.up_proj.weight", 4, [1.0]) == [1.0]
    assert effective_weights(ls, p, "lm_head.weight", 4, [1.0]) == [0.0]
    ta = METHODS["ta"]
    assert effective_weights(ta, {}, "layers.0.mlp.up_proj.weight", 4, [1.0]) == [1.0]
    # per-expert schedule x recipe-wide schedule x layer rule
    w = effective_weights(ta, {}, "layers.2.mlp.up_proj.weight", 5, [0.8, [0.0, 1.0]], schedule=[1.0, 0.0])
    assert w == pytest.approx([0.8 * 0.5, 0.5 * 0.5])
    w = effective_weights(ls, p, "layers.3.mlp.up_proj.weight", 4, [0.8])
    assert w == [0.0]
