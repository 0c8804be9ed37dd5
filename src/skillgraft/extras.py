"""Optional dependencies: which extra brings each, and one clear line when one is missing.

The core install (``pip install skillgraft``) is what ``skillgraft inject`` needs. Sweeps, plots, the
micro-world (its images) and the demo need ``skillgraft[sweep]``; Ray clusters ``skillgraft[ray]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import SkillgraftError

# import name -> (distribution, extra)
EXTRAS: dict[str, tuple[str, str]] = {
    "optuna": ("optuna", "sweep"),
    "matplotlib": ("matplotlib", "sweep"),
    "PIL": ("pillow", "sweep"),
    "psutil": ("psutil", "sweep"),
    "ray": ("ray", "ray"),
}


def missing_extra_message(module: str, what: str | None = None) -> str | None:
    """``sweeps need optuna: pip install 'skillgraft[sweep]'`` for a known optional module, else None."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        return None
    dist, extra = EXTRAS[top]
    return f"{what or 'this'} needs {dist}, which is not installed: pip install 'skillgraft[{extra}]'"


def require(module: str, what: str) -> ModuleType:
    """Import an optional module, or raise a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but one of its own dependencies is broken: show that
        raise SkillgraftError(missing_extra_message(module, what) or f"{what} needs {module}") from None


def pyplot(what: str) -> ModuleType:
    """matplotlib's pyplot drawing to files (the Agg backend, no display), or the one-line error naming
    the extra that installs matplotlib."""
    require("matplotlib", what).use("Agg")
    return importlib.import_module("matplotlib.pyplot")
