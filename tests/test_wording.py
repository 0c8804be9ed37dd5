"""The repository is written for its users: no wording about how it was made (numbered work stops,
tracker numbers, working periods, borrowed machines and their time budgets, paths outside the
repository) in the docs, the code, the tests, the benchmarks or the research scripts.

The patterns are written in pieces (``"iss" "ue"``) so this file does not match itself."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHERE = ["README.md", "BENCHMARKS.md", "docs", "src", "tests", "bench", "research"]
SUFFIXES = {".md", ".py", ".txt", ".yaml", ".yml", ".toml", ".json", ".cfg", ".sh"}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis"}

PATTERNS = [
    (r"\bstops? \d+\b", "a numbered work stop"),
    (r"\bissues? #?\d+\b", "an issue number"),
    (r"\biss" r"ue's\b|\bthe iss" r"ue (quotes|asks|says)\b", "the tracker as a source"),
    (r"\bsess" r"ions?\b", "a working period"),
    (r"\blent" r" (h100|machine|gpu)", "a borrowed machine"),
    (r"\bdevice" r" (budget|time)\b", "a machine's time allowance"),
    (r"\.\./sha" r"red\b|shared/DESIGN\.md", "a path outside the repository"),
    (r"\b(run|round) \d+\b(?! (steps|items|points|times|trials|layers|seconds|s\b))", "a numbered run"),
]
# legitimate uses that the patterns would otherwise catch
ALLOWED = [
    r'scope="session"',              # pytest's fixture scope
    r"requests\.Sess" r"ion|Sess" r"ion\(",  # HTTP client objects in third-party APIs
]


def files() -> list[Path]:
    out = []
    for w in WHERE:
        p = ROOT / w
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in SUFFIXES
                    and not SKIP_DIRS & set(f.parts) and not any(x.endswith(".egg-info") for x in f.parts)]
    return out


def hits(text: str) -> list[tuple[int, str, str]]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        clean = line
        for a in ALLOWED:
            clean = re.sub(a, "", clean)
        for pat, what in PATTERNS:
            m = re.search(pat, clean, re.IGNORECASE)
            if m:
                found.append((n, what, m.group(0)))
    return found


def test_patterns_catch_what_they_should_and_spare_ordinary_words():
    for bad in ["as in st" "op 8", "Iss" "ue 4 asks that", "the iss" "ue's 88 s", "other sess" "ions' jobs",
                "on the le" "nt H100 machine", "the task's dev" "ice budget", "see ../sha" "red/DESIGN.md",
                "Run 7 (21:28 UTC)"]:
        assert hits(bad), bad
    for fine in ['@pytest.fixture(scope="session")', "a non-stop run", "issues are welcome", "run 16 points",
                 "the stop token", "a sessionless client", "train for 2000 steps", "run 2 steps"]:
        assert not hits(fine), fine


def test_no_wording_about_how_the_project_was_made():
    me = Path(__file__).resolve()
    bad = []
    for f in files():
        if f.resolve() == me:
            continue
        for n, what, m in hits(f.read_text(errors="replace")):
            bad.append(f"{f.relative_to(ROOT)}:{n}: {what} ({m!r})")
    assert not bad, "\n".join(bad)
