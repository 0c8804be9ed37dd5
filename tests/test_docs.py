"""docs/architecture.md names real code: quoted source lines, paths and dotted names must exist.

- every fenced block introduced by "exact lines from `FILE`" appears in FILE verbatim, as consecutive lines;
- every ``src/``, ``tests/`` or ``docs/`` path and every backticked ``*.py`` file exists;
- every backticked dotted name whose first part is a skillgraft module (``engine.plan_budget``,
  ``io.outdir.OutputDir``, ``methods.base.Method.resolve_params``) resolves: the longest prefix that
  is a module, then names defined in it (functions, classes, assignments, imports) and in its classes;
- every relative Markdown link points at an existing file, and an ``#anchor`` at one of its headings.

Read with ``ast``, nothing imported, so the check is fast and independent of installed extras.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "skillgraft"
DOC = ROOT / "docs" / "architecture.md"

_EXACT = re.compile(r"exact lines from `([^`]+)`", re.IGNORECASE)
_FENCE = re.compile(r"^\s*```")
_TICKED = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"^(?:skillgraft\.)?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")
_PATH = re.compile(r"(?<![\w/.])((?:src|tests|docs)/[\w./-]*[\w/])")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".yml", ".safetensors", ".txt", ".db", ".png", ".jsonl", ".bin")


def text() -> str:
    return DOC.read_text()


def exact_blocks(doc: str) -> list[tuple[str, list[str]]]:
    """(file, lines) of every fenced block whose preceding prose (since the last block) ends its
    mention of a file with "exact lines from `FILE`" (the phrase may wrap across lines)."""
    lines = doc.splitlines()
    out, prose, i = [], [], 0
    while i < len(lines):
        if not _FENCE.match(lines[i]):
            prose.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not _FENCE.match(lines[j]):
            j += 1
        found = _EXACT.findall(" ".join(" ".join(prose).split()))
        if found:
            out.append((found[-1], lines[i + 1 : j]))
        prose, i = [], j + 1
    return out


def contains_lines(haystack: list[str], block: list[str]) -> bool:
    block = [b.rstrip() for b in block]
    hay = [h.rstrip() for h in haystack]
    return any(hay[k : k + len(block)] == block for k in range(len(hay) - len(block) + 1))


@lru_cache(maxsize=None)
def module_file(dotted: str) -> Path | None:
    """The source file of ``skillgraft.<dotted>`` (a module or a package's ``__init__``), or None."""
    base = SRC.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.is_dir():  # a package without __init__ (a namespace package)
        return base
    return None


@lru_cache(maxsize=None)
def defined_names(path: Path, cls: str | None = None) -> frozenset[str]:
    """Names a module (or one of its classes) defines or imports at its top level."""
    if path.is_dir():
        return frozenset(p.stem for p in path.iterdir() if p.suffix == ".py" or p.is_dir())
    body = ast.parse(path.read_text()).body
    if cls is not None:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(names)


def resolves(ref: str) -> bool | None:
    """True/False for a dotted reference into skillgraft; None when it does not start with a module."""
    parts = ref.removeprefix("skillgraft.").split(".")
    k = len(parts)
    while k > 0 and module_file(".".join(parts[:k])) is None:
        k -= 1
    if k == 0:
        return None
    path, rest = module_file(".".join(parts[:k])), parts[k:]
    if not rest:
        return True
    if rest[0] not in defined_names(path):
        return False
    if len(rest) == 1:
        return True
    return len(rest) == 2 and rest[1] in defined_names(path, rest[0])


def test_checker_on_known_cases():
    assert resolves("engine.plan_budget") and resolves("skillgraft.io.outdir.OutputDir")
    assert resolves("methods.base.Method.resolve_params") and resolves("mapping.families.FAMILIES")
    assert resolves("engine.no_such_function") is False and resolves("methods.base.Method.nope") is False
    assert resolves("torch.load") is None and resolves("layers.3.mlp") is None
    doc = "Exact lines from `a.py`:\n\n```python\nx = 1\n```\n\n```python\nnot quoted\n```\n"
    assert exact_blocks(doc) == [("a.py", ["x = 1"])]
    assert contains_lines(["a", "  b", "c"], ["  b", "c"]) and not contains_lines(["a", "b"], ["b", "a"])


def test_quoted_source_lines_are_verbatim():
    blocks = exact_blocks(text())
    assert {f for f, _ in blocks} >= {"src/skillgraft/methods/registry.py", "src/skillgraft/mapping/families.py"}
    for name, lines in blocks:
        src = ROOT / name
        assert src.is_file(), f"docs/architecture.md quotes {name}, which does not exist"
        assert lines and contains_lines(src.read_text().splitlines(), lines), (
            f"docs/architecture.md quotes lines that are not in {name}:\n" + "\n".join(lines))


def test_paths_exist():
    doc = text()
    missing = [p for p in sorted(set(_PATH.findall(doc))) if not (ROOT / p.rstrip(".")).exists()]
    for tick in set(_TICKED.findall(doc)):
        if tick.endswith(".py") and " " not in tick:
            where = [ROOT / tick, SRC / tick, *(() if "/" in tick else [next(SRC.rglob(tick), None)])]
            if not any(w is not None and w.exists() for w in where):
                missing.append(tick)
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_dotted_names_resolve():
    wrong = []
    for tick in sorted(set(_TICKED.findall(text()))):
        ref = tick.removesuffix("()")
        if not _DOTTED.match(ref) or ref.endswith(_FILE_SUFFIXES):
            continue
        if resolves(ref) is False:
            wrong.append(ref)
    assert not wrong, f"docs/architecture.md names code that does not exist: {wrong}"


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", s)


@pytest.mark.parametrize("doc", [DOC])
def test_links_resolve(doc):
    bad = []
    for link in _LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            bad.append(link)
        elif anchor:
            heads = [_slug(h) for h in re.findall(r"^#+\s+(.+)$", path.read_text(), re.MULTILINE)]
            if anchor not in heads:
                bad.append(link)
    assert not bad, f"{doc.name} links to missing files or headings: {bad}"
