"""CUDA-only tests of pyformer's kernels (skipped without a GPU).

What the device-parametrized suite does not cover: long rows (4096, 16384 and 65536 keys) through
every mask kind, outputs poisoned with NaN before each run (so an element a kernel forgets to
write fails), CUDA against CPU on the same inputs, and dweight/dbias determinism. Tensors of more
than 2**31 elements are in test_huge.py (CUDA and, opt-in, CPU). Every comparison is
pyformer.testing's (the tests', ``pyformer check``'s): truth is pyformer.reference in float64;
bounds are docs/ops.md's (relative Frobenius error; for half types also at most twice the error of the
pure-PyTorch composition run in the same dtype, plus 1e-5); masks come from its one generator.

Dry run: PYFORMER_CUDA_TESTS_ON=cpu runs these bodies on the CPU kernels instead (no poisoning,
CUDA-vs-CPU comparisons become CPU-vs-CPU), to shake out bugs in the tests themselves without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from pyformer.testing import BOUNDS as BOUND
from pyformer.testing import MASK_KINDS, expect_close, make_mask, nbytes, poison, rel_err, verify

from conftest import NEEDS_CUDA

DRY_RUN = os.environ.get("PYFORMER_CUDA_TESTS_ON") == "cpu"  # see the module docstring
pytestmark = pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(), reason=NEEDS_CUDA)

CUDA = "cpu" if DRY_RUN else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- helpers ------------------------------------------------------------------------------------


def test_poison_reaches_next_allocations():
    """pyformer.testing.poison works with this allocator: the next allocations of the poisoned
    sizes, in order, read back NaN (small and large pool, 2-, 4- and 8-byte dtypes). If this
    fails, the 'unwritten element' part of the tests below proves nothing."""
    if CUDA == "cpu":
        pytest.skip("poisoning is a no-op on the CPU (dry run)")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        shapes = [(7,), (6, 1000), (4, 2, 3, 65536), (4, 2, 3, 65536)]
        poison(CUDA, *(nbytes(sh, dtype) for sh in shapes))
        ts = [torch.empty(sh, dtype=dtype, device=CUDA) for sh in shapes]
        for sh, t in zip(shapes, ts):
            assert torch.isnan(t).all(), f"poison missed an allocation of {sh} {dtype}"
        del ts


def randn(gen, *shape):
    """float64 normal values on the CPU (verify rounds them to the tested dtype)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def to_cpu(x):
    return None if x is None else x.cpu()


# ---- masked_softmax: long rows, every mask kind -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("Lk", [4096, 16384, 65536])
def test_masked_softmax_long_rows(Lk, kind, dtype):
    gen = torch.Generator().manual_seed(Lk + len(kind))
    B, H, Lq = 4, 2, 3
    scale = 0.37
    x = randn(gen, B, H, Lq, Lk) * 3
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk, generator=gen)

    def op(fn):
        return lambda scores, mask, key_lengths: fn(
            scores, mask, scale=scale, causal=causal, key_lengths=key_lengths
        )

    # forward and backward on poisoned outputs, against the reference and its composition
    out_bytes = nbytes(x.shape, dtype)
    v = verify(
        op(F.masked_softmax),
        op(ref.masked_softmax),
        {"scores": x, "mask": mask, "key_lengths": kl},
        dtype=dtype,
        device=CUDA,
        ref_device=CUDA,
        grad=["scores"],
        outputs=["probs"],
        generator=gen,
        poison_bytes=([out_bytes], [out_bytes]),
    )
    v.assert_ok(f"masked_softmax Lk={Lk} {kind}")
    y = v.outputs["probs"].cpu()
    # fully masked rows are exactly zero
    ok = ref.allowed(x, mask, causal, kl)
    if ok is not None:
        dead = ~ok.any(-1)
        assert (y[dead] == 0).all()

    # CUDA against CPU, same inputs
    xs, ms = v.inputs["scores"], v.inputs["mask"]
    y_cpu = F.masked_softmax(
        xs.detach().cpu(), to_cpu(ms), scale=scale, causal=causal, key_lengths=kl
    )
    assert rel_err(y, y_cpu) <= 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Lk", [1, 7, 97, 128, 129, 512, 513, 1025, 8192, 8193, 16385])
