"""pyformer.nn: the drop-in LayerNorm and MultiheadAttention.

Every comparison is against a float64 computation of the same thing (PyTorch's own module or the
pure-PyTorch reference backend) on fresh random inputs, by relative error ||out - ref|| / ||ref||
with docs/ops.md's bounds; gradients likewise. Tests also check that the fast ops really ran.
"""

from __future__ import annotations

import copy
import re

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


# ------------------------------------------------------------------ drop-in: errors, dtypes, jit


@pytest.mark.parametrize("which", ["key_padding_mask", "attn_mask"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_mha_integer_masks_raise_like_torch(which, dtype, calls):
    """An integer mask is an error, as in torch.nn.MultiheadAttention (AssertionError), never an
    additive mask; pyformer's error is also a TypeError (the ops' type for a dtype)."""
    t = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    p = pnn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    shape = (2, 5) if which == "key_padding_mask" else (5, 5)
    bad = {which: torch.zeros(shape, dtype=dtype)}
    with pytest.raises(AssertionError, match="only bool and floating"):
        t(x, x, x, **bad)
    other = "attn_mask" if which == "key_padding_mask" else "key_padding_mask"
    for extra in ({}, {other: torch.zeros((5, 5) if other == "attn_mask" else (2, 5))}):
        with pytest.raises(AssertionError, match=which) as info:  # alone or with a float mask
            p(x, x, x, **bad, **extra)
        assert isinstance(info.value, (TypeError, pnn.MaskDtypeError))
        assert "pyformer.nn.MultiheadAttention" in str(info.value)
    # unbatched and on torch's path (add_bias_kv) alike
    with pytest.raises(pnn.MaskDtypeError):
        p(
            x[0],
            x[0],
            x[0],
            **{
                which: torch.zeros(
                    shape[-1:] if which == "key_padding_mask" else shape, dtype=dtype
                )
            },
        )
    q = pnn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    with pytest.raises(pnn.MaskDtypeError):
        q(x, x, x, **bad)
    assert "attention" not in calls


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_mask_shapes_are_checked(batch_first):
    """A mask of the wrong shape raises an error naming the argument the caller passed, never a
    silent misreading (a right-padding (N, S-1) mask read as key lengths) or an error about an
    argument the caller never passed; torch's types (AssertionError, RuntimeError) catch it."""
    p = pnn.MultiheadAttention(8, 2, batch_first=batch_first)
    n, s = 3, 6
    x = torch.randn(n, s, 8) if batch_first else torch.randn(s, n, 8)
    cases = [
        ("key_padding_mask", torch.arange(s - 1) >= torch.tensor([[5], [3], [2]])),  # (N, S-1)
        ("key_padding_mask", torch.zeros(n + 1, s, dtype=torch.bool)),  # wrong batch
        ("key_padding_mask", torch.zeros(n, s)),  # float, (N, S) is fine: control case
        ("key_padding_mask", torch.zeros(n, s, 1, dtype=torch.bool)),
        ("attn_mask", torch.zeros(s, s - 1, dtype=torch.bool)),
        ("attn_mask", torch.zeros(1, s, s)),  # 3-D must be (N * num_heads, L, S)
        ("attn_mask", torch.zeros(n * 2 + 1, s, s)),
        ("attn_mask", torch.zeros(n * 2, s, s)),  # control case
    ]
    for name, m in cases:
        ok = m.shape in ((n, s), (n * 2, s, s))
        if ok:
            out, _ = p(x, x, x, **{name: m})
            assert out.shape == x.shape
            continue
        with pytest.raises(pnn.AttentionShapeError, match=f"argument '{name}'") as info:
            p(x, x, x, **{name: m})
        assert "key_lengths" not in str(info.value)
        assert isinstance(info.value, (AssertionError, RuntimeError, ValueError))
    # unbatched: (S) and (L, S) / (num_heads, L, S)
    u = x[:, 0] if not batch_first else x[0]
    for name, m in (
        ("key_padding_mask", torch.zeros(1, s, dtype=torch.bool)),
        ("key_padding_mask", torch.zeros(s - 1, dtype=torch.bool)),
        ("attn_mask", torch.zeros(2 * n, s, s)),
    ):
        with pytest.raises(pnn.AttentionShapeError, match=f"argument '{name}'"):
            p(u, u, u, **{name: m})
    out, _ = p(u, u, u, key_padding_mask=torch.zeros(s, dtype=torch.bool))
    out2, _ = p(u, u, u, attn_mask=torch.zeros(2, s, s))
    assert out.shape == out2.shape == u.shape


def test_mha_input_shapes_name_the_argument():
    p = pnn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=4)
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 7, 6), torch.randn(2, 7, 4)
    for name, args in (
        ("query", (torch.randn(2, 5, 9), k, v)),
        ("key", (q, torch.randn(2, 7, 8), v)),
        ("key", (q, torch.randn(3, 7, 6), v)),
        ("value", (q, k, torch.randn(2, 6, 4))),
        ("value", (q, k, torch.randn(2, 7, 6))),
        ("key", (q, k[0], v)),
        ("query", (q[None], k, v)),
    ):
        with pytest.raises(pnn.AttentionShapeError, match=f"argument '{name}'"):
            p(*args)
        with pytest.raises(AssertionError):  # what torch.nn.MultiheadAttention raises
            p(*args)


