"""Differential tests against mergekit (code we did not write), on tiny LLM-only checkpoints.

mergekit's task-vector merges are "symmetric" in our terms: the base model is ``base_model`` and every
other model contributes a task vector. So each merge runs as mergekit ``base=B, models=[V, E]`` and as
skillgraft ``symmetric`` mode with ``vlm=V`` (an LLM is a valid target), ``experts=[E]``.

mergekit runs in one subprocess for all configs (``mergekit-yaml``'s own ``run_merge``), with the
Python that has it: ``$SKILLGRAFT_MERGEKIT_PYTHON``, else this interpreter if ``import mergekit``
works, else ``<repo>/.venv-mergekit/bin/python``; the tests skip, saying so, when none exists.

Deterministic methods must agree to float32 tolerance on every tensor. Random ones (DARE, DELLA) are
compared in distribution: kept fraction, rescale factor, mean. Semantic differences on purpose, each
stated where it is tested:

- TIES ``normalize``: mergekit's default is ``true`` (divide by the agreeing weights); ours is
  ``false`` (so one expert at scale lambda adds lambda*trim(tau)). Compared with both set explicitly.
- DARE/DELLA ``rescale``: mergekit 0.1.5 keeps the L1 norm of the dropped tensor; the papers (and our
  default) divide by the keep probability. Compared in distribution both ways (ours with
  ``rescale: l1`` must match mergekit's factor exactly per tensor up to the random mask).
- SLERP's ``t``: given explicitly here; our default when it is absent (the expert's share of the
  weights, so ``--scale`` works for slerp) has no mergekit counterpart and is tested in test_methods.py.
- Linear: the same weighted average; ours needs no base and reads the VLM weight and expert scale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

RUNNER = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg_path, out in json.load(open(sys.argv[1])):
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
    run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, random_seed=0, quiet=True))
"""


def mergekit_python() -> str | None:
    env = os.environ.get("SKILLGRAFT_MERGEKIT_PYTHON")
    if env:
        return env
    try:
        import mergekit  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    cand = ROOT / ".venv-mergekit" / "bin" / "python"
    return str(cand) if cand.exists() else None


MK_PY = mergekit_python()
pytestmark = pytest.mark.skipif(
    MK_PY is None,
    reason="mergekit not installed (pip install mergekit==0.1.5, or a venv at .venv-mergekit, "
    "or set SKILLGRAFT_MERGEKIT_PYTHON)",
)

N_LAYERS = 2


