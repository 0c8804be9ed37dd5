"""In-memory task arithmetic on a loaded LLaVA model: theta_LM = theta_VLM + scale * (theta_E - theta_B).

Used for dense scale sweeps (the demo's accuracy-vs-scale plot) where writing one checkpoint per
point would cost more than the evaluation. The checkpoint-writing path is `skillgraft.api.inject`.
Only the language model (decoder + lm_head) is touched; vision tower and projector are left as is.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _lm_params(vlm) -> dict[str, torch.nn.Parameter]:
    """VLM language-model parameters keyed by the name they have in a LlamaForCausalLM checkpoint."""
    out = {f"model.{k}": p for k, p in vlm.model.language_model.named_parameters()}
    out.update({f"lm_head.{k}": p for k, p in vlm.lm_head.named_parameters()})
    return out


def load_lm_state(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return {k: v.float() for k, v in sd.items()}


class TaskVectorSweep:
    """Holds theta_VLM and tau_E = theta_E - theta_B; `set_scale(s)` rewrites the VLM's LM in place."""

    def __init__(self, vlm, base: str | Path | dict, expert: str | Path | dict):
        b = base if isinstance(base, dict) else load_lm_state(base)
        e = expert if isinstance(expert, dict) else load_lm_state(expert)
        self.vlm = vlm
        self.params = _lm_params(vlm)
        missing = [k for k in self.params if k not in b or k not in e]
        if missing:
            raise KeyError(f"expert/base lack LM tensors, e.g. {missing[0]}")
        self.orig = {k: p.detach().clone() for k, p in self.params.items()}
        self.tau = {k: (e[k] - b[k]).to(device=p.device, dtype=p.dtype) for k, p in self.params.items()}

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        for k, p in self.params.items():
            p.copy_(self.orig[k] + scale * self.tau[k])

    def restore(self) -> None:
        self.set_scale(0.0)
