"""The install: the core dependencies are what ``skillgraft inject`` needs, extras are named when
missing, and the top-level API is importable without loading torch.

``test_bare_install_runs_inject`` builds a fresh venv with only ``pip install torch==2.13.0`` and
``pip install <repo>`` (no extras) and runs ``skillgraft inject`` on the shipped micro-world zoo; it
takes about a minute, so it runs when ``SKILLGRAFT_TEST_BARE_INSTALL=1`` (CI sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ["optuna", "matplotlib", "PIL", "psutil", "ray", "rich"]

# an import hook that makes the optional packages look uninstalled
BLOCK = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from skillgraft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_core_dependencies_are_what_inject_needs():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in meta["dependencies"]}
    assert core == {"torch", "transformers", "safetensors", "huggingface_hub", "numpy", "pydantic", "pyyaml", "tqdm"}
    extras = meta["optional-dependencies"]
    assert {"sweep", "ray", "all", "test"} <= set(extras)
    assert "skillgraft[all]" in extras["test"] and "skillgraft[sweep,ray]" in extras["all"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def zoo(name: str) -> str:
    return str(ROOT / "src" / "skillgraft" / "microworld" / "zoo" / name)


def test_inject_runs_without_any_extra_and_a_missing_extra_is_one_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-c", BLOCK, *map(str, a)], capture_output=True, text=True)  # noqa: E731
    p = run("inject", zoo("vlm"), zoo("expert-multilingual"), "--base", zoo("base"), "-o", tmp_path / "o", "-q")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
    p = run("demo", "--out", tmp_path / "demo", "-q")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: skillgraft demo needs pillow, which is not installed: pip install 'skillgraft[sweep]'"
    p = run("sweep", zoo("vlm"), zoo("expert-multilingual"), "--base", zoo("base"), "--search", "optuna",
            "--trials", "2", "--vary", "scale=0:1", "-o", tmp_path / "s", "-q")
    assert p.returncode == 2 and "pip install 'skillgraft[sweep]'" in p.stderr and "Traceback" not in p.stderr


def test_top_level_api_is_lazy():
    code = ("import sys, skillgraft\n"
            "assert 'torch' not in sys.modules\n"
            "assert {'inject', 'Recipe', 'ExpertSpec', 'convert_mergekit'} <= set(dir(skillgraft))\n"
            "from skillgraft import inject, Recipe, ExpertSpec\n"
            "from skillgraft.api import inject as api_inject\n"
            "assert inject is api_inject and Recipe.__name__ == 'Recipe'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with pytest.raises(AttributeError):
        import skillgraft

        skillgraft.no_such_name  # noqa: B018


@pytest.mark.skipif(os.environ.get("SKILLGRAFT_TEST_BARE_INSTALL") != "1",
                    reason="builds a fresh venv (about a minute); set SKILLGRAFT_TEST_BARE_INSTALL=1")
def test_bare_install_runs_inject(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, sg = env_dir / "bin" / "python", env_dir / "bin" / "skillgraft"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv installed
    for args in (["torch==2.13.0"], [str(ROOT)]):
        p = subprocess.run([py, "-m", "pip", "install", "-q", *args], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % OPTIONAL[:5]],
                       capture_output=True, text=True, env=env)
    assert p.stdout.strip() == "[]", p.stdout  # no extra came along
    path = lambda n: subprocess.run([sg, "zoo", "path", n], capture_output=True, text=True, env=env).stdout.strip()  # noqa: E731
    p = subprocess.run([sg, "inject", path("vlm"), path("expert-multilingual"), "--base", path("base"),
                        "-o", tmp_path / "out"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
