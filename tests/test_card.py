"""The merged checkpoint's README.md is a model card the hub reads: its front matter parses with
huggingface_hub's card classes and carries the fields the hub's model tree uses."""

from __future__ import annotations

import shutil

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from test_hub import C_BASE, C_EXPERT, C_VLM_V1, hub_cache, offline  # noqa: F401  (fixtures)

from skillgraft.pipeline import inject
from skillgraft.recipe import ExpertSpec, Recipe

TAGS = ["skillgraft", "merge", "cross-modal-skill-injection"]


def card_of(out) -> ModelCard:
    card = ModelCard.load(out / "README.md")
    assert isinstance(card.data, ModelCardData)
    # what we wrote round-trips through the hub's own card data class unchanged
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()
    return card


def test_card_names_hub_inputs_vlm_first_and_carries_the_vlm_card(offline, tmp_path):
    recipe = Recipe(vlm="acme/tiny-vlm@v1", base="acme/tiny-base",
                    experts=[ExpertSpec(model="acme/tiny-expert", scale=0.7, density=1.0)])
    out = inject(recipe, tmp_path / "out", progress=False).out_dir
    card = card_of(out)
    d = card.data
    assert d.base_model == ["acme/tiny-vlm", "acme/tiny-expert", "acme/tiny-base"]
    assert d.base_model_relation == "merge"
    assert d.library_name == "transformers"
    assert d.license == "mit" and d.pipeline_tag == "image-text-to-text"  # from the VLM's own card
    assert d.tags == TAGS
    body = card.text
    for commit in (C_VLM_V1, C_BASE, C_EXPERT):  # every input with the revision merged
        assert commit in body
    assert "| tiny-expert | 0.7 | 1 |" in body
    recipe_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block)["vlm"] == f"acme/tiny-vlm@{C_VLM_V1}"  # the recipe inline, pinned


def test_card_with_local_inputs_keeps_paths_out_of_the_front_matter(llava_triple, tmp_path):
    t = llava_triple
    vlm = tmp_path / "vlm"
    shutil.copytree(t.vlm, vlm)
    (vlm / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\nhi\n")
    recipe = Recipe(vlm=str(vlm), base=str(t.base), experts=[ExpertSpec(model=str(t.expert), scale=[0.0, 1.0])],
                    method="dare", parameters={"rescale": "l1"})
    res = inject(recipe, tmp_path / "out", progress=False)
    card = card_of(res.out_dir)
    d = card.data.to_dict()
    assert "base_model" not in d and "base_model_relation" not in d   # no hub ids: nothing for the model tree
    assert (d["license"], d["license_name"], d["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert d["pipeline_tag"] == "image-text-to-text"                   # from config.json (vision_config)
    assert str(t.expert.resolve()) in card.text and str(vlm.resolve()) in card.text
    assert "per-layer schedule 0, 1" in card.text and '"rescale": "l1"' in card.text
    c = res.report["counts"]
    assert f"Tensors: {c['merged']} merged" in card.text and f"{c['total']} in all" in card.text


@pytest.mark.parametrize("which", ["expert", "base"])
def test_llm_target_gets_text_generation(llava_triple, tmp_path, which):
    t = llava_triple
    recipe = Recipe(vlm=str(t.expert if which == "expert" else t.base), base=str(t.base),
                    experts=[ExpertSpec(model=str(t.expert))])
    out = inject(recipe, tmp_path / "out", progress=False).out_dir
    assert card_of(out).data.pipeline_tag == "text-generation"
