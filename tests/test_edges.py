"""Inputs at the edges of every op, each against the float64 reference: long rows, a zero scale,
arguments on other devices, every integer dtype of key_lengths, an additive mask wider than the
scores' dtype, bool masks holding bytes other than 0 and 1."""

from __future__ import annotations

import math

import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from conftest import DEVICES
from pyformer.testing import expect_close, verify

HALF = (torch.float16, torch.bfloat16)
ALL = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---- long rows: the row sums' error must not grow with the row length ---------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1 << 20, (1 << 22) + 3])
def test_layer_norm_long_rows(device, n):
    # torch.rand: every value positive, a mean far from 0 -- where a running float32 sum loses
    # the most (one 8-lane accumulator gave 7e-5 at N = 2^22)
    g = torch.Generator().manual_seed(n)
    x = torch.rand(2, n, generator=g, dtype=torch.float64) * 4 + 1
    w, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g)
    v = verify(
        F.layer_norm,
        ref.layer_norm,
        dict(x=x, normalized_shape=(n,), weight=w, bias=b),
        dtype=torch.float32,
        device=device,
        grad=["x", "weight", "bias"],
        generator=g,
    ).assert_ok(f"layer_norm N={n}")
    # well inside the bound, not at it
    assert v.fwd_err < 2e-6 and v.grad_err < 2e-6, (v.fwd_err, v.grad_err)


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_long_rows(device):
    n = 1 << 21
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, n, generator=g, dtype=torch.float64) + 2
    r = torch.rand(2, n, generator=g, dtype=torch.float64)
    verify(
        F.add_layer_norm,
        ref.add_layer_norm,
        dict(x=x, residual=r, normalized_shape=(n,)),
        dtype=torch.float32,
        device=device,
        grad=["x", "residual"],
        generator=g,
    ).assert_ok("add_layer_norm long row")


