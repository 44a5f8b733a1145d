"""Comparing a result with the float64 reference: the one relative-error helper, and where it is off."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from .common import BOUNDS, HALF_DTYPES, HALF_SLACK


def _agree_nonfinite(out: Tensor, ref: Tensor) -> Tensor:
    """Positions where both are NaN, or both the same infinity: these count as equal."""
    return (out.isnan() & ref.isnan()) | (out.isinf() & (out == ref))


def relative_error(out: Tensor, ref: Tensor) -> float:
    r"""The relative error :math:`\|out - ref\|_2 / \|ref\|_2`, computed in float64.

    A NaN or infinity in ``out`` that the reference does not have at the same position (or the
    other way round) makes the error ``inf``; so does a shape mismatch. Where the reference is
    all zeros the absolute error :math:`\|out\|_2` is returned instead.

    Args:
        out: the result under test, any floating dtype.
        ref: the reference, same shape (usually float64).
    """
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o = out.detach().to(torch.float64)
    r = ref.detach().to(torch.float64).to(o.device)
    same = _agree_nonfinite(o, r)
    finite = o.isfinite() & r.isfinite()
    if not bool((same | finite).all()):
        return math.inf
    zero = torch.zeros((), dtype=torch.float64, device=o.device)
    diff = torch.where(same, zero, o - r)
    norm_ref = torch.where(finite, r, zero).norm().item()
    norm_diff = diff.norm().item()
    return norm_diff / norm_ref if norm_ref > 0 else norm_diff


def allowed_error(dtype: torch.dtype, torch_err: Optional[float]) -> float:
    """The largest relative error that passes for ``dtype`` (shared/design/ops.md).

    For float16/bfloat16 it is the smaller of the dtype's bound and twice the error of the
    pure-PyTorch composition run in the same dtype, plus 1e-5.
    """
    bound = BOUNDS[dtype]
    if dtype in HALF_DTYPES and torch_err is not None and not math.isnan(torch_err):
        bound = min(bound, 2.0 * torch_err + HALF_SLACK)
    return bound


def where_off(name: str, out: Tensor, ref: Tensor, bound: float, max_indices: int = 3) -> str:
    """One line saying where ``out`` disagrees with ``ref``.

    An element is counted as off when :math:`|out - ref| > bound \\cdot (|ref| + rms(ref))`
    (NaN or infinity where the reference has none always counts). The line gives the count, the
    first few indices in row-major order and how many NaN and infinities ``out`` holds.
    """
    if tuple(out.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(out.shape)} but the reference has {tuple(ref.shape)}"
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    same = _agree_nonfinite(o, r)
    finite_r = torch.where(r.isfinite(), r, torch.zeros((), dtype=torch.float64))
    rms = finite_r.square().mean().sqrt() if r.numel() else torch.zeros((), dtype=torch.float64)
    tol = bound * (finite_r.abs() + rms)
    off = ~((o - r).abs() <= tol) & ~same
    n_off = int(off.sum())
    first = [tuple(int(i) for i in idx) for idx in off.nonzero()[:max_indices]]
    firsts = ", ".join(str(i) if len(i) != 1 else f"({i[0]})" for i in first)
    nan, inf = int(o.isnan().sum()), int(o.isinf().sum())
    err = relative_error(o, r)
    return (f"{name}: rel err {err:.2e} > {bound:.1e}; {n_off} of {o.numel()} elements off"
            + (f" (first at {firsts})" if first else "")
            + f"; {nan} NaN, {inf} inf in the result")


def compare(outs: Dict[str, Tensor], refs: Dict[str, Tensor],
            comps: Optional[Dict[str, Tensor]], dtype: torch.dtype):
    """Compare named results with the reference; returns (worst error, errors, failure lines).

    Args:
        outs: results under test, by name (``"y"``, ``"dq"``...).
        refs: the float64 reference results, same names.
        comps: for half types, the pure-PyTorch composition run in the same dtype (else None).
        dtype: the dtype under test, which picks the bound.

    Returns:
        ``(max_err, errors, torch_errors, failures)``: the largest relative error (``None`` when
        there is nothing to compare), each tensor's error, each tensor's composition error (for
        half types) and one :func:`where_off` line per tensor that fails its bound.
    """
    errors, torch_errors, failures = {}, {}, []
    for name, ref in refs.items():
        out = outs.get(name)
        if out is None:
            errors[name] = math.inf
            failures.append(f"{name}: missing (the op returned no value for it)")
            continue
        err = relative_error(out, ref)
        t_err = relative_error(comps[name], ref) if comps is not None else None
        errors[name] = err
        if t_err is not None:
            torch_errors[name] = t_err
        bound = allowed_error(dtype, t_err)
        if not err <= bound:  # also catches NaN
            failures.append(where_off(name, out, ref, bound))
    max_err = max(errors.values()) if errors else None
    return max_err, errors, torch_errors, failures
