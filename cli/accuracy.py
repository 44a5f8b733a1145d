"""Comparing named results with the float64 reference, by the criteria of :mod:`pyformer.testing`.

The criteria themselves (bounds, relative error, where a tensor is off) live in
:mod:`pyformer.testing`, shared with the test suite; this module only applies them to every
output and gradient of a check case.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyformer.testing import bound, mismatch_report, rel_err


def compare(outs: Dict[str, Tensor], refs: Dict[str, Tensor],
            comps: Optional[Dict[str, Tensor]], dtype: torch.dtype
            ) -> Tuple[Optional[float], Dict[str, float], Dict[str, float], List[str]]:
    """Compare named results with the reference.

    Args:
        outs: results under test, by name (``"y"``, ``"dq"``...).
        refs: the float64 reference results, same names; a name missing from ``outs`` fails.
        comps: for half types, the pure-PyTorch composition run in the same dtype (else None),
            whose own error tightens the bound (:func:`pyformer.testing.bound`).
        dtype: the dtype under test, which picks the bound.

    Returns:
        ``(max_err, errors, torch_errors, failures)``: the largest relative error (``None`` when
        there is nothing to compare), each tensor's error, each tensor's composition error (half
        types only) and one line per tensor outside its bound, saying where it is off.
    """
    errors, torch_errors, failures = {}, {}, []
    for name, ref in refs.items():
        out = outs.get(name)
        if out is None:
            errors[name] = math.inf
            failures.append(f"{name}: missing (the op returned no value or gradient for it)")
            continue
        err = rel_err(out, ref)
        t_err = rel_err(comps[name], ref) if comps is not None and name in comps else None
        errors[name] = err
        if t_err is not None:
            torch_errors[name] = t_err
        tol = bound(dtype, t_err)
        if not err <= tol:  # also catches NaN
            failures.append(f"{name}: rel err {err:.2e} > {tol:.1e}; "
                            f"{mismatch_report(out, ref, tol)}")
    max_err = max(errors.values()) if errors else None
    return max_err, errors, torch_errors, failures
