"""Base-free interpolation of the VLM's and the experts' weights: ``linear`` and ``slerp``.

``fn(tensors, weights, *, generator, **params)``: the VLM's tensor first, then the experts', with the
VLM's weight first (the engine passes ``[vlm_weight] + [expert scales]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, Param

Tensor = torch.Tensor


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> Tensor:
    """Weighted average ``sum_i w_i theta_i / sum_i w_i`` (``normalize=False``: the plain weighted sum).

    Model soups (Wortsman et al. 2022); same as mergekit's ``linear`` (normalize defaults to true
    there too). With the defaults (VLM weight 1, expert scale 1) it is the midpoint.
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for x, w in zip(tensors, weights):
        out.add_(x.to(dtype), alpha=float(w))
    if normalize:
        total = sum(float(w) for w in weights)
        if total == 0.0:
            raise ValueError("linear: the weights sum to 0, cannot normalize (set normalize: false)")
        if total != 1.0:
            out.div_(total)
    return out.to(tensors[0].dtype)


def _slerp_rows(t: float, a: Tensor, b: Tensor, dot_threshold: float, eps: float) -> Tensor:
    """SLERP of each row of ``a`` towards the same row of ``b`` (2-D inputs, float32/64; one row here)."""
    na = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = ((a / na) * (b / nb)).sum(dim=1, keepdim=True).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    safe = torch.where(lin, torch.ones_like(sin_theta), sin_theta)
    ca = torch.where(lin, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / safe)
    cb = torch.where(lin, torch.full_like(dot, t), torch.sin(t * theta) / safe)
    return ca * a + cb * b


def slerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    t: float | None = None,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> Tensor:
    """Spherical linear interpolation from the VLM's tensor (t=0) to the expert's (t=1).

    Shoemake 1985; the form popularised by mergekit for model merging: the angle is measured between
    the normalised tensors, the unnormalised tensors are combined with the SLERP coefficients
    ``sin((1-t)theta)/sin(theta)`` and ``sin(t theta)/sin(theta)``; nearly collinear pairs
    (``|cos| > dot_threshold``) fall back to linear interpolation.

    ``t`` defaults to the expert's share of the weights, ``w_E / (w_V + w_E)``, so ``--scale`` means
    the same for ``slerp`` as for ``linear`` (scale 1 -> midpoint, scale 0 -> the VLM).
    One angle per tensor (the whole tensor is one vector), as in mergekit, whose 0.1.5 ``slerp`` this
    matches to float tolerance (tests/test_vs_mergekit.py).
    """
    if len(tensors) != 2:
        raise ValueError(f"slerp interpolates exactly two models (the VLM and one expert), got {len(tensors)}")
    if t is None:
        wv, we = float(weights[0]), float(weights[1])
        if wv + we == 0.0:
            raise ValueError("slerp: the weights sum to 0; give t explicitly")
        t = we / (wv + we)
    t = float(t)
    v0, v1 = tensors
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1).to(dtype)
    b = v1.reshape(1, -1).to(dtype)
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    out = _slerp_rows(t, a, b, float(dot_threshold), float(eps))
    return out.reshape(v0.shape).to(v0.dtype)


LINEAR = Method(
    name="linear",
    kind="interp",
    fn=linear,
    summary="Linear: weighted average of the VLM's and the experts' weights (no base)",
    paper="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models (ICML 2022)",
    params=(Param("normalize", True, "divide by the sum of the weights (mergekit's default)", choices=(True, False)),),
    min_deltas=2,
    elementwise=True,
)

SLERP = Method(
    name="slerp",
    kind="interp",
    fn=slerp,
    summary="SLERP: spherical interpolation between the VLM's and one expert's weights (no base)",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); as used by mergekit "
    "(Goddard et al. 2024, Arcee's MergeKit)",
    params=(
        Param("t", None, "interpolation factor from the VLM (0) to the expert (1); default w_E/(w_V+w_E)"),
        Param("dot_threshold", 0.9995, "above this |cos(theta)| the tensors are treated as collinear (linear)"),
        Param("eps", 1e-8, "norms below this are treated as 1"),
    ),
    min_deltas=2,
    max_deltas=2,
)
