"""The ops of a modern Transformer block besides attention: rms_norm, add_rms_norm, apply_rotary
and swiglu, every output and every gradient against the float64 reference, on fresh random
inputs, plus their edges (empty inputs, layouts, broadcasting, bad arguments) and agreement with
PyTorch's own functions."""

from __future__ import annotations

import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from conftest import DEVICES, compare, verify
from pyformer.cli.benchcases import hf_apply_rotary_pos_emb

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


# ---- rms_norm / add_rms_norm -------------------------------------------------------------------
# (N = 1 and 2 are left out: dx is the part of g orthogonal to x, all cancellation for N = 1
# (dx = rstd * g * eps / (x^2 + eps)) and for N = 2 one direction whose size may be a small part
# of g's, in any formula and in the reference's autograd alike)
RMS_SHAPES = [
    ((4, 3), (3,)),
    ((3, 7), (7,)),
    ((2, 5, 97), (97,)),
    ((3, 4097), (4097,)),
    ((2, 3, 768), (768,)),
    ((2, 4, 5), (4, 5)),
    ((6,), (6,)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", RMS_SHAPES)
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm(device, dtype, shape, ns, weight, eps):
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(*ns, dtype=torch.float64) * 0.5 + 1 if weight else None
    compare(
        lambda x, w: F.rms_norm(x, ns, w, eps),
        lambda x, w: ref.rms_norm(x, ns, w, eps),
        [x, w],
        dtype=dtype,
        device=device,
        grad=(0, 1) if weight else (0,),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", RMS_SHAPES[:5])
def test_add_rms_norm(device, dtype, shape, ns):
    x, r = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(*ns, dtype=torch.float64)
    compare(
        lambda x, r, w: F.add_rms_norm(x, r, ns, w),
        lambda x, r, w: ref.add_rms_norm(x, r, ns, w),
        [x, r, w],
        dtype=dtype,
        device=device,
        grad=(0, 1, 2),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(device, dtype):
    """F.rms_norm's answer, eps=None included (the machine epsilon of the computation type: a
    row of tiny values shows which epsilon is used)."""
    x = torch.randn(5, 33, dtype=dtype, device=device)
    x[0] = 1e-4
    w = torch.randn(33, dtype=dtype, device=device)
    for eps in (None, 1e-3):
        got = F.rms_norm(x, 33, w, eps)
        want = torch.nn.functional.rms_norm(x.double(), (33,), w.double(), eps).to(dtype)
        if eps is None and dtype != torch.float64:
            want = torch.nn.functional.rms_norm(x.float(), (33,), w.float(), None).to(dtype)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_edges(device):
    e = dict(device=device)
    assert F.rms_norm(torch.randn(0, 8, **e), 8).shape == (0, 8)
    assert F.rms_norm(torch.randn(3, 0, **e), (0,)).shape == (3, 0)
    y, s = F.add_rms_norm(torch.randn(0, 4, **e), torch.randn(0, 4, **e), (4,))
    assert y.shape == s.shape == (0, 4)
    # a zero row: rstd = 1/sqrt(eps), y = 0 exactly, gradients finite
    x = torch.zeros(2, 16, **e, requires_grad=True)
    y = F.rms_norm(x, 16)
    assert torch.equal(y, torch.zeros_like(y))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    # non-contiguous input: the same answer as its contiguous copy
    xt = torch.randn(16, 4, **e).t()
    torch.testing.assert_close(F.rms_norm(xt, 16), F.rms_norm(xt.contiguous(), 16), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_errors(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"pyformer\.rms_norm: argument 'x'"):
        F.rms_norm(x, 7)
    with pytest.raises(ValueError, match=r"pyformer\.rms_norm: argument 'weight'"):
        F.rms_norm(x, 8, torch.ones(7, device=device))
    with pytest.raises(ValueError, match=r"pyformer\.rms_norm: argument 'eps'"):
        F.rms_norm(x, 8, None, -1.0)
    with pytest.raises(TypeError, match=r"pyformer\.rms_norm: argument 'x'"):
        F.rms_norm(torch.ones(2, 8, dtype=torch.int64, device=device), 8)
    with pytest.raises(ValueError, match=r"pyformer\.add_rms_norm: argument 'residual'"):
        F.add_rms_norm(x, torch.randn(2, 9, device=device), 8)


# ---- apply_rotary ------------------------------------------------------------------------------
def _cos_sin(b, L, dr, *, interleaved=False, base=10000.0, offset=0):
    """cos, sin (b, L, dr) as Hugging Face's rotary modules build them (positions offset..)."""
    inv = 1.0 / base ** (torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    pos = torch.arange(offset, offset + L, dtype=torch.float64)[None, :].expand(b, L)
    if b > 1:  # per-sequence positions (left padding shifts them)
        pos = pos + torch.arange(b, dtype=torch.float64)[:, None]
    f = pos[..., None] * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
    return emb.cos(), emb.sin()


ROT_SHAPES = [  # (B, Hq, Hk, L, D, Dr, cos batch)
    (2, 4, 4, 7, 64, 64, 1),
    (2, 8, 2, 5, 32, 32, 2),  # GQA, per-sequence positions
    (1, 3, 1, 9, 80, 32, 1),  # partial rotary: 48 dims pass through
    (3, 2, 2, 1, 128, 128, 3),  # decoding: one position
    (1, 1, 1, 4, 6, 2, 1),  # one pair, odd head dims
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROT_SHAPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "projection"])
def test_apply_rotary(device, dtype, shape, interleaved, layout):
    B, Hq, Hk, L, D, Dr, Bc = shape
    q, k = (
        torch.randn(B, Hq, L, D, dtype=torch.float64),
        torch.randn(B, Hk, L, D, dtype=torch.float64),
    )
    cos, sin = _cos_sin(Bc, L, Dr, interleaved=interleaved)

    def impl(q, k, cos, sin):
        if layout == "projection":  # the (B, L, H, D) projection seen as (B, H, L, D)
            q, k = (
                q.transpose(1, 2).contiguous().transpose(1, 2),
                k.transpose(1, 2).contiguous().transpose(1, 2),
            )
        return F.apply_rotary(q, k, cos, sin, interleaved=interleaved)

    compare(
        impl,
        lambda q, k, cos, sin: ref.apply_rotary(q, k, cos, sin, interleaved=interleaved),
        [q, k, cos, sin],
        dtype=dtype,
        device=device,
        grad=(0, 1),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_cos_sin_gradients(device, interleaved):
    """cos and sin that require grad (learned or differentiated positions) get theirs, summed
    over heads and over the batch they broadcast along; a 2-dim (L, Dr) form works too."""
    q, k = (
        torch.randn(2, 4, 6, 16, dtype=torch.float64),
        torch.randn(2, 2, 6, 16, dtype=torch.float64),
    )
    for bc in (1, 2, None):
        cos, sin = _cos_sin(bc or 1, 6, 12, interleaved=interleaved)
        if bc is None:
            cos, sin = cos[0], sin[0]
        compare(
            lambda q, k, c, s: F.apply_rotary(q, k, c, s, interleaved=interleaved),
            lambda q, k, c, s: ref.apply_rotary(q, k, c, s, interleaved=interleaved),
            [q, k, cos, sin],
            dtype=torch.float32,
            device=device,
            grad=(0, 1, 2, 3),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_hugging_face(device, dtype):
    q = torch.randn(2, 8, 11, 64, dtype=dtype, device=device)
    k = torch.randn(2, 2, 11, 64, dtype=dtype, device=device)
    cos, sin = (t.to(device, dtype) for t in _cos_sin(2, 11, 64))
    got = F.apply_rotary(q, k, cos, sin)
    want = hf_apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_rotary_layouts(device):
    """Outputs keep the inputs' strides (the projection layout stays), a non-unit-stride D is
    copied first, and every layout gives the same values."""
    e = dict(device=device)
    base = torch.randn(2, 5, 4, 16, **e)  # (B, L, H, D)
    q = base.transpose(1, 2)
    k = torch.randn(2, 5, 2, 16, **e).transpose(1, 2)
    cos, sin = (t.to(device, torch.float32) for t in _cos_sin(1, 5, 16))
    qr, kr = F.apply_rotary(q, k, cos, sin)
    assert qr.stride() == q.stride() and kr.stride() == k.stride()
    want_q, want_k = F.apply_rotary(q.contiguous(), k.contiguous(), cos, sin)
    assert torch.equal(qr, want_q) and torch.equal(kr, want_k)
    qs = torch.randn(2, 4, 5, 32, **e)[..., ::2]  # D stride 2
    qsr, _ = F.apply_rotary(qs, k, cos, sin)
    assert qsr.is_contiguous()
    assert torch.equal(qsr, F.apply_rotary(qs.contiguous(), k, cos, sin)[0])
    # cos and sin in another dtype than q: converted (the rotation runs in float32 anyway)
    q16 = q.to(torch.bfloat16)
    k16 = k.to(torch.bfloat16)
    a = F.apply_rotary(q16, k16, cos, sin)[0]
    b = F.apply_rotary(q16, k16, cos.to(torch.bfloat16).float(), sin.to(torch.bfloat16).float())[0]
    assert a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    # empty
    z = torch.randn(0, 4, 5, 16, **e)
    assert F.apply_rotary(z, z[:, :2], cos, sin)[0].shape == z.shape


@pytest.mark.parametrize("device", DEVICES)
def test_apply_rotary_errors(device):
    e = dict(device=device)
    q, k = torch.randn(2, 4, 5, 16, **e), torch.randn(2, 2, 5, 16, **e)
    cos = sin = torch.randn(1, 5, 16, **e)
    with pytest.raises(ValueError, match=r"pyformer\.apply_rotary: argument 'q'"):
        F.apply_rotary(q[0], k, cos, sin)
    with pytest.raises(ValueError, match=r"pyformer\.apply_rotary: argument 'k'"):
        F.apply_rotary(q, torch.randn(2, 2, 6, 16, **e), cos, sin)
    with pytest.raises(ValueError, match=r"pyformer\.apply_rotary: argument 'cos'"):
        F.apply_rotary(q, k, torch.randn(1, 5, 15, **e), sin)  # odd Dr
    with pytest.raises(ValueError, match=r"pyformer\.apply_rotary: argument 'cos'"):
        F.apply_rotary(q, k, torch.randn(1, 5, 18, **e), sin)  # Dr > D
    with pytest.raises(ValueError, match=r"pyformer\.apply_rotary: argument 'cos'"):
        F.apply_rotary(q, k, torch.randn(3, 5, 16, **e), sin)  # batch neither 1 nor B
    with pytest.raises(ValueError, match=r"pyformer\.apply_rotary: argument 'sin'"):
        F.apply_rotary(q, k, cos, torch.randn(1, 5, 8, **e))
    with pytest.raises(TypeError, match=r"pyformer\.apply_rotary: argument 'k'"):
        F.apply_rotary(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match=r"pyformer\.apply_rotary: argument 'interleaved'"):
        F.apply_rotary(q, k, cos, sin, interleaved=1)


# ---- swiglu ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1000), (2, 3, 513), (4, 1, 64)])
def test_swiglu(device, dtype, shape):
    gate = torch.randn(*shape, dtype=torch.float64) * 3
    up = torch.randn(*shape, dtype=torch.float64)
    compare(F.swiglu, ref.swiglu, [gate, up], dtype=dtype, device=device, grad=(0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_edges(device):
    e = dict(device=device)
    # large |gate|: sigmoid saturates to 0 or 1 without NaN; -inf gives NaN as torch's silu
    g = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4, float("-inf"), float("inf")], **e)
    u = torch.ones_like(g)
    torch.testing.assert_close(F.swiglu(g, u), torch.nn.functional.silu(g) * u, equal_nan=True)
    # non-contiguous inputs and empty ones
    a, b = torch.randn(8, 6, **e).t(), torch.randn(6, 8, **e)
    torch.testing.assert_close(F.swiglu(a, b), torch.nn.functional.silu(a) * b)
    assert F.swiglu(torch.randn(0, 3, **e), torch.randn(0, 3, **e)).shape == (0, 3)
    # a single gradient wanted: the other input may be a constant
    gate = torch.randn(5, **e, requires_grad=True)
    (dg,) = torch.autograd.grad(F.swiglu(gate, torch.randn(5, **e)).sum(), gate)
    assert dg.shape == (5,)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_errors(device):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"pyformer\.swiglu: argument 'up'"):
        F.swiglu(x, torch.randn(4, 5, device=device))
    with pytest.raises(TypeError, match=r"pyformer\.swiglu: argument 'up'"):
        F.swiglu(x, x.double())
    with pytest.raises(TypeError, match=r"pyformer\.swiglu: argument 'gate'"):
        F.swiglu(x.long(), x.long())


# ---- all four: compile, double backward ----------------------------------------------------------
def _block_calls(device):
    x = torch.randn(3, 2, 16, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(3, 2, 16, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = (t.to(device) for t in _cos_sin(1, 3, 8))
    return {
        "rms_norm": (lambda x, w: F.rms_norm(x, 16, w), (x, w)),
        "add_rms_norm": (lambda x, r, w: F.add_rms_norm(x, r, 16, w), (x, r, w)),
        "apply_rotary": (lambda q, k: F.apply_rotary(q, k, cos, sin), (q, k)),
        "apply_rotary interleaved": (
            lambda q, k: F.apply_rotary(q, k, cos, sin, interleaved=True),
            (q, k),
        ),
        "swiglu": (lambda g, u: F.swiglu(g, u), (x, r)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name", ["rms_norm", "add_rms_norm", "apply_rotary", "apply_rotary interleaved", "swiglu"]
)
def test_gradcheck_and_gradgradcheck(device, name):
    fn, args = _block_calls(device)[name]
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize(
    "name", ["rms_norm", "add_rms_norm", "apply_rotary", "apply_rotary interleaved", "swiglu"]
)
def test_compile_fullgraph(name):
    """Each op traces under torch.compile(fullgraph=True), forward and backward, and agrees
    with the eager call."""
    torch._dynamo.reset()
    fn, args = _block_calls("cpu")[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    gg = torch.autograd.grad(sum(t.sum() for t in got), args)
    gw = torch.autograd.grad(sum(t.sum() for t in want), args)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_fake_kernels_match_real_layouts():
    """The fake kernels give the shapes, dtypes and strides of the real outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(2, 5, 4, 16).transpose(1, 2)
    k = torch.randn(2, 5, 2, 16).transpose(1, 2)
    cos, sin = _cos_sin(1, 5, 8)
    cos, sin = cos.float(), sin.float()
    x, w = torch.randn(3, 16), torch.randn(16)
    calls = [
        lambda: torch.ops.pyformer.apply_rotary(q, k, cos, sin, False),
        lambda: torch.ops.pyformer.apply_rotary(
            q[..., ::2], k[..., ::2], cos[..., :4], sin[..., :4], False
        ),
        lambda: torch.ops.pyformer.rms_norm(x, [16], w, None),
        lambda: torch.ops.pyformer.add_rms_norm(x, x, [16], w, 1e-6),
        lambda: torch.ops.pyformer.swiglu(x.t(), x.t()),
    ]
    real = [c() for c in calls]
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = [c() for c in calls]
    for r, f in zip(real, fake):
        r = r if isinstance(r, tuple) else (r,)
        f = f if isinstance(f, tuple) else (f,)
        for a, b in zip(r, f):
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def test_verify_catches_a_wrong_rotation():
    """The harness fails a rotation by the wrong sign (the tests above can fail)."""
    q, k = (
        torch.randn(1, 2, 4, 8, dtype=torch.float64),
        torch.randn(1, 1, 4, 8, dtype=torch.float64),
    )
    cos, sin = _cos_sin(1, 4, 8)
    v = verify(
        lambda q, k, c, s: F.apply_rotary(q, k, c, -s),
        lambda q, k, c, s: ref.apply_rotary(q, k, c, s),
        [q, k, cos, sin],
        dtype=torch.float32,
        device="cpu",
    )
    assert not v.ok


# ---- pyformer.nn.RMSNorm -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("affine", [True, False])
def test_nn_rms_norm_is_torchs(device, dtype, eps, affine, calls):
    import pyformer.nn as pnn

    t = torch.nn.RMSNorm((4, 32), eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
    if affine:
        with torch.no_grad():
            t.weight.normal_()
    p = pnn.RMSNorm((4, 32), eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
    p.load_state_dict(t.state_dict())
    assert list(p.state_dict()) == list(t.state_dict())
    x = torch.randn(3, 4, 32, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 4, 32, device=device, dtype=dtype)
    v = verify(
        lambda x: p(x),
        lambda x: t.to(torch.float64)(x),
        {"x": x},
        dtype=dtype,
        device=device,
        grad=("x",),
    )
    v.assert_ok()
    t.to(dtype)
    y_t = t(x + r)
    y_p = p(x, residual=r)
    torch.testing.assert_close(y_p, y_t)
    y2, s = p.add_norm(x, r)
    torch.testing.assert_close(s, x + r)
    if affine:
        (gw_p,) = torch.autograd.grad(p(x).sum(), p.weight)
        (gw_t,) = torch.autograd.grad(t(x).sum(), t.weight)
        torch.testing.assert_close(gw_p, gw_t)
    assert calls.get("rms_norm", 0) > 0 and calls.get("add_rms_norm", 0) > 0


def test_nn_rms_norm_falls_back_and_converts(calls):
    import pyformer
    import pyformer.nn as pnn

    p = pnn.RMSNorm(16)  # float32 weight
    x = torch.randn(2, 16, dtype=torch.bfloat16)  # torch takes the mix: so does the layer
    torch.testing.assert_close(p(x), torch.nn.functional.rms_norm(x, (16,), p.weight))
    assert calls.get("rms_norm", 0) == 0
    with pytest.raises(RuntimeError):
        p(torch.randn(2, 15))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.RMSNorm(16))
    w = model[1].weight
    replaced = pyformer.convert(model)
    assert [r.new for r in replaced] == [pnn.RMSNorm] and model[1].weight is w
    before = calls["rms_norm"]
    model(torch.randn(3, 16))
    assert calls["rms_norm"] == before + 1
    scripted = torch.jit.script(pnn.RMSNorm(8))
    torch.testing.assert_close(scripted(torch.ones(1, 8)), torch.ones(1, 8), rtol=1e-6, atol=1e-6)