def _make_llama(path: Path, state: dict[str, torch.Tensor], config) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    """base, vlm (= base + a fine-tune delta), expert (= base + another), vlm0 (= base exactly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mk")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    # The base is all zeros so that task vectors are exactly the random weights: subtracting a real
    # base quantizes deltas to the base's ulp, which creates ties in magnitude, and mergekit (argsort)
    # and we (position) break ties differently. The merge arithmetic is the same either way.
    base_state = {k: torch.zeros_like(v) for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(1)

    def finetune(scale):
        return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base_state.items()}

    paths = {}
    for name, state in [("base", base_state), ("vlm", finetune(0.05)), ("expert", finetune(0.05)), ("vlm0", base_state)]:
        paths[name] = root / name
        _make_llama(paths[name], state, config)
    return root, paths


# name -> (mergekit config, skillgraft recipe kwargs, mode of comparison)
def _cases(paths):
    B, V, E, V0 = (str(paths[k]) for k in ("base", "vlm", "expert", "vlm0"))

    def mk(method, vlm_params, exp_params, params=None, base=B, vlm=V):
        cfg = {
            "merge_method": method,
            "models": [{"model": vlm, "parameters": vlm_params}, {"model": E, "parameters": exp_params}],
            "dtype": "float32",
        }
        if base is not None:
            cfg["base_model"] = base
        if params:
            cfg["parameters"] = params
        return cfg

    def sg(method, scale, density=1.0, vlm_weight=1.0, vlm_density=1.0, parameters=None, mode="symmetric", vlm=V, base=B):
        return dict(
            vlm=vlm, base=base, method=method, mode=mode, vlm_weight=vlm_weight, vlm_density=vlm_density,
            experts=[{"model": E, "scale": scale, "density": density}], parameters=parameters or {},
            dtype="float32", seed=0,
        )

    return {
        "ta": (mk("task_arithmetic", {"weight": 1.0}, {"weight": 0.8}), sg("ta", 0.8), "exact"),
        "ta_lambda": (
            mk("task_arithmetic", {"weight": 0.6}, {"weight": 1.2}, {"lambda": 0.5}),
            sg("ta", 1.2, vlm_weight=0.6, parameters={"lambda": 0.5}),
            "exact",
        ),
        "ties_normalized": (
            mk("ties", {"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.4}, {"normalize": True}),
            sg("ties", 0.7, 0.4, vlm_density=0.5, parameters={"normalize": True}),
            "exact",
        ),
        "ties_plain": (
            mk("ties", {"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.4}, {"normalize": False}),
            sg("ties", 0.7, 0.4, vlm_density=0.5, parameters={"normalize": False}),
            "exact",
        ),
        "breadcrumbs": (
            mk("breadcrumbs", {"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.9, "density": 0.6, "gamma": 0.05}),
            sg("breadcrumbs", 0.9, 0.6, vlm_density=0.6, parameters={"gamma": 0.05}),
            "exact",
        ),
        "breadcrumbs_ties": (
            mk("breadcrumbs_ties", {"weight": 1.0, "density": 0.7, "gamma": 0.02}, {"weight": 0.5, "density": 0.7, "gamma": 0.02}),
            sg("breadcrumbs_ties", 0.5, 0.7, vlm_density=0.7, parameters={"gamma": 0.02}),
            "exact",
        ),
        "linear": (
            mk("linear", {"weight": 1.0}, {"weight": 0.5}, base=None),
            sg("linear", 0.5, base=None, mode="inject"),
            "exact",
        ),
        "slerp": (
            {
                "merge_method": "slerp",
                "base_model": V,
                "models": [{"model": V}, {"model": E}],
                "parameters": {"t": 0.3},
                "dtype": "float32",
            },
            sg("slerp", 1.0, base=None, mode="inject", parameters={"t": 0.3}),
            "exact",
        ),
        "model_stock": (mk("model_stock", {}, {}), sg("model_stock", 1.0), "exact"),
        # random methods: the VLM equals the base, so the merged delta is one dropped task vector
        "dare_linear": (
            mk("dare_linear", {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.3}, vlm=V0),
            sg("dare", 1.0, 0.3, vlm_density=0.5, vlm=V0),
            "dare",
        ),
        "dare_ties": (
            mk("dare_ties", {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.3}, vlm=V0),
            sg("dare_ties", 1.0, 0.3, vlm_density=0.5, vlm=V0),
            "dare",
        ),
        "della_linear": (
            mk("della_linear", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 1.0, "density": 0.4, "epsilon": 0.1}, vlm=V0),
            sg("della_linear", 1.0, 0.4, vlm_density=0.5, vlm=V0, parameters={"epsilon": 0.1}),
            "della",
        ),
    }


def _ours(recipe_kwargs, out: Path, **override_params):
    from skillgraft.api import inject
    from skillgraft.recipe import ExpertSpec, Recipe

    kw = dict(recipe_kwargs)
    kw["experts"] = [ExpertSpec(**e) for e in kw["experts"]]
    kw["parameters"] = {**kw["parameters"], **override_params}
    inject(Recipe(**kw), out, progress=False)
    return _load_dir(out)


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def merged(triple):
    root, paths = triple
    cases = _cases(paths)
    jobs = []
    for name, (cfg, _, _) in cases.items():
        p = root / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        jobs.append((str(p), str(root / f"mk_{name}")))
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([MK_PY, "-c", RUNNER, str(root / "jobs.json")], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"mergekit failed:\n{r.stderr[-3000:]}")
    results = {}
    for name, (_, recipe, kind) in cases.items():
        results[name] = (_load_dir(root / f"mk_{name}"), _ours(recipe, root / f"sg_{name}"), kind, recipe)
    base = _load_dir(paths["base"])
    expert = _load_dir(paths["expert"])
    yield results, base, expert, root
    if not os.environ.get("SKILLGRAFT_KEEP_TMP"):
        shutil.rmtree(root, ignore_errors=True)


EXACT = ["ta", "ta_lambda", "ties_normalized", "ties_plain", "breadcrumbs", "breadcrumbs_ties", "linear", "slerp", "model_stock"]


@pytest.mark.parametrize("case", EXACT)
def test_deterministic_methods_agree_with_mergekit(merged, case):
    results, *_ = merged
    mk, ours, kind, _ = results[case]
    assert kind == "exact"
    assert set(mk) == set(ours), set(mk) ^ set(ours)
    for name in mk:
        a, b = mk[name].float(), ours[name].float()
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (case, name, (a - b).abs().max().item())


@pytest.mark.parametrize("case", ["dare_linear", "dare_ties"])
def test_dare_agrees_with_mergekit_in_distribution(merged, case):
    """VLM == base, so the merged delta is drop(tau_E) rescaled. Same kept fraction (density 0.3), same
    mean; rescale factor: ours exactly 1/density (the paper), mergekit ||tau||_1/||kept||_1 (L1)."""
    results, base, expert, _ = merged
    mk, ours, _, _ = results[case]
    big = [n for n in mk if mk[n].numel() >= 8192]
    assert big
    for name in big:
        tau = expert[name] - base[name]
        for out, exact in ((ours, True), (mk, False)):
            d = out[name] - base[name]
            kept = d != 0
            frac = kept.float().mean().item()
            assert abs(frac - 0.3) < 0.03, (case, name, frac)
            factor = (d[kept] / tau[kept])
            if exact:
                assert torch.allclose(factor, torch.full_like(factor, 1 / 0.3), rtol=1e-4)
            else:
                expected = tau.abs().sum() / tau[kept].abs().sum()
                assert torch.allclose(factor, expected.expand_as(factor), rtol=1e-4)
                assert abs(expected.item() - 1 / 0.3) < 0.35
            # unbiased: the merged delta's sum is near tau's
            assert abs(d.sum().item() - tau.sum().item()) < 0.15 * tau.abs().sum().item()


def test_dare_with_l1_rescale_matches_mergekit_factor_rule(merged):
    results, base, expert, root = merged
    _, _, _, recipe = results["dare_linear"]
    ours = _ours(recipe, root / "sg_dare_l1", rescale="l1")
    for name in ours:
        tau = expert[name] - base[name]
        d = ours[name] - base[name]
        kept = d != 0
        if kept.sum() == 0 or tau.numel() < 8192:
            continue
        assert torch.allclose(d.abs().sum(), tau.abs().sum(), rtol=1e-4)


def test_della_linear_agrees_with_mergekit_in_distribution(merged):
    """Kept fraction ~ density per tensor, large entries kept more often than small ones, in both;
    rescale: ours divides each kept entry by its keep probability (paper), mergekit keeps the L1 norm."""
    results, base, expert, _ = merged
    mk, ours, _, _ = results["della_linear"]
    for name in [n for n in mk if mk[n].dim() == 2 and mk[n].numel() >= 8192]:
        tau = expert[name] - base[name]
        order = tau.abs().flatten().argsort()
        small, large = order[: order.numel() // 4], order[-(order.numel() // 4) :]
        for out in (ours, mk):
            d = (out[name] - base[name]).flatten()
            kept = d != 0
            assert abs(kept.float().mean().item() - 0.4) < 0.03
            assert kept[large].float().mean() > kept[small].float().mean() + 0.05
        d_mk = mk[name] - base[name]
        assert torch.allclose(d_mk.abs().sum(), tau.abs().sum(), rtol=1e-4)


def test_mergekit_default_ties_normalize_differs_from_ours_by_hand(merged):
    """Our default (normalize off) vs mergekit's (on) on one tensor, checked against a hand computation."""
    results, base, expert, root = merged
    mk, ours_norm, _, recipe = results["ties_normalized"]
    _, ours_plain, _, _ = results["ties_plain"]
    name = "model.layers.0.mlp.up_proj.weight"
    from skillgraft.methods.sparsify import magnitude_mask

    vlm = _load_dir(Path(recipe["vlm"]))
    tv = vlm[name] - base[name]
    te = expert[name] - base[name]
    tv, te = tv * magnitude_mask(tv, 0.5), te * magnitude_mask(te, 0.4)
    mass = tv + 0.7 * te
    pos = mass >= 0
    av, ae = torch.where(pos, tv > 0, tv < 0), torch.where(pos, te > 0, te < 0)
    plain = tv * av + 0.7 * te * ae
    div = av.float() + 0.7 * ae.float()
    div[div == 0] = 1
    assert torch.allclose(ours_plain[name] - base[name], plain, atol=1e-6)
    assert torch.allclose(ours_norm[name] - base[name], plain / div, atol=1e-6)
    assert torch.allclose(mk[name] - base[name], plain / div, atol=1e-6)