def test_layer_norm_errors_are_torch_types():
    """torch.nn.LayerNorm raises RuntimeError for an input of the wrong shape; pyformer's error is
    that too (and the ValueError its op raises), with the op's message and the op's error as the
    cause."""
    with pytest.raises(RuntimeError):
        torch.nn.LayerNorm((10,))(torch.rand(2, 3))
    for call in (
        lambda: pnn.LayerNorm((10,))(torch.rand(2, 3)),
        lambda: pnn.LayerNorm((3, 4))(torch.rand(2, 4, 3)),
        lambda: pnn.LayerNorm(3)(torch.rand(2, 3), residual=torch.rand(2, 1)),
    ):
        with pytest.raises(RuntimeError, match="normalized_shape|residual") as info:
            call()
        assert isinstance(info.value, (ValueError, pnn.ShapeError))
        assert type(info.value.__cause__) is ValueError
        assert str(info.value) == str(info.value.__cause__)
    assert issubclass(pnn.ShapeError, ValueError) and issubclass(pnn.ShapeError, RuntimeError)
    assert issubclass(pnn.AttentionShapeError, pnn.ShapeError)
    assert issubclass(pnn.AttentionShapeError, AssertionError)
    assert issubclass(pnn.MaskDtypeError, TypeError) and issubclass(
        pnn.MaskDtypeError, AssertionError
    )
    assert {"ShapeError", "AttentionShapeError", "MaskDtypeError"} <= set(pnn.__all__)


@pytest.mark.parametrize(
    "shape,nshape,xdtype,pdtype",
    [
        ((2, 3, 11, 3), [11, 3], torch.bfloat16, torch.float32),
        ((4, 6), [6], torch.float16, torch.float32),
        ((4, 6), [6], torch.float64, torch.float32),  # torch raises: so must pyformer
        ((4, 6), [6], torch.float32, torch.bfloat16),  # torch raises
        ((4, 6), [6], torch.int64, torch.float32),  # torch raises
    ],
)
def test_layer_norm_mixed_dtypes_run_torch(shape, nshape, xdtype, pdtype, calls):
    t = torch.nn.LayerNorm(nshape, dtype=pdtype)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-0.5, 0.5)
    p = pnn.LayerNorm(nshape, dtype=pdtype)
    p.load_state_dict(t.state_dict())
    x = (torch.randn(shape) * 3).to(xdtype)
    try:
        ref = t(x)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=re.escape(str(e))):
            p(x)
        return
    torch.testing.assert_close(p(x), ref, rtol=0, atol=0)
    assert "layer_norm" not in calls


