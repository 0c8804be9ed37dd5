"""Hub references: ``org/name@rev`` everywhere a checkpoint goes, the commit pinned in the saved recipe,
and ``HF_HUB_OFFLINE=1`` resolving from the local cache.

The hub cache here is a fake one laid out as huggingface_hub lays it out
(``models--org--name/snapshots/<commit>/...`` and ``refs/<branch or tag>``); nothing touches the network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_weights

from skillgraft.errors import SkillgraftError
from skillgraft.io.resolve import display_name, parse_hub_ref, resolve
from skillgraft.pipeline import inject
from skillgraft.recipe import ExpertSpec, Recipe

C_VLM_MAIN = "a" * 40
C_VLM_V1 = "b" * 40
C_BASE = "c" * 40
C_EXPERT = "d" * 40


def add_to_cache(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``src``'s files in a huggingface_hub-style cache as ``repo_id`` at ``commit``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub_cache(llava_triple, tmp_path_factory) -> Path:
    """acme/tiny-vlm (main, and tag v1 at another commit), acme/tiny-base, acme/tiny-expert."""
    t = llava_triple
    cache = tmp_path_factory.mktemp("hub") / "hub"
    add_to_cache(cache, "acme/tiny-vlm", t.vlm, C_VLM_MAIN)
    v1 = add_to_cache(cache, "acme/tiny-vlm", t.vlm, C_VLM_V1, refs=("v1",))
    (v1 / "README.md").write_text("---\nlicense: mit\npipeline_tag: image-text-to-text\n---\n# tiny vlm\n")
    add_to_cache(cache, "acme/tiny-base", t.base, C_BASE)
    add_to_cache(cache, "acme/tiny-expert", t.expert, C_EXPERT)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_parse_hub_ref():
    assert parse_hub_ref("Qwen/Qwen2.5-VL-7B-Instruct") == ("Qwen/Qwen2.5-VL-7B-Instruct", None)
    assert parse_hub_ref("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_ref("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_hub_ref("org/name@" + C_BASE) == ("org/name", C_BASE)
    for bad in ("./org/name", "/abs/path", "~/x/y", "name", "org/name/extra", "org/../x", "org/name@"):
        assert parse_hub_ref(bad) is None, bad
    assert display_name("org/tiny-vlm@v1") == "tiny-vlm"
    assert ExpertSpec(model="org/tiny-expert@v1").label == "tiny-expert"


def test_offline_resolves_branch_tag_and_commit_from_the_cache(offline):
    main = resolve("acme/tiny-vlm", "vlm")
    assert (main.repo_id, main.revision, main.commit) == ("acme/tiny-vlm", None, C_VLM_MAIN)
    assert main.path == offline / "models--acme--tiny-vlm" / "snapshots" / C_VLM_MAIN
    assert main.pinned == f"acme/tiny-vlm@{C_VLM_MAIN}"
    tag = resolve("acme/tiny-vlm@v1", "vlm")
    assert (tag.revision, tag.commit) == ("v1", C_VLM_V1)
    assert resolve(f"acme/tiny-vlm@{C_VLM_V1}").path == tag.path


def test_offline_refuses_what_the_cache_lacks_in_one_line(offline):
    for ref, fragment in [("acme/not-cached", "acme/not-cached"), ("acme/tiny-vlm@v2", "at revision v2")]:
        with pytest.raises(SkillgraftError) as e:
            resolve(ref, "vlm")
        msg = str(e.value)
        assert "HF_HUB_OFFLINE" in msg and fragment in msg and "\n" not in msg


def test_inject_from_hub_ids_pins_every_commit_and_reproduces(offline, llava_triple, tmp_path):
    recipe = Recipe(vlm="acme/tiny-vlm@v1", base="acme/tiny-base",
                    experts=[ExpertSpec(model="acme/tiny-expert", scale=0.5)])
    res = inject(recipe, tmp_path / "out", progress=False)
    saved = yaml.safe_load((res.out_dir / "skillgraft_recipe.yaml").read_text())
    assert saved["vlm"] == f"acme/tiny-vlm@{C_VLM_V1}"
    assert saved["base"] == f"acme/tiny-base@{C_BASE}"
    assert saved["experts"][0]["model"] == f"acme/tiny-expert@{C_EXPERT}"
    assert res.report["experts"][0]["label"] == "tiny-expert"
    # the same merge as from the local directories, and the saved recipe reproduces it bit for bit
    local = inject(Recipe(vlm=str(llava_triple.vlm), base=str(llava_triple.base),
                          experts=[ExpertSpec(model=str(llava_triple.expert), scale=0.5)]),
                   tmp_path / "local", progress=False)
    again = inject(Recipe.load(res.out_dir / "skillgraft_recipe.yaml"), tmp_path / "again", progress=False)
    a, b, c = (load_weights(r.out_dir) for r in (res, local, again))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_cli_accepts_hub_revisions_offline(offline, tmp_path):
    env = {**__import__("os").environ}
    p = subprocess.run([sys.executable, "-m", "skillgraft", "inject", "acme/tiny-vlm@v1", "acme/tiny-expert",
                        "--base", f"acme/tiny-base@{C_BASE}", "--dry-run"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "merged" in p.stdout
    p = subprocess.run([sys.executable, "-m", "skillgraft", "inject", "acme/tiny-vlm@nope", "acme/tiny-expert",
                        "--base", "acme/tiny-base", "-o", tmp_path / "o"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.startswith("error: vlm acme/tiny-vlm@nope") and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_push_to_hub_offline_is_refused_before_merging(offline, llava_triple, tmp_path):
    t = llava_triple
    p = subprocess.run([sys.executable, "-m", "skillgraft", "inject", t.vlm, t.expert, "--base", t.base,
                        "-o", tmp_path / "o", "--push-to-hub", "me/merged"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: cannot push to me/merged: HF_HUB_OFFLINE is set; unset it, "
                                             "or upload the output later"]
    assert not (tmp_path / "o").exists()
