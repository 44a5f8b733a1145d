"""Tensors of more than 2**31 elements through masked_softmax and layer_norm, forward and backward.

An index computed in 32 bits wraps past element 2**31: these tests read back rows that lie beyond
it (and rows before it) and check them against the float64 reference, row by row; dweight and
dbias, which sum over every row, are checked against a float64 sum taken in chunks.

On CUDA they run when the GPU has the memory (about 13 GiB); on the CPU only with
PYFORMER_HUGE_TESTS=1 (they need about 13 GiB of free memory and a minute or two), since CI's
machine has 24 GiB and two cores. The ops are called directly (torch.ops.pyformer.*), so no
autograd graph keeps extra copies alive; the autograd wrappers around them are tested elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch

import pyformer.reference as ref
from pyformer.testing import expect_close

from conftest import DEVICES

ops = torch.ops.pyformer
BF16 = torch.bfloat16
GiB = 1 << 30


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _need(device: str, nbytes: int) -> None:
    if device == "cpu" and os.environ.get("PYFORMER_HUGE_TESTS") != "1":
        pytest.skip("need PYFORMER_HUGE_TESTS=1 (CPU tensors of 2**31 elements)")
    if _free_bytes(device) < nbytes:
        pytest.skip(f"need {nbytes / GiB:.1f} GiB of free {device} memory")


def _randn(shape, device):
    # drawn in bfloat16 chunks: a float32 draw of 2**31 values would need 8 GiB more
    out = torch.empty(shape, dtype=BF16, device=device)
    flat = out.view(-1)
    step = 1 << 26
    for i in range(0, flat.numel(), step):
        flat[i : i + step] = torch.randn(min(step, flat.numel() - i), device=device)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_masked_softmax_huge(device):
    rows, Lk = (1 << 21) + 3, 1024  # 2**31 + 3072 elements, 4 GiB in bfloat16
    _need(device, 3 * rows * Lk * 2 + GiB)
    scale = 0.5
    mask = torch.rand(Lk, device=device) > 0.25  # broadcast over every row
    x = _randn((rows, Lk), device)
    y = ops.masked_softmax(x, mask, scale, False, None)
    picks = [0, 1, rows // 2, (1 << 31) // Lk, rows - 2, rows - 1]  # past element 2**31 too
    xs = {r: x[r].double().requires_grad_() for r in picks}
    del x
    g = _randn((rows, Lk), device)
    dx = ops.masked_softmax_backward(g, y, scale)
    for r in picks:
        e = ref.masked_softmax(xs[r], mask, scale=scale)
        (de,) = torch.autograd.grad(e, xs[r], g[r].double())
        expect_close(y[r], e, what=f"masked_softmax row {r}")
        expect_close(dx[r], de, what=f"masked_softmax_backward row {r}")


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_huge(device):
    N = 4096
    rows = (1 << 31) // N + 5  # 2**31 + 20480 elements
    _need(device, 3 * rows * N * 2 + GiB)
    x = _randn((rows, N), device)
    w, b = _randn((N,), device), _randn((N,), device)
    y, mean, rstd = ops.layer_norm(x, [N], w, b, 1e-5)
    picks = [0, rows // 2, (1 << 31) // N, rows - 1]
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    for r in picks:
        expect_close(
            y[r], ref.layer_norm(x[r].double(), (N,), w64, b64), what=f"layer_norm row {r}"
        )
    del y
    g = _randn((rows, N), device)
    dx, dw, db = ops.layer_norm_backward(g, x, mean, rstd, w, [N])
    for r in picks:
        xr = x[r].double().requires_grad_()
        e = ref.layer_norm(xr, (N,), w64, b64)
        (de,) = torch.autograd.grad(e, xr, g[r].double())
        expect_close(dx[r], de, what=f"layer_norm_backward dx row {r}")
    # dweight = sum_rows g * xhat and dbias = sum_rows g, in float64 over chunks of rows
    dw64 = torch.zeros(N, dtype=torch.float64, device=device)
    db64 = torch.zeros(N, dtype=torch.float64, device=device)
    for i in range(0, rows, 1 << 14):
        xc, gc = x[i : i + (1 << 14)].double(), g[i : i + (1 << 14)].double()
        xhat = (xc - xc.mean(-1, keepdim=True)) * torch.rsqrt(
            xc.var(-1, unbiased=False, keepdim=True) + 1e-5
        )
        dw64 += (gc * xhat).sum(0)
        db64 += gc.sum(0)
    expect_close(dw, dw64, what="layer_norm_backward dweight")
    expect_close(db, db64, what="layer_norm_backward dbias")
