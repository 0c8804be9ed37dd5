"""The import graph of the package, read with ``ast`` (imports inside functions included).

- no cycles between modules;
- imports run one way through the layers below (a module imports only its own layer or lower ones);
- ``methods/`` imports nothing but torch, numpy, the standard library and itself;
- ``skillgraft --version`` and ``--help`` never import torch;
- an import inside a function says why it is there (``# deferred: ...``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = "skillgraft"

# lowest first; a module belongs to the first layer with a prefix matching its dotted name
LAYERS: tuple[tuple[str, ...], ...] = (
    ("skillgraft.errors", "skillgraft.extras", "skillgraft.defaults", "skillgraft.version", "skillgraft.torch_state", "skillgraft.methods", "skillgraft.mapping.families",
     "skillgraft.memory",
     "skillgraft.microworld.world", "skillgraft.microworld.tokenizer", "skillgraft.microworld.scenarios",
     "skillgraft.microworld.zoo"),
    ("skillgraft.io", "skillgraft.schedule", "skillgraft.recipe"),
    ("skillgraft.mapping", "skillgraft.engine", "skillgraft.sources", "skillgraft.report"),
    ("skillgraft.pipeline", "skillgraft.evaluate", "skillgraft.microworld.build", "skillgraft.skills"),
    ("skillgraft.sweep", "skillgraft.analysis", "skillgraft.tune", "skillgraft.microworld", "skillgraft.convert"),
    ("skillgraft.api", "skillgraft"),
    ("skillgraft.cli", "skillgraft.__main__"),
)


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(package modules imported, top-level names of outside packages imported) by one file."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        for t in targets:
            if t == PKG or t.startswith(PKG + "."):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != mod:
                    inside.add(t)
            else:
                outside.add(t.split(".")[0])
    return inside, outside


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    files = sorted((SRC / PKG).rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) for f in files}


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{mod} is in no layer of tests/test_imports.py"
    return best


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m][0]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_run_down_the_layers(graph):
    wrong = []
    for m, (inside, _) in sorted(graph.items()):
        for n in sorted(inside):
            # a package's __init__ may re-export its own modules
            if layer_of(n) > layer_of(m) and not n.startswith(m + "."):
                wrong.append(f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})")
    assert not wrong, "\n".join(wrong)


def test_methods_import_only_torch_and_numpy(graph):
    allowed = {"torch", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for m, (inside, outside) in graph.items():
        if m == "skillgraft.methods" or m.startswith("skillgraft.methods."):
            assert all(n.startswith("skillgraft.methods") for n in inside), (m, inside)
            assert outside <= allowed, (m, outside - allowed)


# function-level imports still to be marked (or moved to the top) in their own modules
def test_function_level_imports_are_deferred_on_purpose():
    """An import inside a function defers a heavy or optional dependency (torch, transformers, an extra)
    and says which in a trailing ``# deferred: WHAT, WHY`` comment; every other import is at the top."""
    found = set()
    for path in sorted((SRC / PKG).rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    text = "\n".join(lines[node.lineno - 1:node.end_lineno])
                    comments = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
                    if not any("deferred" in c for c in comments):
                        found.add((str(path.relative_to(SRC)), node.lineno, lines[node.lineno - 1].strip()))
    unmarked = sorted(f"{f}:{n}: {line}" for f, n, line in found)
    assert not unmarked, "imports inside functions without a '# deferred: ...' comment:\n" + "\n".join(unmarked)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["inject", "--help"], ["sweep", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    code = ("import sys\nfrom skillgraft.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