def test_masked_softmax_row_paths(Lk, dtype):
    """Every row path (warp small/large, block, long) and the scalar fallback (odd Lk), forward
    and backward."""
    gen = torch.Generator().manual_seed(Lk)
    x = randn(gen, 3, 5, Lk)
    mask = torch.rand((1, 5, Lk), generator=gen) > 0.5
    out_bytes = nbytes(x.shape, dtype)
    verify(
        lambda s, m: F.masked_softmax(s, m, scale=1.3),
        lambda s, m: ref.masked_softmax(s, m, scale=1.3),
        [x, mask],
        dtype=dtype,
        device=CUDA,
        ref_device=CUDA,
        grad=[0],
        generator=gen,
        poison_bytes=([out_bytes], [out_bytes]),
    ).assert_ok(f"row path Lk={Lk}")


def test_masked_softmax_special_values():
    """NaN / inf among allowed scores behave as torch.softmax; masked -inf rows give zeros."""
    x = torch.randn(4, 8, device=CUDA)
    x[0, 3] = float("nan")
    x[1, :] = float("-inf")  # every allowed score -inf: torch gives NaN
    x[2, 5] = float("inf")  # +inf: torch gives NaN
    mask = torch.ones(4, 8, dtype=torch.bool, device=CUDA)
    mask[3] = False  # fully masked: zeros
    y = F.masked_softmax(x, mask)
    e = ref.masked_softmax(x.double(), mask)
    assert torch.equal(torch.isnan(y), torch.isnan(e))
    assert (y[3] == 0).all()


def test_masked_softmax_noncontiguous_and_expanded_mask():
    gen = torch.Generator(device=CUDA).manual_seed(3)
    base = torch.randn((2, 3, 40, 300), generator=gen, device=CUDA)
    x = base.transpose(-1, -2)[..., :33, :]  # non-contiguous view
    mask = (torch.rand((2, 1, 1, 40), generator=gen, device=CUDA) > 0.3).expand(2, 3, 33, 40)
    y = F.masked_softmax(x, mask)
    expect_close(y, ref.masked_softmax(x.double(), mask), None, what="non-contiguous")


