"""CUDA-only tests of pyformer's kernels (skipped without a GPU).

What the device-parametrized suite does not cover: long rows (4096, 16384 and 65536 keys) through
every mask kind, outputs poisoned with NaN before each run (so an element a kernel forgets to
write fails), CUDA against CPU on the same inputs, and dweight/dbias determinism. Tensors of more
than 2**31 elements are in test_huge.py (CUDA and, opt-in, CPU). Truth is pyformer.reference in float64;
bounds are ops.md's (relative Frobenius error; for half types also at most twice the error of the
pure-PyTorch composition run in the same dtype, plus 1e-5).

Dry run: PYFORMER_CUDA_TESTS_ON=cpu runs these bodies on the CPU kernels instead (no poisoning,
CUDA-vs-CPU comparisons become CPU-vs-CPU), to shake out bugs in the tests themselves without a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from pyformer.testing import BOUNDS as BOUND, bound, mismatch_report, rel_err

DRY_RUN = os.environ.get("PYFORMER_CUDA_TESTS_ON") == "cpu"   # see the module docstring
pytestmark = pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

CUDA = "cpu" if DRY_RUN else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK_KINDS = ["none", "bool", "float", "bool_lastdim1", "causal", "key_lengths", "all"]


# ---- helpers ------------------------------------------------------------------------------------

def poison(*like_or_numel_bytes):
    """Fill freed GPU memory with NaN so the next allocations of these sizes start out as NaN.

    pyformer's ops allocate their own outputs; the caching allocator hands back a block of the
    same size that was just freed, so allocating NaN-filled blocks of each output's size and
    freeing them makes an element that a kernel never writes read back as NaN. The op's
    allocations must come next, in this order (intermediates included): call this right before
    the op, after any clone of the inputs, or the clone takes the NaN block.

    The bytes are all 0xFF: NaN in every floating dtype. (A float32 NaN, 0x7FC00000, would read
    as bfloat16/float16 (NaN, +0.0) pairs, and an unwritten +0.0 passes for a masked probability.)
    """
    if CUDA == "cpu":   # dry run: the CPU allocator recycles nothing predictably
        return
    keep = []
    for nb in like_or_numel_bytes:
        keep.append(torch.full((max(1, int(nb)),), 0xFF, dtype=torch.uint8, device=CUDA))
    torch.cuda.synchronize()
    del keep


def nbytes(shape, dtype):
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def test_poison_reaches_next_allocations():
    """The poisoning above works with this allocator: the next allocations of the poisoned sizes,
    in order, read back NaN (small and large pool, 2-, 4- and 8-byte dtypes). If this fails, the
    'unwritten element' part of the tests below proves nothing."""
    if CUDA == "cpu":
        pytest.skip("dry run: no poisoning on the CPU")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        shapes = [(7,), (6, 1000), (4, 2, 3, 65536), (4, 2, 3, 65536)]
        poison(*(nbytes(sh, dtype) for sh in shapes))
        ts = [torch.empty(sh, dtype=dtype, device=CUDA) for sh in shapes]
        for sh, t in zip(shapes, ts):
            assert torch.isnan(t).all(), f"poison missed an allocation of {sh} {dtype}"
        del ts


def check(out, expect64, same_dtype=None, what=""):
    """ops.md's accuracy rule for `out` against the float64 reference `expect64` (pyformer.testing:
    shapes and NaN/inf positions must match too); `same_dtype` is the composition in out's dtype."""
    dtype = out.dtype
    err = rel_err(out, expect64)
    b = bound(dtype, rel_err(same_dtype, expect64) if same_dtype is not None else None)
    assert err <= b, (f"{what}: relative error {err:.3g} > {b:.3g} ({dtype}); "
                      f"{mismatch_report(out, expect64, b)}")


