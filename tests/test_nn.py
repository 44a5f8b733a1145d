"""pyformer.nn: the drop-in LayerNorm and MultiheadAttention.

Every comparison is against a float64 computation of the same thing (PyTorch's own module or the
pure-PyTorch reference backend) on fresh random inputs, by relative error ||out - ref|| / ||ref||
with docs/ops.md's bounds; gradients likewise. Tests also check that the fast ops really ran.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pyformer.testing import rel_err as rel
import pyformer.nn as pnn

from pyformer.testing import BOUNDS as BOUND

from conftest import NEEDS_CUDA

pytestmark = pytest.mark.filterwarnings(
    "ignore:Support for mismatched key_padding_mask:UserWarning"
)


# ------------------------------------------------------------------------------------ LayerNorm


@pytest.mark.parametrize("shape", [(4, 7, 32), (3, 5, 4, 6)])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_norm_matches_torch(shape, affine, bias, dtype, calls):
    nshape = shape[-1:] if len(shape) == 3 else shape[-2:]
    ref = torch.nn.LayerNorm(nshape, elementwise_affine=affine, bias=bias, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if bias:
                ref.bias.uniform_(-0.5, 0.5)
    mod = pnn.LayerNorm(nshape, elementwise_affine=affine, bias=bias, dtype=dtype)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod.load_state_dict(ref.state_dict())
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    xl = x.detach().to(dtype).requires_grad_()
    y, yl = ref(x), mod(xl)
    assert yl.dtype == dtype and yl.shape == y.shape
    assert rel(yl, y) <= BOUND[dtype]
    g = torch.randn_like(y)
    y.backward(g)
    yl.backward(g.to(dtype))
    assert rel(xl.grad, x.grad) <= BOUND[dtype]
    for p, q in zip(mod.parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) <= BOUND[dtype]
    assert calls.get("layer_norm") == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_norm_add_path(dtype, calls):
    mod = pnn.LayerNorm(48, dtype=dtype)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.5, 0.5)
    ref = torch.nn.LayerNorm(48, dtype=torch.float64)
    ref.load_state_dict(mod.state_dict())
    x, r = torch.randn(2, 9, 48, dtype=torch.float64), torch.randn(2, 9, 48, dtype=torch.float64)
    y = mod(x.to(dtype), residual=r.to(dtype))
    assert rel(y, ref(x + r)) <= BOUND[dtype]
    y2, s = mod.add_norm(x.to(dtype), r.to(dtype))
    assert rel(s, x + r) <= BOUND[dtype] and rel(y2, y) == 0.0
    assert calls.get("add_layer_norm") == 2


def test_layer_norm_state_dict_round_trip_and_defaults():
    t = torch.nn.LayerNorm((3, 4), eps=1e-3)
    p = pnn.LayerNorm((3, 4), eps=1e-3)
    assert isinstance(p, torch.nn.LayerNorm)
    assert p.normalized_shape == (3, 4) and p.eps == 1e-3
    torch.testing.assert_close(p.weight, t.weight)
    torch.testing.assert_close(p.bias, t.bias)
    t.load_state_dict(p.state_dict())
    p.load_state_dict(t.state_dict())


def test_layer_norm_falls_back_to_torch(monkeypatch, calls):
    import pyformer.nn.layers as L

    monkeypatch.setattr(L, "kernels_support", lambda ts: False)
    mod = pnn.LayerNorm(16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(
        mod(x), torch.nn.functional.layer_norm(x, (16,), mod.weight, mod.bias)
    )
    assert "layer_norm" not in calls


# --------------------------------------------------------------------------- MultiheadAttention


def _pair(embed, heads, dtype, **kw):
    t = torch.nn.MultiheadAttention(embed, heads, dtype=torch.float64, **kw)
    with torch.no_grad():  # nonzero biases so they are tested too
        for name, prm in t.named_parameters():
            if "bias" in name:
                prm.uniform_(-0.3, 0.3)
    p = pnn.MultiheadAttention(embed, heads, dtype=dtype, **kw)
    assert p.state_dict().keys() == t.state_dict().keys()
    p.load_state_dict(t.state_dict())
    return t, p


MASKS = [
    "none",
    "kpm_right",
    "kpm_any",
    "kpm_float",
    "am2_bool",
    "am2_float",
    "am3_float",
    "am2_bool+kpm_right",
    "am3_float+kpm_any",
    "causal",
    "causal+kpm_right",
]


def _masks(kind, n, h, lq, lk, gen):
    kw = {}
    lengths = torch.tensor([lk, max(1, lk - 3), max(1, lk // 2)][:n])
    if "kpm_right" in kind:
        kw["key_padding_mask"] = torch.arange(lk) >= lengths[:, None]
    if "kpm_any" in kind:
        m = torch.rand(n, lk, generator=gen) < 0.3
        m[:, 0] = False  # no fully masked row: PyTorch gives NaN there, pyformer zeros
        kw["key_padding_mask"] = m
    if "kpm_float" in kind:
        kw["key_padding_mask"] = torch.randn(n, lk, generator=gen, dtype=torch.float64)
    if "am2_bool" in kind:
        m = torch.rand(lq, lk, generator=gen) < 0.3
        m[:, 0] = False
        kw["attn_mask"] = m
    if "am2_float" in kind:
        kw["attn_mask"] = torch.randn(lq, lk, generator=gen, dtype=torch.float64)
    if "am3_float" in kind:
        kw["attn_mask"] = torch.randn(n * h, lq, lk, generator=gen, dtype=torch.float64)
    if "causal" in kind:
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(
            lq, dtype=torch.float64
        )
        kw["is_causal"] = True
    return kw


def _cast_masks(kw, dtype):
    return {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in kw.items()
    }


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mha_matches_torch(mask, batch_first, dtype, calls):
    gen = torch.Generator().manual_seed(hash((mask, batch_first)) % 1000)
    torch.manual_seed(0)
    n, h, e = 3, 4, 32
    lq = 7
    lk = 7 if "causal" in mask else 11
    t, p = _pair(e, h, dtype, batch_first=batch_first)
    self_attn = lq == lk
    q = torch.randn(n, lq, e, dtype=torch.float64, generator=gen)
    k = q if self_attn else torch.randn(n, lk, e, dtype=torch.float64, generator=gen)
    v = q if self_attn else torch.randn(n, lk, e, dtype=torch.float64, generator=gen)
    if not batch_first:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        if self_attn:
            k = v = q
    qd = q.to(dtype).requires_grad_()
    kd, vd = (qd, qd) if self_attn else (k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_())
    q.requires_grad_()
    if not self_attn:
        k.requires_grad_()
        v.requires_grad_()
    kw = _masks(mask, n, h, lq, lk, gen)
    for avg in (True, False):
        out_t, w_t = t(
            q, k if not self_attn else q, v if not self_attn else q, average_attn_weights=avg, **kw
        )
        out_p, w_p = p(qd, kd, vd, average_attn_weights=avg, **_cast_masks(kw, dtype))
        assert out_p.dtype == dtype and out_p.shape == out_t.shape and w_p.shape == w_t.shape
        assert rel(out_p, out_t) <= BOUND[dtype], (mask, avg)
        assert rel(w_p, w_t) <= BOUND[dtype], (mask, avg)
    g = torch.randn_like(out_t)
    out_t.backward(g)
    out_p.backward(g.to(dtype))
    assert rel(qd.grad, q.grad) <= BOUND[dtype]
    if not self_attn:
        assert rel(kd.grad, k.grad) <= BOUND[dtype]
        assert rel(vd.grad, v.grad) <= BOUND[dtype]
    for (name, a), (_, b) in zip(p.named_parameters(), t.named_parameters()):
        assert rel(a.grad, b.grad) <= BOUND[dtype], name
    assert calls.get("attention") == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mha_kdim_vdim_and_no_bias(dtype, calls):
    torch.manual_seed(1)
    t, p = _pair(24, 3, dtype, kdim=10, vdim=14, batch_first=True)
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"} <= set(
        dict(p.named_parameters())
    )
    q = torch.randn(2, 5, 24, dtype=torch.float64)
    k, v = torch.randn(2, 8, 10, dtype=torch.float64), torch.randn(2, 8, 14, dtype=torch.float64)
    kpm = torch.arange(8) >= torch.tensor([[8], [3]])
    a, wa = t(q, k, v, key_padding_mask=kpm)
    b, wb = p(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=kpm)
    assert rel(b, a) <= BOUND[dtype] and rel(wb, wa) <= BOUND[dtype]

    t, p = _pair(16, 2, dtype, bias=False)
    assert p.in_proj_bias is None and p.out_proj.bias is None
    x = torch.randn(6, 2, 16, dtype=torch.float64)
    a, _ = t(x, x, x, need_weights=False)
    b, wb = p(x.to(dtype), x.to(dtype), x.to(dtype), need_weights=False)
    assert wb is None and rel(b, a) <= BOUND[dtype]
    assert calls.get("attention") == 2


def test_mha_unbatched():
    torch.manual_seed(2)
    t, p = _pair(16, 4, torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    y = torch.randn(7, 16, dtype=torch.float64)
    kpm = torch.tensor([False] * 5 + [True] * 2)
    am = torch.randn(4, 5, 7, dtype=torch.float64)
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": am}):
        a, wa = t(x, y, y, **kw)
        b, wb = p(x, y, y, **kw)
        assert b.shape == (5, 16) and wb.shape == (5, 7)
        assert rel(b, a) <= 1e-12 and rel(wb, wa) <= 1e-12


def test_mha_fully_masked_rows_are_zero():
    p = pnn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    kpm = torch.tensor([[False] * 4, [True] * 4])
    out, w = p(x, x, x, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert (w[1] == 0).all()
    torch.testing.assert_close(out[1], p.out_proj.bias.expand(4, 8))


def test_mha_fallbacks_and_errors(calls):
    torch.manual_seed(3)
    t = torch.nn.MultiheadAttention(
        16, 2, add_bias_kv=True, add_zero_attn=True, dtype=torch.float64
    )
    p = pnn.MultiheadAttention(16, 2, add_bias_kv=True, add_zero_attn=True, dtype=torch.float64)
    p.load_state_dict(t.state_dict())
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(p(x, x, x)[0], t(x, x, x)[0])
    assert "attention" not in calls  # PyTorch's own path
    q = pnn.MultiheadAttention(16, 2)
    with pytest.raises(RuntimeError, match="is_causal"):
        q(x.float(), x.float(), x.float(), is_causal=True)
    with pytest.raises(AssertionError):
        q(torch.randn(4, 2, 16), torch.randn(5, 3, 16), torch.randn(5, 3, 16))


def test_mha_dropout_train_vs_eval():
    torch.manual_seed(4)
    p = pnn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 16)
    p.train()
    a, _ = p(x, x, x)
    b, _ = p(x, x, x)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    p.eval()
    c, _ = p(x, x, x)
    d, _ = p(x, x, x)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_mha_state_dict_to_torch():
    p = pnn.MultiheadAttention(32, 4)
    t = torch.nn.MultiheadAttention(32, 4)
    t.load_state_dict(p.state_dict())
    x = torch.randn(5, 2, 32)
    torch.testing.assert_close(p(x, x, x)[0], t(x, x, x)[0], rtol=1e-5, atol=1e-6)


def _cuda_ok():
    import pyformer

    return torch.cuda.is_available() and pyformer.backends().get("cuda", False)


@pytest.mark.skipif(not _cuda_ok(), reason=NEEDS_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_on_cuda(dtype, calls):
    """The same modules on CUDA tensors, against PyTorch's modules in float64 on the CPU."""
    torch.manual_seed(5)
    t, p = _pair(64, 4, torch.float32, batch_first=True)
    p = p.to(device="cuda", dtype=dtype)
    x = torch.randn(2, 33, 64, dtype=torch.float64)
    kpm = torch.arange(33) >= torch.tensor([[33], [20]])
    ref, _ = t(x, x, x, key_padding_mask=kpm)
    xc = x.to(device="cuda", dtype=dtype)
    out, _ = p(xc, xc, xc, key_padding_mask=kpm.cuda())
    # docs/ops.md for half types: no worse than twice PyTorch's own error in the same dtype, + 1e-5
    tc = copy.deepcopy(t).to(device="cuda", dtype=dtype)
    torch_out, _ = tc(xc, xc, xc, key_padding_mask=kpm.cuda())
    bound = 1e-5 if dtype == torch.float32 else 2 * rel(torch_out.cpu(), ref) + 1e-5
    assert out.device.type == "cuda" and out.dtype == dtype and rel(out.cpu(), ref) <= bound
    norm = pnn.LayerNorm(64).to(device="cuda", dtype=dtype)
    y = norm(xc)
    yref = torch.nn.functional.layer_norm(xc.double(), (64,))  # from the same rounded inputs
    assert rel(y.cpu(), yref.cpu()) <= (1e-5 if dtype == torch.float32 else 1.6e-2)
    assert calls.get("attention") == 1 and calls.get("layer_norm") == 1