@pytest.mark.parametrize("param", ["in_proj_bias", "out_proj.bias", "in_proj_weight", "k_proj"])
def test_mha_mixed_param_dtypes_run_torch(param, calls):
    """A parameter of another dtype than the input: torch's own forward, its answer or error."""
    kw = {"kdim": 6, "vdim": 6} if param == "k_proj" else {}
    t = torch.nn.MultiheadAttention(8, 2, batch_first=True, **kw)
    name = "k_proj_weight" if param == "k_proj" else param
    mod, _, attr = name.rpartition(".")
    for m in (t,):
        owner = m.get_submodule(mod) if mod else m
        setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().double()))
    p = pnn.MultiheadAttention(8, 2, batch_first=True, **kw)
    owner = p.get_submodule(mod) if mod else p
    setattr(owner, attr, torch.nn.Parameter(getattr(owner, attr).detach().double()))
    p.load_state_dict(t.state_dict())
    x = torch.randn(2, 5, 8)
    kv = torch.randn(2, 7, 6) if kw else x
    for train in (True, False):
        t.train(train)
        p.train(train)
        try:
            ref = t(x, kv, kv)
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                p(x, kv, kv)
            continue
        out = p(x, kv, kv)
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    assert "attention" not in calls


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = pnn.MultiheadAttention(16, 4, batch_first=True)
        self.cross = pnn.MultiheadAttention(16, 2, kdim=6, vdim=10)
        self.norm = pnn.LayerNorm(16)
        self.norm2 = pnn.LayerNorm([5, 16], elementwise_affine=False)

    def forward(self, x, mk, mv, pad, am):
        a, w = self.attn(x, x, x, key_padding_mask=pad, attn_mask=am)
        y = self.norm(a, x)
        c, _ = self.cross(
            y.transpose(0, 1), mk.transpose(0, 1), mv.transpose(0, 1), need_weights=False
        )
        return self.norm2(self.norm(c.transpose(0, 1))), w


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_runs_torchs_implementation(calls):
    """torch.jit.script compiles a model holding the drop-ins; the scripted model runs PyTorch's
    implementation and gives eager's answer (pyformer's kernels)."""
    torch.manual_seed(6)
    m = _Block().double()
    with torch.no_grad():
        for prm in m.parameters():
            prm.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mem = (torch.randn(3, 7, 6, dtype=torch.float64), torch.randn(3, 7, 10, dtype=torch.float64))
    pad = torch.arange(5) >= torch.tensor([[5], [3], [4]])
    am = torch.randn(5, 5, dtype=torch.float64)
    sm = torch.jit.script(m)
    for train in (False, True):
        m.train(train)
        sm.train(train)
        ye, we = m(x, *mem, pad, am)
        ys, ws = sm(x, *mem, pad, am)
        assert rel(ys, ye) <= 1e-12 and rel(ws, we) <= 1e-12
    assert calls.get("attention") == 4 and calls.get("add_layer_norm") == 2  # eager: pyformer's
    # a converted torch model scripts too
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    import pyformer

    pyformer.convert(layer)
    layer.eval()
    xf = x.float()
    torch.testing.assert_close(torch.jit.script(layer)(xf), layer(xf), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["key_padding_mask", "attn_mask"])
@pytest.mark.parametrize(
    "qdtype, mdtype",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_float_mask_of_another_dtype_raises_like_torch(which, qdtype, mdtype, need_weights):
    """A floating mask of another dtype than the query: torch.nn.MultiheadAttention raises
    RuntimeError (in one place or another; without need_weights it takes float32 too), and so
    does pyformer's, naming the argument."""
    t = torch.nn.MultiheadAttention(8, 2, batch_first=True).to(qdtype)
    p = pnn.MultiheadAttention(8, 2, batch_first=True).to(qdtype)
    x = torch.randn(2, 5, 8, dtype=qdtype)
    shape = (2, 5) if which == "key_padding_mask" else (5, 5)
    bad = {which: torch.zeros(shape, dtype=mdtype), "need_weights": need_weights}
    p.load_state_dict(t.state_dict())
    if mdtype == torch.float32 and not need_weights:  # taken by both, with the same answer
        torch.testing.assert_close(p(x, x, x, **bad)[0], t(x, x, x, **bad)[0])
        return
    with pytest.raises(RuntimeError):
        t(x, x, x, **bad)
    with pytest.raises(RuntimeError, match=which) as info:
        p(x, x, x, **bad)
    assert isinstance(info.value, pnn.MaskDtypeError)
    # the query's own dtype is taken, and agrees with torch
    ok = {which: torch.zeros(shape, dtype=qdtype)}
    torch.testing.assert_close(p(x, x, x, **ok)[0], t(x, x, x, **ok)[0])
