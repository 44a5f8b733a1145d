"""Accuracy criteria shared by the tests, ``pyformer check`` and the benchmarks' sanity checks.

The rule of ``docs/ops.md``: compare against the reference computed in float64 from the
same inputs by the relative error ``||out - ref|| / ||ref||``, within a bound per dtype and, for
half types, within twice the error of the pure-PyTorch composition run in the same dtype, plus
1e-5. NaN (or inf) where the reference has none always fails.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["BOUNDS", "HALF", "rel_err", "bound", "mismatch_report"]

BOUNDS = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

HALF = (torch.float16, torch.bfloat16)


def rel_err(out: Optional[Tensor], ref: Optional[Tensor], chunk: int = 1 << 24) -> float:
    """``||out - ref|| / ||ref||`` in float64 over the entries where ``ref`` is finite.

    Returns ``inf`` when shapes differ, when ``out`` is NaN/inf where ``ref`` is finite, when
    ``ref`` is non-finite where ``out`` is not (NaN must propagate where the reference has it), or
    when their NaN / +inf / -inf entries differ.
    An all-zero reference gives the absolute error ``||out||``.

    Computed ``chunk`` elements at a time, on the tensors' device when they share one (a
    (8,16,2048,2048) comparison on a GPU stays there, in temporaries of ~0.5 GiB), else on the CPU.
    """
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else math.inf
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    dev = ref.device if out.device == ref.device else torch.device("cpu")
    o_all, r_all = out.detach().reshape(-1), ref.detach().reshape(-1)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    num2 = den2 = zero
    for i in range(0, o_all.numel(), chunk):
        o = o_all[i:i + chunk].to(dev, torch.float64)
        r = r_all[i:i + chunk].to(dev, torch.float64)
        rf = torch.isfinite(r)
        if not (torch.equal(torch.isfinite(o), rf) and torch.equal(torch.isnan(o), torch.isnan(r))
                and torch.equal(torch.isposinf(o), torch.isposinf(r))):
            return math.inf
        d = torch.where(rf, o - r, zero)
        rr = torch.where(rf, r, zero)
        num2 = num2 + (d * d).sum()
        den2 = den2 + (rr * rr).sum()
    num, den = math.sqrt(num2.item()), math.sqrt(den2.item())
    return num / den if den > 0 else num


def bound(dtype: torch.dtype, composed_err: Optional[float] = None) -> float:
    """The accuracy bound for ``dtype``; for half types also ``<= 2 * composed_err + 1e-5``."""
    b = BOUNDS[dtype]
    if dtype in HALF and composed_err is not None:
        b = min(b, 2.0 * composed_err + 1e-5)
    return b


def mismatch_report(out: Tensor, ref: Tensor, tol: float, first: int = 3) -> str:
    """Where ``out`` and ``ref`` disagree: mismatch count, first indices, NaN/inf counts."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if o.shape != r.shape:
        return f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"
    scale = r[torch.isfinite(r)].abs().max().item() if torch.isfinite(r).any() else 1.0
    bad = ~torch.isclose(o, r, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True)
    idx = [tuple(i) for i in bad.nonzero()[:first].tolist()]
    return (
        f"{int(bad.sum())} of {o.numel()} mismatch (first at {idx}); "
        f"NaN {int(torch.isnan(o).sum())} (ref {int(torch.isnan(r).sum())}), "
        f"inf {int(torch.isinf(o).sum())} (ref {int(torch.isinf(r).sum())})"
    )
