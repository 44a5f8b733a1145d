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