# ---- scale = 0: alpha 0 in the GEMMs --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_scaled_qk_zero_scale(device, dtype):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 17, 24, generator=g), torch.randn(3, 19, 24, generator=g)
    v = verify(
        F.scaled_qk,
        ref.scaled_qk,
        dict(q=q, k=k, scale=0.0),
        dtype=dtype,
        device=device,
        grad=["q", "k"],
        generator=g,
    ).assert_ok(f"scaled_qk scale=0 {dtype}")
    assert torch.equal(v.outputs["out0"], torch.zeros_like(v.outputs["out0"]))
    # poisoned outputs would show here: every gradient is exactly 0 too
    for name, d in v.gradients.items():
        assert torch.equal(d, torch.zeros_like(d)), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_attention_zero_scale(device, dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    res = verify(
        lambda q, k, v: F.attention(q, k, v, scale=0.0, causal=True, need_weights=True),
        lambda q, k, v: ref.attention(q, k, v, scale=0.0, causal=True, need_weights=True),
        dict(q=q, k=k, v=v),
        dtype=dtype,
        device=device,
        grad=["q", "k", "v"],
        generator=g,
    ).assert_ok(f"attention scale=0 {dtype}")
    assert torch.equal(res.gradients["dq"], torch.zeros_like(res.gradients["dq"]))


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_qk_zero_scale_propagates_inf_as_nan(device):
    q = torch.randn(1, 4, 8, device=device)
    k = torch.randn(1, 5, 8, device=device)
    q[0, 1, 3] = math.inf
    for dtype in ALL:
        got = F.scaled_qk(q.to(dtype), k.to(dtype), scale=0.0)
        want = ref.scaled_qk(q.double(), k.double(), scale=0.0)
        assert torch.equal(got.isnan(), want.isnan()), dtype
        assert got.isnan().any(), dtype  # 0 * inf is NaN, as in the reference


# ---- every tensor argument on the op's device (a meta tensor included) ------------------------


def _meta_calls():
    x = torch.randn(2, 3, 4)
    q = torch.randn(1, 2, 3, 4)
    meta = {
        "mask": torch.ones(3, 4, dtype=torch.bool, device="meta"),
        "key_lengths": torch.ones(2, dtype=torch.long, device="meta"),
        "t": torch.randn(4, device="meta"),
    }
    return {
        "masked_softmax mask": lambda: F.masked_softmax(x, meta["mask"]),
        "masked_softmax key_lengths": lambda: F.masked_softmax(x, key_lengths=meta["key_lengths"]),
        "layer_norm weight": lambda: F.layer_norm(x, (4,), meta["t"]),
        "layer_norm bias": lambda: F.layer_norm(x, (4,), None, meta["t"]),
        "add_layer_norm residual": lambda: F.add_layer_norm(x, x.to("meta"), (4,)),
        "scaled_qk k": lambda: F.scaled_qk(x, x.to("meta")),
        "scaled_qk q": lambda: F.scaled_qk(x.to("meta"), x),
        "attention k": lambda: F.attention(q, q.to("meta"), q),
        "attention v": lambda: F.attention(q, q, q.to("meta")),
        "attention mask": lambda: F.attention(q, q, q, meta["mask"][:3, :3]),
    }


@pytest.mark.parametrize("name", list(_meta_calls()))
def test_meta_tensor_beside_cpu_tensors_is_refused(name):
    with pytest.raises(ValueError, match=r"expected a tensor on (cpu|meta).*got (meta|cpu)"):
        _meta_calls()[name]()


def test_all_meta_calls_still_give_shapes():
    x = torch.randn(2, 3, 4, device="meta")
    assert F.masked_softmax(x, causal=True).shape == x.shape
    assert F.layer_norm(x, (4,), torch.ones(4, device="meta")).device.type == "meta"


# ---- key_lengths: every integer dtype ------------------------------------------------------------

INT_DTYPES = (
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kl_dtype", INT_DTYPES, ids=str)
def test_key_lengths_any_integer_dtype(device, kl_dtype):
    x = torch.randn(3, 2, 5, 7, device=device)
    lens = torch.tensor([0, 3, 7])
    want = F.masked_softmax(x, key_lengths=lens.to(device))
    got = F.masked_softmax(x, key_lengths=lens.to(kl_dtype).to(device))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    expect_close(got, ref.masked_softmax(x.double(), key_lengths=lens.to(device)))


@pytest.mark.parametrize("device", DEVICES)
def test_key_lengths_out_of_range_unsigned(device):
    x = torch.randn(2, 3, 4, device=device)
    huge = torch.tensor([2**63 + 5, 1], dtype=torch.uint64, device=device)  # negative as int64
    with pytest.raises(ValueError, match="key_lengths.*values in"):
        F.masked_softmax(x, key_lengths=huge)
    with pytest.raises(ValueError, match="key_lengths.*values in"):
        F.masked_softmax(x, key_lengths=torch.tensor([9, 1], dtype=torch.uint32, device=device))


# ---- an additive mask is added in the accumulation type --------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_mask_on_half_scores_is_not_rounded(device, dtype):
    # -7e4 is finite in float32 and -inf in float16: a row whose only finite entry is -7e4 keeps
    # that key (probability 1) in the reference
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, generator=g).to(dtype).to(device)
    mask = torch.full((4, 6), -math.inf)
    mask[:, 2] = -7e4
    mask[1, 4] = -1.5
    mask[3] = torch.randn(6, generator=g) * 1e5  # large finite values
    mask = mask.to(device)
    got = F.masked_softmax(x, mask)
    want = ref.masked_softmax(x.double(), mask.double())
    expect_close(got, want, dtype=dtype, what="masked_softmax float32 mask")
    assert torch.equal(got[:, 0, 2].float(), torch.ones(2, device=device))
    # the same through attention: (B, H, Lq, Lk) scores with the mask broadcast
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g).to(dtype).to(device) for _ in range(3))
    k6 = torch.randn(1, 2, 6, 8, generator=g).to(dtype).to(device)
    v6 = torch.randn(1, 2, 6, 8, generator=g).to(dtype).to(device)
    out, w = F.attention(q, k6, v6, mask, need_weights=True)
    wo, ww = ref.attention(q.double(), k6.double(), v6.double(), mask.double(), need_weights=True)
    expect_close(w, ww, dtype=dtype, what="attention probs")
    expect_close(out, wo, dtype=dtype, what="attention out")


