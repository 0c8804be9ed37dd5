"""Exact elementwise helpers with a fast CPU path.

On CPU, torch (2.x) runs comparisons that produce booleans, boolean selection and products with a
boolean mask through slow generic loops (measured on 4M float32 entries, one thread: ``x * mask``
14.5 ms against numpy's 1.4 ms; ``a >= t`` 3.0 against 0.9 ms; ``a[mask]`` 6-7 against 1.4 ms).
These operations are exact (comparisons, selections, multiplication by 0 or 1), so numpy gives the
same bits; other devices use torch.
"""

from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


def _cpu(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in ts)


def _scalar(t: Tensor | float, like: Tensor) -> np.generic:
    """A threshold in ``like``'s numpy dtype (a float32 tensor's value is exact as a Python float)."""
    value = t.item() if isinstance(t, Tensor) else t
    return like.numpy().dtype.type(value)


def compare(a: Tensor, op: str, t: Tensor | float) -> Tensor:
    """``a op t`` as a bool tensor, ``op`` one of ``>=``, ``>``, ``==``, ``<``; ``t`` a number or 0-dim tensor."""
    if _cpu(a) and (not isinstance(t, Tensor) or t.dim() == 0):
        an = a.numpy()
        tn = _scalar(t, a)
        out = {">=": np.greater_equal, ">": np.greater, "==": np.equal, "<": np.less}[op](an, tn)
        return torch.from_numpy(out)
    t = t.to(a.device) if isinstance(t, Tensor) else t
    return {">=": a.__ge__, ">": a.__gt__, "==": a.__eq__, "<": a.__lt__}[op](t)


def less(a: Tensor, b: Tensor) -> Tensor:
    """``a < b`` for two tensors of one shape."""
    if _cpu(a, b) and a.dtype == b.dtype:
        return torch.from_numpy(np.less(a.numpy(), b.numpy()))
    return a < b.to(a.device)


def count(mask: Tensor) -> int:
    """Number of true entries."""
    if _cpu(mask):
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def select(a: Tensor, mask: Tensor) -> Tensor:
    """The entries of ``a`` where ``mask`` is true, in order (``a[mask]``), flattened."""
    if _cpu(a, mask):
        return torch.from_numpy(a.numpy().reshape(-1)[mask.numpy().reshape(-1)])
    return a.reshape(-1)[mask.reshape(-1)]


def mul_mask_(x: Tensor, mask: Tensor) -> Tensor:
    """``x *= mask`` in place (entries where the mask is false become +-0, NaN stays NaN); returns ``x``."""
    if _cpu(x, mask):
        xn = x.numpy()
        np.multiply(xn, mask.numpy(), out=xn)
        return x
    return x.mul_(mask.to(x.device))


def add_mask_(acc: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """``acc += alpha * mask`` in place; returns ``acc``."""
    if _cpu(acc, mask):
        an = acc.numpy()
        np.add(an, mask.numpy() * an.dtype.type(alpha), out=an)
        return acc
    return acc.add_(mask, alpha=alpha)


def first_true(mask: Tensor, k: int) -> Tensor:
    """Flat positions of the first ``k`` true entries."""
    if _cpu(mask):
        return torch.from_numpy(np.flatnonzero(mask.numpy())[:k])
    return mask.reshape(-1).nonzero().flatten()[:k]
