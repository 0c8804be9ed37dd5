"""Apply sweep points to a VLM loaded once in memory, and restore it exactly between points.

The VLM is loaded with its own transformers class. Its parameters are matched to the checkpoint's
merge plan by LM-relative name (``mapping.plan.build_plan`` over a reader-like view of the model's
``state_dict``, so transformers 5's in-memory names and the checkpoint's legacy names meet in the
middle). For every merged tensor the expert and base rows are read once and kept in float32 (the
task vectors themselves in inject mode), together with a copy of the VLM's original tensor.

A point is applied with the engine's own per-tensor merge, :func:`skillgraft.engine.merge_tensor`,
fed the *checkpoint's* plan entry (so random methods draw from ``tensor_seed(seed, checkpoint
name)`` exactly as ``skillgraft inject`` does, and the in-place model equals the checkpoint that
``inject`` would write, bit for bit). Cached task vectors are handed to the engine as task vectors
(no base subtraction). ``restore()`` copies the saved originals back: the model is then
bit-identical to the VLM as loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine import MergeSettings, merge_tensor
from ..errors import SkillgraftError
from ..io.reader import TensorIndex
from ..mapping.plan import Entry, Plan, build_plan
from ..sources import Inputs


class StateDictView(TensorIndex):
    """The read interface of :class:`~skillgraft.io.reader.CheckpointReader` over a loaded model.

    Tensors that share storage (tied embeddings / LM head) are listed once, under the first name.
    """

    def __init__(self, model: torch.nn.Module, root: str | Path = "<memory>"):
        self.root = Path(str(root))
        cfg = model.config.to_dict() if hasattr(model, "config") else {}
        self.config: dict[str, Any] = cfg
        self._t: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        seen: dict[tuple[int, tuple[int, ...]], str] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            t = t.detach()
            if t.numel() > 0:
                k = (t.data_ptr(), tuple(t.shape))
                if k in seen:
                    self.aliases[name] = seen[k]
                    continue
                seen[k] = name
            self._t[name] = t
        self._shape = {n: tuple(t.shape) for n, t in self._t.items()}
        self._dtype = {n: t.dtype for n, t in self._t.items()}

    def tensor(self, name: str) -> torch.Tensor:
        """The live tensor (writing to it changes the model)."""
        return self._t[name]

    def get(self, name: str) -> torch.Tensor:
        return self._t[name].clone()

    def get_rows(self, name: str, rows: int | None) -> torch.Tensor:
        t = self._t[name]
        return (t if rows is None or rows >= t.shape[0] else t[:rows]).clone()

    def close(self) -> None:
        pass


@dataclass
class Slot:
    entry: Entry            # the checkpoint's plan entry: its name seeds random methods, its dtype is stored
    param: torch.Tensor     # the live model tensor
    original: torch.Tensor  # the VLM's tensor as loaded (restored bit for bit)
    experts: list[torch.Tensor]
    base: torch.Tensor | None


class InPlaceModel:
    """A VLM in memory with cached task vectors; ``apply(settings)`` / ``restore()`` per point.

    ``plan`` is the checkpoint plan of a delta method (with base) when any swept method needs one.
    ``cache_taus``: keep ``tau = theta_E - theta_B`` only (inject mode, delta methods); otherwise
    the expert and base rows are kept and the engine forms the deltas itself.
    """

    def __init__(self, model: torch.nn.Module, plan: Plan, *, cache_taus: bool, device: str = "cpu",
                 allow_unmatched: bool = False):
        self.model = model
        self.plan = plan
        self.device = torch.device(device)
        self.cache_taus = cache_taus
        view = StateDictView(model)
        experts = [(ck.label, ck.reader) for ck in plan.experts]
        base = plan.base.reader if plan.base is not None else None
        mplan = build_plan(view, experts, base, allow_unmatched=True)
        by_rel = {e.lm_name: e for e in mplan.entries if e.action == "merge" and e.lm_name}
        self.slots: list[Slot] = []
        self.skipped: list[str] = []
        used: set[int] = set()
        for e in plan.entries:
            if e.action != "merge":
                continue
            me = by_rel.get(e.lm_name)
            if me is None:
                self.skipped.append(e.name)
                continue
            param = view.tensor(me.name)
            if tuple(param.shape) != tuple(e.shape):
                raise SkillgraftError(
                    f"in-place sweep: the loaded model's {me.name} is {list(param.shape)} but the checkpoint's "
                    f"{e.name} is {list(e.shape)}; use --inplace never"
                )
            if not param.dtype.is_floating_point:
                raise SkillgraftError(f"in-place sweep: {me.name} is not a floating-point tensor; use --inplace never")
            if param.data_ptr() in used:  # tied storage: one delta, never two
                self.skipped.append(e.name)
                continue
            used.add(param.data_ptr())
            r = e.rows
            xs = [ck.reader.get_rows(n, r).to(self.device, torch.float32) for ck, n in zip(plan.experts, e.expert_names)]
            b = None
            if plan.base is not None and e.base_name:
                b = plan.base.reader.get_rows(e.base_name, r).to(self.device, torch.float32)
                if cache_taus:
                    xs = [x - b for x in xs]
                    b = None
            self.slots.append(Slot(e, param, param.detach().clone(), xs, b))
        if not self.slots:
            raise SkillgraftError("in-place sweep: no tensor of the loaded model matches the merge plan")
        tied_rel = {mplan.vlm.layout.lm_name(a) for a in view.aliases}
        real = [n for n in self.skipped if next(e for e in plan.entries if e.name == n).lm_name not in tied_rel]
        if real and not allow_unmatched:
            raise SkillgraftError(
                f"in-place sweep: {len(real)} merged tensor(s) have no counterpart in the loaded model, "
                f"e.g. {real[0]}; use --inplace never"
            )
        self.applied = False

    @torch.no_grad()
    def apply(self, settings: MergeSettings) -> None:
        """Set every merged tensor to what ``skillgraft inject`` with ``settings`` would write."""
        if self.applied:
            self.restore()
        if settings.dtype != "auto":
            raise SkillgraftError("in-place sweeps keep the VLM's dtype; leave --dtype at auto")
        if self.cache_taus and settings.method.kind == "interp":
            raise SkillgraftError("in-place cache holds task vectors only; interpolation methods need the expert")
        if self.cache_taus and settings.mode != "inject":
            raise SkillgraftError("in-place cache holds task vectors only; symmetric mode needs the base rows")
        self.applied = True
        for s in self.slots:
            inputs = Inputs(s.original, s.base, s.experts)
            # the checkpoint holds the stored dtype; a model loaded in another dtype sees that value cast
            out, _ = merge_tensor(s.entry, inputs, settings, self.device, s.entry.dtype,
                                  deltas=[self.cache_taus] * len(s.experts))
            s.param.copy_(out)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the VLM's own tensors back, bit for bit."""
        for s in self.slots:
            s.param.copy_(s.original)
        self.applied = False

    def state_equal_to_original(self) -> bool:
        return all(torch.equal(s.param, s.original) for s in self.slots)