def make_masks(kind, B, H, Lq, Lk, dtype, gen):
    """(mask, causal, key_lengths) for a mask kind, on CUDA."""
    mask, causal, key_lengths = None, False, None
    if kind in ("bool", "all"):
        # random holes, (B, 1, Lq, Lk): broadcast over the heads by a stride-0 dim
        mask = torch.rand((B, 1, Lq, Lk), generator=gen, device=CUDA) > 0.2
    if kind == "bool_lastdim1":
        mask = (torch.rand((B, 1, Lq, 1), generator=gen, device=CUDA) > 0.3)
    if kind == "float":
        mask = torch.randn((1, H, 1, Lk), generator=gen, device=CUDA).to(dtype)
        mask[..., ::7] = float("-inf")
    if kind in ("causal", "all"):
        causal = True
    if kind in ("key_lengths", "all"):
        lens = [0, Lk, max(1, Lk // 3), Lk - 1][:B]
        key_lengths = torch.tensor(lens, device=CUDA)
    return mask, causal, key_lengths


def to_cpu(x):
    return None if x is None else x.cpu()


# ---- masked_softmax: long rows, every mask kind -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("Lk", [4096, 16384, 65536])
def test_masked_softmax_long_rows(Lk, kind, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(Lk + len(kind))
    B, H, Lq = 4, 2, 3
    scale = 0.37
    x = torch.randn((B, H, Lq, Lk), generator=gen, device=CUDA).mul_(3).to(dtype)
    mask, causal, kl = make_masks(kind, B, H, Lq, Lk, dtype, gen)

    # forward, outputs poisoned
    xr = x.clone().requires_grad_(True)
    poison(nbytes(x.shape, dtype))
    y = F.masked_softmax(xr, mask, scale=scale, causal=causal, key_lengths=kl)
    x64 = x.double().requires_grad_(True)
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    y64 = ref.masked_softmax(x64, m64, scale=scale, causal=causal, key_lengths=kl)
    y_same = ref.masked_softmax(x, mask, scale=scale, causal=causal, key_lengths=kl)
    check(y, y64, y_same, f"masked_softmax fwd Lk={Lk} {kind}")
    # fully masked rows are exactly zero
    ok = ref.allowed(x, mask, causal, kl)
    if ok is not None:
        dead = ~ok.any(-1)
        assert (y[dead] == 0).all()

    # backward, outputs poisoned
    dy = torch.randn(x.shape, generator=gen, device=CUDA).to(dtype)
    poison(nbytes(x.shape, dtype))
    (gx,) = torch.autograd.grad(y, xr, dy)
    (gx64,) = torch.autograd.grad(y64, x64, dy.double())
    xs = x.clone().requires_grad_(True)
    ys = ref.masked_softmax(xs, mask, scale=scale, causal=causal, key_lengths=kl)
    (gxs,) = torch.autograd.grad(ys, xs, dy)
    check(gx, gx64, gxs, f"masked_softmax bwd Lk={Lk} {kind}")

    # CUDA against CPU, same inputs
    y_cpu = F.masked_softmax(x.cpu(), to_cpu(mask), scale=scale, causal=causal,
                             key_lengths=to_cpu(kl))
    assert rel_err(y, y_cpu) <= 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Lk", [1, 7, 97, 128, 129, 512, 513, 1025, 8192, 8193, 16385])
def test_masked_softmax_row_paths(Lk, dtype):
    """Every row path (warp small/large, block, long) and the scalar fallback (odd Lk), forward
    and backward."""
    gen = torch.Generator(device=CUDA).manual_seed(Lk)
    x = torch.randn((3, 5, Lk), generator=gen, device=CUDA).to(dtype)
    mask = torch.rand((1, 5, Lk), generator=gen, device=CUDA) > 0.5
    dy = torch.randn(x.shape, generator=gen, device=CUDA).to(dtype)
    xr = x.clone().requires_grad_(True)
    poison(nbytes(x.shape, dtype))
    y = F.masked_softmax(xr, mask, scale=1.3)
    x64 = x.double().requires_grad_(True)
    y64 = ref.masked_softmax(x64, mask, scale=1.3)
    xs = x.clone().requires_grad_(True)
    ys = ref.masked_softmax(xs, mask, scale=1.3)
    check(y, y64, ys, f"row path Lk={Lk}")
    poison(nbytes(x.shape, dtype))
    (gx,) = torch.autograd.grad(y, xr, dy)
    (gx64,) = torch.autograd.grad(y64, x64, dy.double())
    (gxs,) = torch.autograd.grad(ys, xs, dy)
    check(gx, gx64, gxs, f"row path bwd Lk={Lk}")


def test_masked_softmax_special_values():
    """NaN / inf among allowed scores behave as torch.softmax; masked -inf rows give zeros."""
    x = torch.randn(4, 8, device=CUDA)
    x[0, 3] = float("nan")
    x[1, :] = float("-inf")          # every allowed score -inf: torch gives NaN
    x[2, 5] = float("inf")           # +inf: torch gives NaN
    mask = torch.ones(4, 8, dtype=torch.bool, device=CUDA)
    mask[3] = False                  # fully masked: zeros
    y = F.masked_softmax(x, mask)
    e = ref.masked_softmax(x.double(), mask)
    assert torch.equal(torch.isnan(y), torch.isnan(e))
    assert (y[3] == 0).all()


def test_masked_softmax_noncontiguous_and_expanded_mask():
    gen = torch.Generator(device=CUDA).manual_seed(3)
    base = torch.randn((2, 3, 40, 300), generator=gen, device=CUDA)
    x = base.transpose(-1, -2)[..., :33, :]          # non-contiguous view
    mask = (torch.rand((2, 1, 1, 40), generator=gen, device=CUDA) > 0.3).expand(2, 3, 33, 40)
    y = F.masked_softmax(x, mask)
    check(y, ref.masked_softmax(x.double(), mask), None, "non-contiguous")


# ---- layer_norm / add_layer_norm ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("N", [1, 7, 97, 512, 1025, 4096, 8193, 20000])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_rows(N, dtype, affine):
    gen = torch.Generator(device=CUDA).manual_seed(N)
    x = (torch.randn((6, N), generator=gen, device=CUDA) * 2 + 5).to(dtype)
    w = torch.randn(N, generator=gen, device=CUDA).to(dtype) if affine else None
    b = torch.randn(N, generator=gen, device=CUDA).to(dtype) if affine else None
    dy = torch.randn((6, N), generator=gen, device=CUDA).to(dtype)

    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True) if affine else None
    br = b.clone().requires_grad_(True) if affine else None
    stat = 8 if dtype == torch.float64 else 4          # mean and rstd: float32 (float64 for float64)
    poison(nbytes(x.shape, dtype), 6 * stat, 6 * stat)
    y = F.layer_norm(xr, (N,), wr, br)
    x64, w64, b64 = ref.upcast(xr, wr, br) if affine else (ref.upcast(xr), None, None)
    y64 = ref.layer_norm(x64, (N,), w64, b64)
    ins_s = [t.detach().clone().requires_grad_(True) for t in ([x] + ([w, b] if affine else []))]
    y_same = ref.layer_norm(ins_s[0], (N,), *ins_s[1:])      # the composition in dtype
    check(y, y64, y_same, f"layer_norm fwd N={N}")

    poison(nbytes(x.shape, dtype))
    ins = [xr] + ([wr, br] if affine else [])
    grads = torch.autograd.grad(y, ins, dy)
    ins64 = [x64] + ([w64, b64] if affine else [])
    grads64 = torch.autograd.grad(y64, ins64, dy.double())
    grads_same = torch.autograd.grad(y_same, ins_s, dy)
    for name, g, g64, gs in zip(["dx", "dweight", "dbias"], grads, grads64, grads_same):
        check(g, g64, gs, f"layer_norm {name} N={N}")

    y_cpu = F.layer_norm(x.cpu(), (N,), to_cpu(w), to_cpu(b))
    assert rel_err(y, y_cpu) <= 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_ops_direct(dtype):
    """Statistics' dtype/shape, multi-dim normalized_shape, determinism of dweight/dbias."""
    gen = torch.Generator(device=CUDA).manual_seed(7)
    x = torch.randn((3, 5, 4, 96), generator=gen, device=CUDA).to(dtype)
    w = torch.randn((4, 96), generator=gen, device=CUDA).to(dtype)
    y, mean, rstd = torch.ops.pyformer.layer_norm(x, [4, 96], w, None, 1e-5)
    assert mean.dtype == torch.float32 and mean.shape == (3, 5) and rstd.shape == (3, 5)
    assert rstd.dtype == torch.float32
    x64 = x.double()
    check(mean, x64.mean((-2, -1)), None, "layer_norm mean")
    check(rstd, (x64.var((-2, -1), unbiased=False) + 1e-5).rsqrt(), None, "layer_norm rstd")
    check(y, ref.layer_norm(x64, (4, 96), w.double()), None, "layer_norm 2-dim shape")
    dy = torch.randn((3, 5, 4, 96), generator=gen, device=CUDA).to(dtype)
    outs = [torch.ops.pyformer.layer_norm_backward(dy, x, mean, rstd, w, [4, 96]) for _ in range(3)]
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b), "layer_norm_backward is not deterministic"
    dx, dw, db = outs[0]
    assert dw.shape == (4, 96) and dw.dtype == dtype and db.shape == (4, 96)
    x64r, w64 = x64.requires_grad_(True), w.double().requires_grad_(True)
    b64 = torch.zeros((4, 96), dtype=torch.float64, device=CUDA, requires_grad=True)
    g64 = torch.autograd.grad(ref.layer_norm(x64r, (4, 96), w64, b64), (x64r, w64, b64), dy.double())
    for name, g, e in zip(["dx", "dweight", "dbias"], (dx, dw, db), g64):
        check(g, e, None, f"layer_norm_backward {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [64, 1000, 4096, 12000])
def test_add_layer_norm(N, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(N + 1)
    x = torch.randn((5, N), generator=gen, device=CUDA).to(dtype)
    r = torch.randn((5, N), generator=gen, device=CUDA).to(dtype)
    w = torch.randn(N, generator=gen, device=CUDA).to(dtype)
    b = torch.randn(N, generator=gen, device=CUDA).to(dtype)
    poison(nbytes(x.shape, dtype), nbytes(x.shape, dtype), 5 * 4, 5 * 4)
    y, s = F.add_layer_norm(x, r, (N,), w, b)
    s_ref = x + r                                      # rounded to dtype, as the op's s is
    assert torch.equal(s, s_ref)
    y64 = ref.layer_norm(s_ref.double(), (N,), w.double(), b.double())
    check(y, y64, ref.add_layer_norm(x, r, (N,), w, b)[0], f"add_layer_norm N={N}")
    y_cpu, s_cpu = F.add_layer_norm(x.cpu(), r.cpu(), (N,), w.cpu(), b.cpu())
    assert rel_err(y, y_cpu) <= 2 * BOUND[dtype]
    assert torch.equal(s.cpu(), s_cpu)


# ---- scaled_qk ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("D", [1, 7, 64, 80, 128])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (97, 130), (64, 64), (257, 33)])
def test_scaled_qk(Lq, Lk, D, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(Lq * 131 + Lk + D)
    q = torch.randn((2, 3, Lq, D), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
    k = torch.randn((2, 3, Lk, D), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
    poison(nbytes((2, 3, Lq, Lk), dtype))
    s = F.scaled_qk(q, k)
    q64, k64 = ref.upcast(q, k)
    s64 = ref.scaled_qk(q64, k64)
    qs, ks = (t.detach().clone().requires_grad_(True) for t in (q, k))
    s_same = ref.scaled_qk(qs, ks)                             # the composition in dtype
    check(s, s64, s_same, f"scaled_qk Lq={Lq} Lk={Lk} D={D}")
    dS = torch.randn(s.shape, generator=gen, device=CUDA).to(dtype)
    dq, dk = torch.autograd.grad(s, (q, k), dS)
    dq64, dk64 = torch.autograd.grad(s64, (q64, k64), dS.double())
    dqs, dks = torch.autograd.grad(s_same, (qs, ks), dS)
    check(dq, dq64, dqs, "scaled_qk dq")
    check(dk, dk64, dks, "scaled_qk dk")
    s_cpu = F.scaled_qk(q.detach().cpu(), k.detach().cpu())
    assert rel_err(s, s_cpu) <= 2 * BOUND[dtype]


# ---- attention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("Lq,Lk,D", [(64, 64, 64), (97, 1025, 80), (1, 4096, 128)])
def test_attention_fwd_bwd(Lq, Lk, D, kind, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(Lq + Lk + D)
    B, H = 4, 2
    q = torch.randn((B, H, Lq, D), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
    k = torch.randn((B, H, Lk, D), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
    v = torch.randn((B, H, Lk, D), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
    mask, causal, kl = make_masks(kind, B, H, Lq, Lk, dtype, gen)
    # the op allocates out, then the scores (fully written by the GEMM), then probs
    poison(nbytes((B, H, Lq, D), dtype), nbytes((B, H, Lq, Lk), dtype), nbytes((B, H, Lq, Lk), dtype))
    out, probs = F.attention(q, k, v, mask, causal=causal, key_lengths=kl, need_weights=True)
    q64, k64, v64 = ref.upcast(q, k, v)
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out64, probs64 = ref.attention(q64, k64, v64, m64, causal=causal, key_lengths=kl,
                                   need_weights=True)
    out_same, _ = ref.attention(q, k, v, mask, causal=causal, key_lengths=kl)
    check(out, out64, out_same, f"attention out {kind}")
    check(probs, probs64, None, f"attention probs {kind}")

    dout = torch.randn(out.shape, generator=gen, device=CUDA).to(dtype)
    # backward allocates dP and dS (the fused softmax backward's output), then dq, dk, dv; dP is
    # freed before dq, so dq (or dk) may reuse dP's block unpoisoned: GEMM outputs, fully written
    pbytes = nbytes((B, H, Lq, Lk), dtype)
    poison(pbytes, pbytes, nbytes(q.shape, dtype), nbytes(k.shape, dtype), nbytes(v.shape, dtype))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    grads_same = torch.autograd.grad(out_same, (q, k, v), dout)
    for name, g, g64, gs in zip("qkv", grads, grads64, grads_same):
        check(g, g64, gs, f"attention d{name} {kind}")

    out_cpu, _ = F.attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), to_cpu(mask),
                             causal=causal, key_lengths=to_cpu(kl))
    assert rel_err(out, out_cpu) <= 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_dropout(dtype):
    gen = torch.Generator(device=CUDA).manual_seed(11)
    q, k, v = (torch.randn((2, 3, 50, 32), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
               for _ in range(3))
    p = 0.3
    out, probs, keep = torch.ops.pyformer.attention(q, k, v, None, 0.2, False, None, p)
    assert keep.dtype == torch.bool and keep.shape == probs.shape
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.03
    q64, k64, v64 = ref.upcast(q, k, v)
    probs64 = ref.masked_softmax(ref.scaled_qk(q64, k64, 0.2))
    check(probs, probs64, None, "attention dropout probs")
    expect = (probs.double() * keep / (1 - p)) @ v.double()     # from the op's own probs
    check(out, expect, None, "attention dropout")
    # against the reference through the same keep mask, forward and backward
    out64 = (probs64 * keep / (1 - p)) @ v64
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_same = (ref.masked_softmax(ref.scaled_qk(qs, ks, 0.2)) * keep / (1 - p)) @ vs
    check(out, out64, out_same, "attention dropout out")
    dout = torch.randn(out.shape, generator=gen, device=CUDA).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    grads_same = torch.autograd.grad(out_same, (qs, ks, vs), dout)
    for name, g, g64, gs in zip("qkv", grads, grads64, grads_same):
        check(g, g64, gs, f"attention dropout d{name}")
    with torch.no_grad():
        _, _, keep0 = torch.ops.pyformer.attention(q, k, v, None, 0.2, False, None, 0.0)
    assert keep0.shape == (0,) and keep0.dtype == torch.bool


def test_empty_inputs():
    x = torch.empty((2, 0, 5), device=CUDA)
    assert F.masked_softmax(x).shape == x.shape
    assert F.layer_norm(torch.empty((0, 8), device=CUDA), (8,)).shape == (0, 8)
    q = torch.empty((2, 0, 16), device=CUDA)
    assert F.scaled_qk(q, torch.randn((2, 4, 16), device=CUDA)).shape == (2, 0, 4)
