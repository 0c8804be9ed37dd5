"""Check the CUDA path against the CPU path on tiny real checkpoints (run where a GPU exists).

Deterministic methods must agree to float32 rounding; random methods draw their masks from CPU
generators, so DARE keeps exactly the same entries on both devices.

    PYTHONPATH=src:tests python bench/gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_llava_triple, load_weights  # noqa: E402

from skillgraft.api import inject  # noqa: E402
from skillgraft.recipe import ExpertSpec, Recipe  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    root = Path(tempfile.mkdtemp())
    t = build_llava_triple(root / "triple", hidden=64, layers=3)
    print(f"{'method':10} {'max |cpu - cuda|':>18} {'same kept entries':>18}")
    for method, density in (("ta", 1.0), ("ties", 0.5), ("dare", 0.3), ("dare_ties", 0.3)):
        outs = {}
        for device in ("cpu", "cuda"):
            r = Recipe(vlm=str(t.vlm), base=str(t.base), method=method, seed=1,
                       experts=[ExpertSpec(model=str(t.expert), scale=0.8, density=density)])
            outs[device] = load_weights(inject(r, root / f"{method}-{device}", device=device, progress=False).out_dir)
        v = load_weights(t.vlm)
        diff = max(float((outs["cpu"][k] - outs["cuda"][k]).abs().max()) for k in v)
        same = all(torch.equal(outs["cpu"][k] != v[k], outs["cuda"][k] != v[k]) for k in v)
        print(f"{method:10} {diff:18.2e} {str(same):>18}")
        assert diff < 1e-5, method


if __name__ == "__main__":
    main()