# ---- layer_norm / add_layer_norm ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("N", [1, 7, 97, 512, 1025, 4096, 8193, 20000])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_rows(N, dtype, affine):
    gen = torch.Generator().manual_seed(N)
    x = randn(gen, 6, N) * 2 + 5
    w = randn(gen, N) if affine else None
    b = randn(gen, N) if affine else None
    stat = 8 if dtype == torch.float64 else 4  # mean and rstd: float32 (float64 for float64)
    v = verify(
        lambda x, w, b: F.layer_norm(x, (N,), w, b),
        lambda x, w, b: ref.layer_norm(x, (N,), w, b),
        [x, w, b],
        dtype=dtype,
        device=CUDA,
        ref_device=CUDA,
        grad=[0, 1, 2] if affine else [0],
        generator=gen,
        poison_bytes=([nbytes(x.shape, dtype), 6 * stat, 6 * stat], [nbytes(x.shape, dtype)]),
    )
    v.assert_ok(f"layer_norm N={N}")

    xd, wd, bd = (v.inputs[n] for n in ("arg0", "arg1", "arg2"))
    y_cpu = F.layer_norm(xd.detach().cpu(), (N,), to_cpu(wd), to_cpu(bd))
    assert rel_err(v.outputs["out0"], y_cpu) <= 2 * BOUND[dtype]


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
    expect_close(mean, x64.mean((-2, -1)), None, what="layer_norm mean")
    expect_close(
        rstd, (x64.var((-2, -1), unbiased=False) + 1e-5).rsqrt(), None, what="layer_norm rstd"
    )
    expect_close(y, ref.layer_norm(x64, (4, 96), w.double()), None, what="layer_norm 2-dim shape")
    dy = torch.randn((3, 5, 4, 96), generator=gen, device=CUDA).to(dtype)
    outs = [torch.ops.pyformer.layer_norm_backward(dy, x, mean, rstd, w, [4, 96]) for _ in range(3)]
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b), "layer_norm_backward is not deterministic"
    dx, dw, db = outs[0]
    assert dw.shape == (4, 96) and dw.dtype == dtype and db.shape == (4, 96)
    x64r, w64 = x64.requires_grad_(True), w.double().requires_grad_(True)
    b64 = torch.zeros((4, 96), dtype=torch.float64, device=CUDA, requires_grad=True)
    g64 = torch.autograd.grad(
        ref.layer_norm(x64r, (4, 96), w64, b64), (x64r, w64, b64), dy.double()
    )
    for name, g, e in zip(["dx", "dweight", "dbias"], (dx, dw, db), g64):
        expect_close(g, e, None, what=f"layer_norm_backward {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [64, 1000, 4096, 12000])
def test_add_layer_norm(N, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(N + 1)
    x = torch.randn((5, N), generator=gen, device=CUDA).to(dtype)
    r = torch.randn((5, N), generator=gen, device=CUDA).to(dtype)
    w = torch.randn(N, generator=gen, device=CUDA).to(dtype)
    b = torch.randn(N, generator=gen, device=CUDA).to(dtype)
    poison(CUDA, nbytes(x.shape, dtype), nbytes(x.shape, dtype), 5 * 4, 5 * 4)
    y, s = F.add_layer_norm(x, r, (N,), w, b)
    s_ref = x + r  # rounded to dtype, as the op's s is
    assert torch.equal(s, s_ref)
    y64 = ref.layer_norm(s_ref.double(), (N,), w.double(), b.double())
    expect_close(y, y64, ref.add_layer_norm(x, r, (N,), w, b)[0], what=f"add_layer_norm N={N}")
    y_cpu, s_cpu = F.add_layer_norm(x.cpu(), r.cpu(), (N,), w.cpu(), b.cpu())
    assert rel_err(y, y_cpu) <= 2 * BOUND[dtype]
    assert torch.equal(s.cpu(), s_cpu)


# ---- rms_norm / add_rms_norm, apply_rotary, swiglu ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("N", [3, 7, 97, 512, 1025, 4096, 8193, 20000])
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_rows(N, dtype, weight):
    """Every row path of the shared norm kernels (warp, block, long; vector and scalar loads),
    with the mean left out; dweight deterministic; CUDA against the CPU kernels."""
    gen = torch.Generator().manual_seed(N + 3)
    x = randn(gen, 6, N) * 2 + 1
    w = randn(gen, N) if weight else None
    stat = 8 if dtype == torch.float64 else 4
    v = verify(
        lambda x, w: F.rms_norm(x, (N,), w),
        lambda x, w: ref.rms_norm(x, (N,), w),
        [x, w],
        dtype=dtype,
        device=CUDA,
        ref_device=CUDA,
        grad=[0, 1] if weight else [0],
        generator=gen,
        poison_bytes=([nbytes(x.shape, dtype), 6 * stat], [nbytes(x.shape, dtype)]),
    )
    v.assert_ok(f"rms_norm N={N}")
    xd = v.inputs["arg0"].detach()
    wd = v.inputs["arg1"]
    y_cpu = F.rms_norm(xd.cpu(), (N,), to_cpu(wd))
    assert rel_err(v.outputs["out0"], y_cpu) <= 2 * BOUND[dtype]
    dy = torch.randn(xd.shape, generator=torch.Generator().manual_seed(1)).to(CUDA, dtype)
    _, rstd = torch.ops.pyformer.rms_norm(xd, [N], wd, None)
    outs = [torch.ops.pyformer.rms_norm_backward(dy, xd, rstd, wd, [N]) for _ in range(3)]
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o)), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [64, 1000, 4096, 12000])
def test_add_rms_norm(N, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(N + 5)
    x = torch.randn((5, N), generator=gen, device=CUDA).to(dtype)
    r = torch.randn((5, N), generator=gen, device=CUDA).to(dtype)
    w = torch.randn(N, generator=gen, device=CUDA).to(dtype)
    poison(CUDA, nbytes(x.shape, dtype), nbytes(x.shape, dtype), 5 * 4)
    y, s = F.add_rms_norm(x, r, (N,), w)
    s_ref = x + r
    assert torch.equal(s, s_ref)
    y64 = ref.rms_norm(s_ref.double(), (N,), w.double(), ref.default_rms_eps(dtype))
    expect_close(y, y64, ref.add_rms_norm(x, r, (N,), w)[0], what=f"add_rms_norm N={N}")
    y_cpu, s_cpu = F.add_rms_norm(x.cpu(), r.cpu(), (N,), w.cpu())
    assert rel_err(y, y_cpu) <= 2 * BOUND[dtype]
    assert torch.equal(s.cpu(), s_cpu)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "shape", [(2, 8, 2, 33, 128, 128), (1, 3, 1, 5, 80, 32), (3, 4, 4, 1, 64, 64)]
)
def test_apply_rotary(dtype, interleaved, shape):
    """The projection layout read and written in place, partial rotary, GQA, decoding; CUDA
    against the CPU kernel."""
    b, hq, hk, length, d, dr = shape
    gen = torch.Generator().manual_seed(length * d + interleaved)
    q = randn(gen, b, length, hq, d).transpose(1, 2)
    k = randn(gen, b, length, hk, d).transpose(1, 2)
    inv = 1.0 / 10000.0 ** (torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    f = torch.randint(0, 4096, (b, length), generator=gen).double()[..., None] * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
    cos, sin = emb.cos(), emb.sin()
    v = verify(
        lambda q, k, cos, sin: F.apply_rotary(q, k, cos, sin, interleaved=interleaved),
        lambda q, k, cos, sin: ref.apply_rotary(q, k, cos, sin, interleaved=interleaved),
        {"q": q, "k": k, "cos": cos, "sin": sin},
        dtype=dtype,
        device=CUDA,
        grad=["q", "k"],
        generator=gen,
    )
    v.assert_ok(f"apply_rotary {shape}")
    qd, kd, cd, sd = (v.inputs[n].detach() for n in ("q", "k", "cos", "sin"))
    q_cpu, k_cpu = F.apply_rotary(qd.cpu(), kd.cpu(), cd.cpu(), sd.cpu(), interleaved=interleaved)
    assert rel_err(v.outputs["out0"], q_cpu) <= 2 * BOUND[dtype]
    assert rel_err(v.outputs["out1"], k_cpu) <= 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", [1, 7, 4096, 100003])
def test_swiglu(dtype, n):
    """Vector and scalar paths (n not a multiple of the vector, a misaligned view); CUDA against
    the CPU kernel."""
    gen = torch.Generator().manual_seed(n)
    gate, up = randn(gen, n + 1) * 4, randn(gen, n + 1)
    v = verify(
        lambda g, u: F.swiglu(g[1:], u[1:]),  # offset by one element: misaligned for vectors
        lambda g, u: ref.swiglu(g[1:], u[1:]),
        [gate, up],
        dtype=dtype,
        device=CUDA,
        grad=[0, 1],
        generator=gen,
    )
    v.assert_ok(f"swiglu n={n}")
    g, u = (v.inputs[k].detach()[1:].cpu() for k in ("arg0", "arg1"))
    assert rel_err(v.outputs["out0"], F.swiglu(g, u)) <= 2 * BOUND[dtype]


# ---- scaled_qk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("D", [1, 7, 64, 80, 128])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (97, 130), (64, 64), (257, 33)])
def test_scaled_qk(Lq, Lk, D, dtype):
    gen = torch.Generator().manual_seed(Lq * 131 + Lk + D)
    q, k = randn(gen, 2, 3, Lq, D), randn(gen, 2, 3, Lk, D)
    v = verify(
        F.scaled_qk,
        ref.scaled_qk,
        [q, k],
        dtype=dtype,
        device=CUDA,
        ref_device=CUDA,
        grad=[0, 1],
        generator=gen,
    )
    v.assert_ok(f"scaled_qk Lq={Lq} Lk={Lk} D={D}")
    s_cpu = F.scaled_qk(*(t.detach().cpu() for t in v.inputs.values()))
    assert rel_err(v.outputs["out0"], s_cpu) <= 2 * BOUND[dtype]


# ---- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("Lq,Lk,D", [(64, 64, 64), (97, 1025, 80), (1, 4096, 128)])
def test_attention_fwd_bwd(Lq, Lk, D, kind, dtype):
    gen = torch.Generator().manual_seed(Lq + Lk + D)
    B, H = 4, 2
    q, k, v = randn(gen, B, H, Lq, D), randn(gen, B, H, Lk, D), randn(gen, B, H, Lk, D)
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk, generator=gen)

    def op(fn, need_weights=True):
        return lambda q, k, v, mask, key_lengths: fn(
            q, k, v, mask, causal=causal, key_lengths=key_lengths, need_weights=need_weights
        )

    # the op allocates out, then the scores (fully written by the GEMM), then probs; backward
    # allocates dP and dS (the fused softmax backward's output), then dq, dk, dv; dP is freed
    # before dq, so dq (or dk) may reuse dP's block unpoisoned: GEMM outputs, fully written
    pbytes = nbytes((B, H, Lq, Lk), dtype)
    fwd = [nbytes((B, H, Lq, D), dtype), pbytes, pbytes]
    bwd = [pbytes, pbytes, nbytes(q.shape, dtype), nbytes(k.shape, dtype), nbytes(v.shape, dtype)]
    # the composition's bound holds for out; the probabilities keep the dtype's bound alone
    res = verify(
        op(F.attention),
        op(ref.attention),
        [q, k, v, mask, kl],
        dtype=dtype,
        device=CUDA,
        ref_device=CUDA,
        grad=[0, 1, 2],
        outputs=["out", "probs"],
        composed=op(ref.attention, need_weights=False),
        generator=gen,
        poison_bytes=(fwd, bwd),
    )
    res.assert_ok(f"attention {kind}")

    qd, kd, vd, md, _ = (to_cpu(t) for t in res.inputs.values())
    out_cpu, _ = F.attention(
        qd.detach(), kd.detach(), vd.detach(), md, causal=causal, key_lengths=kl
    )
    assert rel_err(res.outputs["out"], out_cpu) <= 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_dropout(dtype):
    gen = torch.Generator(device=CUDA).manual_seed(11)
    q, k, v = (
        torch.randn((2, 3, 50, 32), generator=gen, device=CUDA).to(dtype).requires_grad_(True)
        for _ in range(3)
    )
    p = 0.3
    out, probs, keep = torch.ops.pyformer.attention(q, k, v, None, 0.2, False, None, p)
    assert keep.dtype == torch.bool and keep.shape == probs.shape
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.03
    q64, k64, v64 = ref.upcast(q, k, v)
    probs64 = ref.masked_softmax(ref.scaled_qk(q64, k64, 0.2))
    expect_close(probs, probs64, None, what="attention dropout probs")
    expect = (probs.double() * keep / (1 - p)) @ v.double()  # from the op's own probs
    expect_close(out, expect, None, what="attention dropout")
    # against the reference through the same keep mask, forward and backward
    out64 = (probs64 * keep / (1 - p)) @ v64
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_same = (ref.masked_softmax(ref.scaled_qk(qs, ks, 0.2)) * keep / (1 - p)) @ vs
    expect_close(out, out64, out_same, what="attention dropout out")
    dout = torch.randn(out.shape, generator=gen, device=CUDA).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    grads_same = torch.autograd.grad(out_same, (qs, ks, vs), dout)
    for name, g, g64, gs in zip("qkv", grads, grads64, grads_same):
        expect_close(g, g64, gs, what=f"attention dropout d{name}")
    with torch.no_grad():
        _, _, keep0 = torch.ops.pyformer.attention(q, k, v, None, 0.2, False, None, 0.0)
    assert keep0.shape == (0,) and keep0.dtype == torch.bool


def test_empty_inputs():
    x = torch.empty((2, 0, 5), device=CUDA)
    assert F.masked_softmax(x).shape == x.shape
    assert F.layer_norm(torch.empty((0, 8), device=CUDA), (8,)).shape == (0, 8)
    q = torch.empty((2, 0, 16), device=CUDA)
    assert F.scaled_qk(q, torch.randn((2, 4, 16), device=CUDA)).shape == (2, 0, 4)