# ---- bool masks whose bytes are not 0 or 1 --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("broadcast", [False, True])
def test_bool_mask_bytes_read_as_nonzero(device, dtype, broadcast):
    g = torch.Generator().manual_seed(4)
    lk = 37  # the 8-wide vector path and the scalar tail
    x = torch.randn(3, 5, lk, generator=g).to(dtype).to(device)
    raw = torch.randint(0, 4, (5, lk), generator=g, dtype=torch.uint8)
    raw[raw == 3] = 255
    raw[:, 0] = 2  # no row fully masked
    if broadcast:  # a stride-0 key dim: the scalar path
        raw = raw[:, :1].expand(5, lk)
    odd = raw.to(device).view(torch.bool)  # bytes 0, 1, 2, 255 seen as bool
    clean = raw.to(device) != 0
    got = F.masked_softmax(x, odd)
    torch.testing.assert_close(got, F.masked_softmax(x, clean), rtol=0, atol=0)
    expect_close(got, ref.masked_softmax(x.double(), clean), dtype=dtype)


# ---- NaN and inf: the rule of docs/ops.md ------------------------------------------------------

NAN_MASKS = {
    "bool": lambda dt: dict(mask=torch.tensor([True, True, True, False, True, False])),
    "additive": lambda dt: dict(mask=torch.tensor([0.0, 0.5, 0.0, -math.inf, 0.0, -math.inf])),
    "key_lengths": lambda dt: dict(key_lengths=torch.tensor([4, 4])),
    "bool+key_lengths": lambda dt: dict(
        mask=torch.tensor([True, True, True, False, True, True]), key_lengths=torch.tensor([5, 5])
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", list(NAN_MASKS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_row_masked_keys_stay_zero(device, dtype, kind, bad):
    """A row holding NaN (or +inf) at an unmasked key: NaN at every unmasked key (torch.softmax's
    answer), exactly 0 at every masked key, and a gradient of exactly 0 at the masked keys, in
    pyformer and in the reference alike; the other row is untouched."""
    kw = {k: v.to(device) for k, v in NAN_MASKS[kind](dtype).items()}
    x = torch.randn(2, 6, dtype=torch.float64, device=device)
    x[0, 1] = bad
    xs = x.to(dtype).requires_grad_()
    y = F.masked_softmax(xs, **kw)
    xr = xs.detach().double().requires_grad_()
    r = ref.masked_softmax(xr, **kw)
    assert torch.equal(y.isnan(), r.isnan()), (y, r)
    assert torch.equal(y.double()[r == 0], r[r == 0])  # the masked keys: exactly 0
    expect_close(y[1:], r[1:], dtype=dtype)
    g = torch.randn(2, 6, dtype=torch.float64, device=device).to(dtype)
    (gx,) = torch.autograd.grad(y, xs, g)
    (gr,) = torch.autograd.grad(r, xr, g.double())
    assert torch.equal(gx.isnan(), gr.isnan()), (gx, gr)
    assert torch.equal(gx.double()[gr == 0], gr[gr == 0])


@pytest.mark.parametrize("device", DEVICES)
def test_dropped_nan_probabilities_stay_nan_in_every_dtype(device):
    """out = (probs * keep / (1 - p)) @ v: a NaN probability that dropout drops is still NaN
    (NaN * 0), on the fused float32 path and the composed float16 path alike."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    q[0, 1, 2, 3] = math.nan  # one query row of scores all NaN
    nans = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        torch.manual_seed(11)  # the same keep mask for every dtype (drawn in float32)
        out, _ = F.attention(*(t.to(dtype).to(device) for t in (q, k, v)), dropout_p=0.5)
        nans[dtype] = out.isnan().cpu()
    for dtype, n in nans.items():
        assert torch.equal(n, nans[torch.float32]), dtype
    assert nans[torch.float32][0, 1, 2].all() and not nans[torch.float32][0, 0].any()
    # one unmasked key: whether dropout keeps or drops it (16 draws), the NaN row stays NaN
    lens = torch.tensor([1], device=device)
    for seed in range(16):
        torch.manual_seed(seed)
        out, _ = F.attention(*(t.to(device) for t in (q, k, v)), key_lengths=lens, dropout_p=0.5)
        assert out[0, 1, 2].isnan().all(), seed
        assert not out[0, 1, :2].isnan().any(), seed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_value_row_at_masked_key_follows_the_reference(device, dtype, bad):
    """out = probs @ v multiplies a masked key's probability 0 by its value row, so a NaN or inf
    there gives NaN in that column (0 * inf), in the reference and in every path: padding as
    key_lengths (which the fused CPU kernel skips) or as a bool mask, with or without probs, in
    every dtype; the finite columns are untouched."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    v[0, 1, 4, 2] = bad  # batch 0 has 3 valid keys: key 4 is padding
    lens = torch.tensor([3, 5])
    pad = torch.arange(5) < lens[:, None, None, None]  # (2, 1, 1, 5)
    want, _ = ref.attention(q, k, v, key_lengths=lens)
    assert want[0, 1, :, 2].isnan().all() and want.isnan().sum() == 5
    for kw in (dict(key_lengths=lens), dict(mask=pad)):
        for need_weights in (False, True):
            args = [t.to(dtype).to(device) for t in (q, k, v)]
            kwd = {key: t.to(device) for key, t in kw.items()}
            got, _ = F.attention(*args, **kwd, need_weights=need_weights)
            assert torch.equal(got.isnan().cpu(), want.isnan()), (kw.keys(), need_weights)
            fin = ~want.isnan()
            expect_close(got.cpu()[fin], want[fin], dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_add_layer_norm_normalizes_the_rounded_sum(device, dtype):
    """For float16/bfloat16, y is the layer norm of the s returned (rounded to the dtype), as
    torch's F.layer_norm(x + residual): on short rows with a large mean the rounding of s moves y
    by far more than the dtype's bound, so normalizing the unrounded sum would disagree with s."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(64, 8, generator=g) + 300).to(dtype).to(device)
    r = torch.randn(64, 8, generator=g).to(dtype).to(device)
    y, s = F.add_layer_norm(x, r, (8,))
    assert torch.equal(s, x + r)
    expect_close(y.cpu(), ref.layer_norm(s.cpu().double(), (8,)), dtype=dtype)
    unrounded = ref.layer_norm(x.cpu().double() + r.cpu().double(), (8,))
    assert (y.cpu().double() - unrounded).abs().max() > 0.1  # the rounding matters here


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("where", ["k", "v"])
def test_nonfinite_row_at_masked_key_gradients_follow_the_reference(device, dtype, where):
    """The backward of the same rule: dq = dS @ k and dP = dout @ v^T multiply a masked key's
    zero by its key or value row, so NaN patterns of out, dq, dk and dv are the reference's,
    whether the padding came as key_lengths or as a bool mask."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    (k if where == "k" else v)[0, 1, 4, 2] = math.nan
    lens = torch.tensor([3, 5])
    pad = torch.arange(5) < lens[:, None, None, None]
    cot = torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64)
    r_in = [t.clone().requires_grad_() for t in (q, k, v)]
    want, _ = ref.attention(*r_in, key_lengths=lens)
    want_grads = torch.autograd.grad(want, r_in, cot)
    for kw in (dict(key_lengths=lens), dict(mask=pad)):
        args = [t.to(dtype).to(device).requires_grad_() for t in (q, k, v)]
        got, _ = F.attention(*args, **{key: t.to(device) for key, t in kw.items()})
        grads = torch.autograd.grad(got, args, cot.to(dtype).to(device))
        assert torch.equal(got.isnan().cpu(), want.isnan()), kw.keys()
        for name, a, b in zip("qkv", grads, want_grads):
            assert torch.equal(a.isnan().cpu(), b.isnan()), (kw.keys(), "d" + name)
