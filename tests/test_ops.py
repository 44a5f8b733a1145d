"""Every op and every gradient against the float64 reference (pyformer.reference), on fresh
random inputs, over grids of dtypes, shapes (awkward ones included) and mask kinds."""

from __future__ import annotations


import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from conftest import DEVICES, MASK_KINDS, compare, make_mask

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


# ---- scaled_qk ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(2, 3), (1, 1), (4,), ()])
@pytest.mark.parametrize("Lq,Lk", [(5, 1), (7, 7), (33, 97), (3, 1025)])
@pytest.mark.parametrize("D", [1, 64, 80, 128])
def test_scaled_qk(device, dtype, lead, Lq, Lk, D):
    q, k = (
        torch.randn(*lead, Lq, D, dtype=torch.float64),
        torch.randn(*lead, Lk, D, dtype=torch.float64),
    )
    compare(F.scaled_qk, ref.scaled_qk, [q, k], dtype=dtype, device=device, grad=(0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_qk_explicit_scale(device):
    q, k = (
        torch.randn(2, 3, 9, 16, dtype=torch.float64),
        torch.randn(2, 3, 11, 16, dtype=torch.float64),
    )
    compare(
        lambda a, b: F.scaled_qk(a, b, scale=0.37),
        lambda a, b: ref.scaled_qk(a, b, 0.37),
        [q, k],
        dtype=torch.float32,
        device=device,
        grad=(0, 1),
    )


# ---- masked_softmax ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,H,Lq,Lk", [(2, 3, 5, 1), (2, 3, 6, 7), (1, 1, 9, 97), (3, 2, 4, 1025)])
def test_masked_softmax(device, dtype, kind, B, H, Lq, Lk):
    s = torch.randn(B, H, Lq, Lk, dtype=torch.float64) * 3
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk)
    grad = (0, 1) if mask is not None and mask.is_floating_point() else (0,)
    f = lambda s, m: F.masked_softmax(
        s, m, scale=0.7, causal=causal, key_lengths=kl if kl is None else kl.to(s.device)
    )
    r = lambda s, m: ref.masked_softmax(s, m, scale=0.7, causal=causal, key_lengths=kl)
    (p,), _ = compare(f, r, [s, mask], dtype=dtype, device=device, grad=grad, what=kind)
    assert not torch.isnan(p).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(13,), (4, 29), (2, 1, 3, 8, 5)])
