"""Shared test machinery: devices, and one comparison of an op against the float64 reference."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import pyformer
import pyformer.reference as ref
from pyformer.testing import HALF, bound, mismatch_report, rel_err

CUDA = pyformer.backends()["cuda_available"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device or no CUDA build"))]


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh inputs per test, reproducible from the test's name (crc32: stable across processes);
    # PYFORMER_TEST_SEED=N draws another set everywhere
    base = int(os.environ.get("PYFORMER_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ base)


def _outputs(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _prepare(args, dtype, device, grad):
    """Floating tensors -> dtype on device (leaf, requires_grad if in `grad`); others -> device."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            t = a.detach().to(device)
            if a.is_floating_point():
                t = t.to(dtype)
                t.requires_grad_(i in grad)
            out.append(t)
        else:
            out.append(a)
    return out


def _run(fn, args, grad, grad_outs):
    outs = [o for o in _outputs(fn(*args)) if o is not None]
    leaves = [args[i] for i in grad]
    if not leaves:
        return outs, []
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]
    gs = torch.autograd.grad(
        [o for o, _ in pairs], leaves, [g.to(o.device, o.dtype) for o, g in pairs], allow_unused=True
    )
    return outs, list(gs)


def compare(fast, slow, args, *, dtype, device, grad=(), what=""):
    """Runs `fast` (pyformer) on `args` in `dtype` on `device` and checks every output and every
    gradient (w.r.t. the args whose indices are in `grad`) against `slow` (the reference) run in
    float64 on the CPU from the same values, within ops.md's bounds; for half types also within
    twice the error of the reference composition run in `dtype` on `device`."""
    grad = tuple(grad)
    # the same values in every run: quantize the float64 masters to the tested dtype first
    args = [a.detach().to(dtype).to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    r_args = _prepare(args, torch.float64, "cpu", grad)
    r_outs = [o for o in _outputs(slow(*r_args)) if o is not None]
    # cotangents in the tested dtype too, so both sides differentiate the same values
    grad_outs = [torch.randn_like(o).to(dtype).to(torch.float64) for o in r_outs]
    r_outs, r_grads = _run(slow, r_args, grad, grad_outs)

    f_outs, f_grads = _run(fast, _prepare(args, dtype, device, grad), grad, grad_outs)
    c_outs = c_grads = None
    if dtype in HALF:
        c_outs, c_grads = _run(slow, _prepare(args, dtype, device, grad), grad, grad_outs)

    assert len(f_outs) == len(r_outs), what
    for n, (f, r) in enumerate(zip(f_outs, r_outs)):
        assert f.dtype == dtype and f.device.type == device, (what, n, f.dtype, f.device)
        b = bound(dtype, rel_err(c_outs[n], r) if c_outs else None)
        e = rel_err(f, r)
        assert e <= b, f"{what} output {n}: rel err {e:.3g} > {b:.3g}; {mismatch_report(f, r, b)}"
    for n, (f, r) in enumerate(zip(f_grads, r_grads)):
        if r is None:
            assert f is None or not f.abs().sum().item(), f"{what} grad {n}: expected none"
            continue
        assert f is not None, f"{what} grad {n}: missing"
        b = bound(dtype, rel_err(c_grads[n], r) if c_grads else None)
        e = rel_err(f, r)
        assert e <= b, f"{what} grad {n}: rel err {e:.3g} > {b:.3g}; {mismatch_report(f, r, b)}"
    return f_outs, r_outs


def make_mask(kind, B, H, Lq, Lk, dtype=torch.float64):
    """Masks of every kind, with at least one allowed key per row unless the kind says otherwise.

    Returns (mask, causal, key_lengths)."""
    kl = torch.randint(1, Lk + 1, (B,))
    if kind == "none":
        return None, False, None
    if kind == "bool_pad":  # (B, 1, 1, Lk) padding, True = may attend
        return torch.arange(Lk) < kl.view(B, 1, 1, 1), False, None
    if kind == "bool_full":  # (B, H, Lq, Lk), random, key 0 always allowed
        m = torch.rand(B, H, Lq, Lk) > 0.4
        m[..., 0] = True
        return m, False, None
    if kind == "bool_keys1":  # (B, 1, Lq, 1): a mask broadcast along the keys
        m = torch.rand(B, 1, Lq, 1) > 0.3
        m[:, :, 0] = True
        return m, False, None
    if kind == "float":  # additive (1, H, Lq, Lk) with some -inf
        m = torch.randn(1, H, Lq, Lk, dtype=dtype)
        m[torch.rand(1, H, Lq, Lk) < 0.3] = float("-inf")
        m[..., 0] = 0.5
        return m, False, None
    if kind == "causal":
        return None, True, None
    if kind == "key_lengths":
        return None, False, kl
    if kind == "combined":  # bool padding + causal + key_lengths
        pad = torch.arange(Lk) < torch.randint(1, Lk + 1, (B,)).view(B, 1, 1, 1)
        pad[..., 0] = True
        return pad, True, kl
    if kind == "fully_masked":  # some rows with every key masked
        m = torch.rand(B, H, Lq, Lk) > 0.5
        m[:, :, ::2] = False
        return m, False, None
    raise ValueError(kind)


MASK_KINDS = ["none", "bool_pad", "bool_full", "bool_keys1", "float", "causal", "key_lengths", "combined", "fully_masked"]


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each pyformer.functional op made through the nn modules."""
    import pyformer.functional as PF

    counts = {}
    for name in ("attention", "layer_norm", "add_layer_norm"):
        orig = getattr(PF, name)

        def wrap(*a, __orig=orig, __name=name, **k):
            counts[__name] = counts.get(__name, 0) + 1
            return __orig(*a, **k)

        monkeypatch.setattr(PF, name, wrap)
    return counts