def test_masked_softmax_other_ranks(device, shape):
    s = torch.randn(*shape, dtype=torch.float64)
    m = torch.rand(shape[-1]) > 0.3
    m[0] = True
    compare(
        lambda s: F.masked_softmax(s, m.to(s.device), scale=2.0),
        lambda s: ref.masked_softmax(s, m, scale=2.0),
        [s],
        dtype=torch.float32,
        device=device,
        grad=(0,),
    )
    if len(shape) >= 2:
        kl = torch.randint(0, shape[-1] + 1, (shape[0],))
        compare(
            lambda s: F.masked_softmax(s, causal=True, key_lengths=kl.to(s.device)),
            lambda s: ref.masked_softmax(s, causal=True, key_lengths=kl),
            [s],
            dtype=torch.float64,
            device=device,
            grad=(0,),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_softmax_fully_masked_rows_are_zero(device, dtype):
    s = torch.randn(2, 3, 4, 10, device=device, dtype=dtype, requires_grad=True)
    kl = torch.tensor([0, 6], device=device)  # batch 0: every key masked
    m = torch.ones(2, 1, 4, 10, dtype=torch.bool, device=device)
    m[1, :, 2] = False  # batch 1, query 2: every key masked
    p = F.masked_softmax(s, m, key_lengths=kl, causal=True)
    assert torch.equal(p[0], torch.zeros_like(p[0]))
    assert torch.equal(p[1, :, 2], torch.zeros_like(p[1, :, 2]))
    assert torch.allclose(
        p[1, :, [0, 1, 3]].sum(-1).float(), torch.ones(3, 3, device=device), atol=1e-2
    )
    (g,) = torch.autograd.grad(p, s, torch.randn_like(p))
    assert not torch.isnan(g).any()
    assert torch.equal(g[0], torch.zeros_like(g[0])) and torch.equal(
        g[1, :, 2], torch.zeros_like(g[1, :, 2])
    )
    fm = torch.zeros(1, 1, 4, 10, device=device, dtype=dtype)
    fm[..., 1, :] = float("-inf")  # a float mask can mask a whole row too
    p = F.masked_softmax(s, fm)
    assert torch.equal(p[:, :, 1], torch.zeros_like(p[:, :, 1])) and not torch.isnan(p).any()


@pytest.mark.parametrize("device", DEVICES)
def test_masked_softmax_nan_and_inf_propagate_like_torch(device):
    s = torch.randn(3, 8, dtype=torch.float64)
    s[0, 3] = float("nan")
    s[1, 2] = float("inf")
    s[2, :] = float("-inf")
    m = torch.ones(3, 8, dtype=torch.bool)
    m[:, 7] = False
    p = F.masked_softmax(s.to(device), m.to(device))
    # rows 0-2: NaN at the unmasked keys, as torch; the masked key stays 0 (docs/ops.md)
    expect = torch.softmax(s.masked_fill(~m, float("-inf")), -1).masked_fill(~m, 0.0)
    assert torch.equal(torch.isnan(p.cpu()), torch.isnan(expect))
    assert torch.equal(p.cpu()[:, 7], torch.zeros(3, dtype=p.dtype))
    s[0, 3] = 0.0
    s[0, 5] = float("nan")
    m[0, 5] = False  # a NaN under the mask does not matter
    p = F.masked_softmax(s.to(device), m.to(device))
    assert not torch.isnan(p[0]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_masked_softmax_long_rows(device):
    s = torch.randn(2, 1, 3, 4096, dtype=torch.float64)
    mask, causal, kl = make_mask("bool+causal+lengths", 2, 1, 3, 4096)
    compare(
        lambda s: F.masked_softmax(
            s, mask.to(s.device), causal=causal, key_lengths=kl.to(s.device)
        ),
        lambda s: ref.masked_softmax(s, mask, causal=causal, key_lengths=kl),
        [s],
        dtype=torch.float32,
        device=device,
        grad=(0,),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kl_dtype", [torch.int32, torch.int64, torch.int16])
def test_masked_softmax_key_lengths_dtypes(device, kl_dtype):
    s = torch.randn(3, 2, 5, 9, dtype=torch.float64)
    kl = torch.tensor([9, 0, 4], dtype=kl_dtype)
    compare(
        lambda s: F.masked_softmax(s, key_lengths=kl.to(s.device)),
        lambda s: ref.masked_softmax(s, key_lengths=kl),
        [s],
        dtype=torch.float64,
        device=device,
        grad=(0,),
    )


# ---- layer_norm / add_layer_norm ---------------------------------------------------------------
LN_SHAPES = [
    ((4, 1), (1,)),
    ((3, 7), (7,)),
    ((2, 5, 97), (97,)),
    ((3, 1025), (1025,)),
    ((2, 3, 768), (768,)),
    ((1, 1, 64), (64,)),
    ((2, 4, 5), (4, 5)),
    ((6,), (6,)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", LN_SHAPES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm(device, dtype, shape, ns, affine):
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(*ns, dtype=torch.float64) if affine != "none" else None
    b = torch.randn(*ns, dtype=torch.float64) if affine == "both" else None
    grad = tuple(i for i, t in enumerate([x, w, b]) if t is not None)
    compare(
        lambda x, w, b: F.layer_norm(x, ns, w, b, eps=1e-5),
        lambda x, w, b: ref.layer_norm(x, ns, w, b, 1e-5),
        [x, w, b],
        dtype=dtype,
        device=device,
        grad=grad,
        what=affine,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", LN_SHAPES[:6])
def test_add_layer_norm(device, dtype, shape, ns):
    x, r = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    w, b = torch.randn(*ns, dtype=torch.float64), torch.randn(*ns, dtype=torch.float64)
    compare(
        lambda x, r, w, b: F.add_layer_norm(x, r, ns, w, b),
        lambda x, r, w, b: ref.add_layer_norm(x, r, ns, w, b),
        [x, r, w, b],
        dtype=dtype,
        device=device,
        grad=(0, 1, 2, 3),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_matches_torch_and_int_shape(device):
    x = torch.randn(5, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    torch.testing.assert_close(
        F.layer_norm(x, 33, w, b, 1e-3), torch.nn.functional.layer_norm(x, (33,), w, b, 1e-3)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_backward_deterministic(device):
    x = torch.randn(300, 257, device=device, requires_grad=True)
    w = torch.randn(257, device=device, requires_grad=True)
    g = torch.randn(300, 257, device=device)
    runs = [torch.autograd.grad(F.layer_norm(x, (257,), w), (x, w), g) for _ in range(3)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))


# ---- attention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(
    "B,H,Lq,Lk,D,Dv",
    [(2, 3, 5, 7, 64, 64), (1, 2, 1, 1, 1, 3), (2, 1, 9, 97, 80, 16), (1, 1, 3, 1025, 128, 8)],
)
def test_attention(device, dtype, kind, B, H, Lq, Lk, D, Dv):
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, dtype=torch.float64)
    v = torch.randn(B, H, Lk, Dv, dtype=torch.float64)
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk)
    grad = (0, 1, 2, 3) if mask is not None and mask.is_floating_point() else (0, 1, 2)
    f = lambda q, k, v, m: F.attention(
        q,
        k,
        v,
        m,
        causal=causal,
        key_lengths=None if kl is None else kl.to(q.device),
        need_weights=True,
    )
    r = lambda q, k, v, m: ref.attention(
        q, k, v, m, causal=causal, key_lengths=kl, need_weights=True
    )
    (out, w), _ = compare(f, r, [q, k, v, mask], dtype=dtype, device=device, grad=grad, what=kind)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_matches_sdpa(device):
    q, k, v = (torch.randn(2, 4, 6, 16, device=device) for _ in range(3))
    kl = torch.tensor([6, 3], device=device)
    m = torch.arange(6, device=device) < kl.view(2, 1, 1, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(F.attention(q, k, v, key_lengths=kl)[0], want)
    torch.testing.assert_close(
        F.attention(q, k, v, causal=True)[0],
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_dropout(device, dtype):
    """out = (probs * keep / (1 - p)) @ v with the keep mask the op returns, gradients through it."""
    B, H, L, D, p = 2, 3, 40, 8, 0.4
    q, k, v = (
        torch.randn(B, H, L, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3)
    )
    kl = torch.tensor([40, 23], device=device)
    out, probs, keep = torch.ops.pyformer.attention(q, k, v, None, 0.25, False, kl, p)
    assert keep.dtype == torch.bool and keep.shape == (B, H, L, L)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05  # 9600 draws: 5 sigma is ~0.025
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, want_probs = ref.attention(q2, k2, v2, scale=0.25, key_lengths=kl, need_weights=True)
    want = (want_probs * keep / (1 - p)) @ v2
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (out - want).norm() / want.norm() < tol
    assert (probs - want_probs).norm() / want_probs.norm() < tol  # probs are kept before dropout
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q2, k2, v2), g)
    ):
        assert (a - b).norm() / b.norm() < tol
    out1, _ = F.attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out1, torch.zeros_like(out1))
    torch.manual_seed(5)
    a, _ = F.attention(q, k, v, dropout_p=p)
    torch.manual_seed(5)
    b, _ = F.attention(q, k, v, dropout_p=p)
    assert torch.equal(a, b)  # dropout follows torch's generator: seeded runs repeat


@pytest.mark.parametrize("device", DEVICES)
def test_attention_grad_through_weights(device):
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))

    def f(q, k, v):
        out, w = F.attention(q, k, v, causal=True, need_weights=True)
        return out.sum() + (w * w).sum()

    def r(q, k, v):
        out, w = ref.attention(q, k, v, causal=True, need_weights=True)
        return out.sum() + (w * w).sum()

    compare(f, r, [q, k, v], dtype=torch.float64, device=device, grad=(0, 1, 2))


# ---- layouts and sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    q = torch.randn(2, 7, 3, 16, dtype=torch.float64).transpose(1, 2)  # (2, 3, 7, 16) view
    k = torch.randn(2, 16, 3, 9, dtype=torch.float64).permute(0, 2, 3, 1)  # (2, 3, 9, 16)
    v = torch.randn(2, 3, 9, 24, dtype=torch.float64)[..., ::2]  # (2, 3, 9, 12) strided
    m = (torch.rand(2, 1, 9, 1) > 0.3).transpose(-1, -2)  # (2, 1, 1, 9) non-contiguous mask
    m[..., 0] = True
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    compare(
        lambda q, k, v: F.attention(q, k, v, m.to(q.device), need_weights=True),
        lambda q, k, v: ref.attention(q, k, v, m, need_weights=True),
        [q, k, v],
        dtype=torch.float64,
        device=device,
        grad=(0, 1, 2),
    )
    compare(F.scaled_qk, ref.scaled_qk, [q, k], dtype=torch.float64, device=device, grad=(0, 1))
    s = torch.randn(2, 3, 9, 7, dtype=torch.float64).transpose(-1, -2)
    compare(
        lambda s: F.masked_softmax(s, causal=True),
        lambda s: ref.masked_softmax(s, causal=True),
        [s],
        dtype=torch.float64,
        device=device,
        grad=(0,),
    )
    x = torch.randn(8, 6, dtype=torch.float64).t()
    compare(
        lambda x: F.layer_norm(x, (8,)),
        lambda x: ref.layer_norm(x, (8,)),
        [x],
        dtype=torch.float64,
        device=device,
        grad=(0,),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors(device):
    e = dict(device=device)
    assert F.scaled_qk(torch.randn(0, 3, 4, **e), torch.randn(0, 5, 4, **e)).shape == (0, 3, 5)
    assert F.scaled_qk(torch.randn(2, 0, 4, **e), torch.randn(2, 5, 4, **e)).shape == (2, 0, 5)
    assert F.masked_softmax(torch.randn(2, 0, 5, **e), causal=True).shape == (2, 0, 5)
    assert F.masked_softmax(
        torch.randn(2, 3, 0, **e), key_lengths=torch.zeros(2, dtype=torch.long, **e)
    ).shape == (2, 3, 0)
    assert F.layer_norm(torch.randn(0, 8, **e), (8,)).shape == (0, 8)
    assert F.layer_norm(torch.randn(3, 0, **e), (0,)).shape == (3, 0)
    y, s = F.add_layer_norm(torch.randn(0, 4, **e), torch.randn(0, 4, **e), (4,))
    assert y.shape == s.shape == (0, 4)
    out, w = F.attention(
        torch.randn(0, 2, 3, 4, **e),
        torch.randn(0, 2, 5, 4, **e),
        torch.randn(0, 2, 5, 6, **e),
        need_weights=True,
    )
    assert out.shape == (0, 2, 3, 6) and w.shape == (0, 2, 3, 5)
    out, w = F.attention(
        torch.randn(1, 2, 3, 4, **e),
        torch.randn(1, 2, 0, 4, **e),
        torch.randn(1, 2, 0, 6, **e),
        need_weights=True,
    )
    assert torch.equal(out, torch.zeros(1, 2, 3, 6, **e)) and w.shape == (1, 2, 3, 0)
    x = torch.randn(0, 5, **e, requires_grad=True)
    F.layer_norm(x, (5,)).sum().backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_inference_skips_probs(device, dtype):
    """Without need_weights the op is asked not to write the probabilities (and runs flash
    attention where the device has it): the output agrees and the probs come back empty, with or
    without autograd."""
    q, k, v = (torch.randn(2, 3, 6, 8, device=device, dtype=dtype) for _ in range(3))
    kl = torch.tensor([6, 2], device=device)
    with torch.no_grad():
        out, w = F.attention(q, k, v, key_lengths=kl, scale=8**-0.5)
    full, probs, _ = torch.ops.pyformer.attention(q, k, v, None, 8**-0.5, False, kl, 0.0, True)
    assert w is None and probs.shape == (2, 3, 6, 6)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(out, full, rtol=tol, atol=tol)
    _, none, _ = torch.ops.pyformer.attention(q, k, v, None, 8**-0.5, False, kl, 0.0, False)
    assert none.numel() == 0
    # recorded by autograd, need_probs=False still differentiates (the flash algorithm where the
    # device has it, else the bmm node forms the probabilities itself) and returns no probs
    qg = q.clone().requires_grad_()
    out, none, _ = torch.ops.pyformer.attention(qg, k, v, None, 1.0, 0, kl, 0.0, False)
    assert none.numel() == 0
    (dq,) = torch.autograd.grad(out.sum(), qg)
    qr = q.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.attention(qr, k, v, key_lengths=kl, scale=1.0)[0].sum(), qr)
    torch.testing.assert_close(dq, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_zero_head_dim(device):
    """D = 0: every score is 0, so each row averages v over its allowed keys."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k = (
            torch.randn(2, 3, 4, 0, device=device, dtype=dtype),
            torch.randn(2, 3, 5, 0, device=device, dtype=dtype),
        )
        v = torch.randn(2, 3, 5, 6, device=device, dtype=dtype)
        kl = torch.tensor([5, 2], device=device)
        out, _ = F.attention(q, k, v, key_lengths=kl)
        want, _ = ref.attention(q.double(), k.double(), v.double(), key_lengths=kl)
        assert (out.double() - want).norm() / want.norm() < (
            1e-6 if dtype == torch.float32 else 1e-2
        )
    # gradients: dv averages the cotangent over the allowed keys, dq and dk are empty
    for Dv in (6, 0):
        q, k = (torch.randn(2, 3, n, 0, dtype=torch.float64) for n in (4, 5))
        v = torch.randn(2, 3, 5, Dv, dtype=torch.float64)
        compare(
            lambda q, k, v: F.attention(q, k, v, key_lengths=kl.to(q.device), need_weights=True),
            lambda q, k, v: ref.attention(q, k, v, key_lengths=kl.cpu(), need_weights=True),
            [q, k, v],
            dtype=torch.float32,
            device=device,
            grad=(0, 1, 2),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_attention_grad_of_one_output(device):
    """Only out, or only the weights, reach the loss: the other output's gradient is absent
    (not a tensor of zeros) and the result is the same."""
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    m = torch.rand(2, 1, 5, 5) > 0.3
    m[..., 0] = True
    for pick in (0, 1):
        compare(
            lambda q, k, v: F.attention(q, k, v, m.to(q.device), need_weights=True)[pick],
            lambda q, k, v: ref.attention(q, k, v, m, need_weights=True)[pick],
            [q, k, v],
            dtype=torch.float64,
            device=device,
            grad=(0, 1, 2),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_masked_softmax_high_rank_and_broadcast_masks(device):
    """Scores of rank 10 with a mask broadcast over some of their dims (the CUDA kernel merges
    dims where the mask's strides allow), and an expand()ed additive mask of another dtype
    (converted without materializing the expansion)."""
    shape = (2, 1, 3, 2, 1, 2, 1, 2, 3, 5)
    s = torch.randn(*shape, dtype=torch.float64)
    m = torch.rand(2, 1, 3, 1, 1, 2, 1, 1, 3, 5) > 0.3
    m[..., 0] = True
    mt = m.transpose(2, 5)  # non-contiguous, still broadcastable: (2,1,2,1,1,3,1,1,3,5)
    s2 = torch.randn(2, 1, 2, 2, 1, 3, 1, 2, 3, 5, dtype=torch.float64)
    kl = torch.randint(1, 6, (2,))
    for scores, mask in ((s, m), (s2, mt)):
        compare(
            lambda s: F.masked_softmax(
                s, mask.to(s.device), scale=0.7, causal=True, key_lengths=kl.to(s.device)
            ),
            lambda s: ref.masked_softmax(s, mask, scale=0.7, causal=True, key_lengths=kl),
            [scores],
            dtype=torch.float32,
            device=device,
            grad=(0,),
        )
    add = torch.randn(2, 1, 1, 5, dtype=torch.float32)
    add[..., 3] = float("-inf")
    big = add.expand(2, 4, 3, 5)  # stride 0 over heads and queries
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    compare(
        lambda x: F.masked_softmax(x, big.to(x.device), scale=0.5),
        lambda x: ref.masked_softmax(x, big.double(), scale=0.5),
        [x],
        dtype=torch.bfloat16,
        device=device,
        grad=(0,),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N", [1, 3, 1000, 5000, 10000])
def test_layer_norm_constant_rows_are_exact(device, dtype, N):
    """A constant row normalizes to exactly 0 (y == bias), as in torch, on every path (warp,
    block and long rows on CUDA), even where the float sum of the row is inexact; its gradient
    (rstd * (g - mean(g)), exactly 0 when N == 1) matches the reference; and a row whose first
    element is an outlier keeps the dtype's accuracy."""
    vals = torch.tensor([1000.1, 0.1, -3.7, 1e-3], dtype=torch.float64).to(dtype)
    x = vals.view(4, 1).expand(4, N).contiguous().to(device)
    w = torch.randn(N, dtype=dtype, device=device)
    b = torch.randn(N, dtype=dtype, device=device)
    y = F.layer_norm(x, (N,), w, b)
    assert torch.equal(y, b.expand(4, N)), (y - b).abs().max()
    # the float64 reference is exact on constant rows of float32/bfloat16 values (their sum in
    # float64 is exact), not of float64 values, where it is the less accurate side
    if dtype != torch.float64:
        compare(
            lambda x, w, b: F.layer_norm(x, (N,), w, b),
            lambda x, w, b: ref.layer_norm(x, (N,), w, b),
            [x.double().cpu(), w.double().cpu(), b.double().cpu()],
            dtype=dtype,
            device=device,
            grad=(0, 1, 2),
        )
    if N == 1:
        xr = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(F.layer_norm(xr, (N,), w, b), xr, torch.randn_like(xr))
        assert not dx.any()
    spike = torch.randn(2, N, dtype=torch.float64)
    spike[:, 0] = 1000.0
    compare(
        lambda s: F.layer_norm(s, (N,)),
        lambda s: ref.layer_norm(s, (N,)),
        [spike],
        dtype=dtype,
        device=device,
        grad=(0,),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_large_outputs(device):
    """Outputs of 4 MiB and more (on the CPU they are allocated with the huge-page advice of
    csrc/cpu/memory.h) hold the same values as small ones: every op, forward and backward."""
    x = torch.randn(1024, 2048, dtype=torch.float64)  # 8 MiB in float32
    compare(
        lambda x: F.layer_norm(x, (2048,)),
        lambda x: ref.layer_norm(x, (2048,)),
        [x],
        dtype=torch.float32,
        device=device,
        grad=(0,),
    )
    s = torch.randn(2, 4, 256, 1024, dtype=torch.float64)
    m = torch.rand(2, 1, 1, 1024) > 0.3
    m[..., 0] = True
    compare(
        lambda s: F.masked_softmax(s, m.to(s.device), scale=0.125),
        lambda s: ref.masked_softmax(s, m, scale=0.125),
        [s],
        dtype=torch.float32,
        device=device,
        grad=(0,),
    )
    q, k, v = (torch.randn(2, 4, 512, 64, dtype=torch.float64) for _ in range(3))
    compare(
        lambda q, k, v: F.attention(q, k, v, m[..., :512].to(q.device), need_weights=True),
        lambda q, k, v: ref.attention(q, k, v, m[..., :512], need_weights=True),
        [q, k, v],
        dtype=torch.float32,
        device=device,
        grad=(0, 1, 2),
    )
    compare(F.scaled_qk, ref.scaled_qk, [q, k], dtype=torch.float32, device=device, grad=(0, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 3, 8])
@pytest.mark.parametrize(
    "kind", ["none", "bool (B,H,Lq,Lk)", "float (1,H,Lq,Lk)", "causal bottom_right", "key_lengths"]
)
@pytest.mark.parametrize("Lq,Lk", [(5, 7), (7, 5), (1, 33)])
def test_attention_grouped_query(device, dtype, groups, kind, Lq, Lk):
    """k and v with H / groups heads: query head h reads kv head h // groups; dk and dv are the
    sums over each group (the reference repeats k and v, the op never does)."""
    B, Hkv, D, Dv = 2, 2, 16, 8
    H = Hkv * groups
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=torch.float64)
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk)
    grad = (0, 1, 2, 3) if mask is not None and mask.is_floating_point() else (0, 1, 2)
    for need_weights in (True, False):
        kw = dict(causal=causal, need_weights=need_weights)
        f = lambda q, k, v, m: F.attention(
            q, k, v, m, key_lengths=None if kl is None else kl.to(q.device), **kw
        )
        r = lambda q, k, v, m: ref.attention(q, k, v, m, key_lengths=kl, **kw)
        compare(f, r, [q, k, v, mask], dtype=dtype, device=device, grad=grad, what=kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Lq,Lk", [(3, 8), (8, 3), (4, 4), (1, 9)])
def test_bottom_right_causal_is_sdpa_with_its_mask(device, Lq, Lk):
    """causal="bottom_right": key j <= i + Lk - Lq, the mask FlashAttention and a KV cache use;
    rows with no key (Lq > Lk) give zeros, in masked_softmax and attention alike."""
    q = torch.randn(2, 3, Lq, 8, device=device)
    k, v = torch.randn(2, 3, Lk, 8, device=device), torch.randn(2, 3, Lk, 8, device=device)
    ok = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)
    out, _ = F.attention(q, k, v, causal="bottom_right")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ok)
    rows = ok.any(-1)
    torch.testing.assert_close(out[..., rows, :], want[..., rows, :])
    assert torch.equal(out[..., ~rows, :], torch.zeros_like(out[..., ~rows, :]))
    s = torch.randn(2, 3, Lq, Lk, device=device)
    torch.testing.assert_close(F.masked_softmax(s, causal="bottom_right"), F.masked_softmax(s, ok))
    assert torch.equal(F.masked_softmax(s, causal="top_left"), F.masked_softmax(s, causal=True))
    for bad in ("bottom-right", 1, None):
        with pytest.raises(TypeError, match="causal"):
            F.masked_softmax(s, causal=bad)
        with pytest.raises(TypeError, match="causal"):
            F.attention(q, k, v, causal=bad)
