"""Malformed input: every case raises a Python exception whose message names the function and
the argument (and says what was expected). Never a crash, a hang or a silently wrong answer."""

from __future__ import annotations

import pytest
import torch

import pyformer.functional as F

from conftest import NEEDS_CUDA

f32 = lambda *s: torch.randn(*s)
q4, k4, v4 = f32(2, 3, 4, 8), f32(2, 3, 5, 8), f32(2, 3, 5, 6)

CASES = [
    # (id, call, exception type, op name, argument name)
    (
        "qk_int",
        lambda: F.scaled_qk(
            torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64)
        ),
        TypeError,
        "scaled_qk",
        "q",
    ),
    ("qk_rank", lambda: F.scaled_qk(f32(4), f32(4)), ValueError, "scaled_qk", "q"),
    ("qk_depth", lambda: F.scaled_qk(f32(2, 3, 8), f32(2, 5, 7)), ValueError, "scaled_qk", "k"),
    ("qk_lead", lambda: F.scaled_qk(f32(2, 3, 8), f32(3, 5, 8)), ValueError, "scaled_qk", "k"),
    (
        "qk_dtype",
        lambda: F.scaled_qk(f32(2, 3, 8), f32(2, 5, 8).double()),
        TypeError,
        "scaled_qk",
        "k",
    ),
    (
        "qk_scale_nan",
        lambda: F.scaled_qk(f32(2, 3, 8), f32(2, 5, 8), scale=float("nan")),
        ValueError,
        "scaled_qk",
        "scale",
    ),
    (
        "sm_int_scores",
        lambda: F.masked_softmax(torch.ones(2, 3, dtype=torch.int32)),
        TypeError,
        "masked_softmax",
        "scores",
    ),
    (
        "sm_mask_shape",
        lambda: F.masked_softmax(f32(2, 3, 4, 5), torch.ones(3, 3, 1, 5, dtype=torch.bool)),
        ValueError,
        "masked_softmax",
        "mask",
    ),
    (
        "sm_mask_rank",
        lambda: F.masked_softmax(f32(4, 5), torch.ones(1, 1, 4, 5, dtype=torch.bool)),
        ValueError,
        "masked_softmax",
        "mask",
    ),
    (
        "sm_mask_int",
        lambda: F.masked_softmax(f32(4, 5), torch.ones(4, 5, dtype=torch.int64)),
        TypeError,
        "masked_softmax",
        "mask",
    ),
    (
        "sm_kl_neg",
        lambda: F.masked_softmax(f32(2, 3, 4, 5), key_lengths=torch.tensor([3, -1])),
        ValueError,
        "masked_softmax",
        "key_lengths",
    ),
    (
        "sm_kl_big",
        lambda: F.masked_softmax(f32(2, 3, 4, 5), key_lengths=torch.tensor([3, 6])),
        ValueError,
        "masked_softmax",
        "key_lengths",
    ),
    (
        "sm_kl_shape",
        lambda: F.masked_softmax(f32(2, 3, 4, 5), key_lengths=torch.tensor([3, 1, 2])),
        ValueError,
        "masked_softmax",
        "key_lengths",
    ),
    (
        "sm_kl_float",
        lambda: F.masked_softmax(f32(2, 3, 4, 5), key_lengths=torch.tensor([3.0, 1.0])),
        TypeError,
        "masked_softmax",
        "key_lengths",
    ),
    (
        "sm_kl_2d",
        lambda: F.masked_softmax(f32(2, 3, 4, 5), key_lengths=torch.tensor([[3, 1]])),
        ValueError,
        "masked_softmax",
        "key_lengths",
    ),
    (
        "sm_causal_1d",
        lambda: F.masked_softmax(f32(5), causal=True),
        ValueError,
        "masked_softmax",
        "causal",
    ),
    (
        "sm_scale_inf",
        lambda: F.masked_softmax(f32(2, 5), scale=float("inf")),
        ValueError,
        "masked_softmax",
        "scale",
    ),
    ("ln_shape", lambda: F.layer_norm(f32(4, 6), (5,)), ValueError, "layer_norm", "x"),
    (
        "ln_weight",
        lambda: F.layer_norm(f32(4, 6), (6,), f32(5)),
        ValueError,
        "layer_norm",
        "weight",
    ),
    (
        "ln_bias",
        lambda: F.layer_norm(f32(4, 6), (6,), f32(6), f32(6, 1)),
        ValueError,
        "layer_norm",
        "bias",
    ),
    (
        "ln_weight_dtype",
        lambda: F.layer_norm(f32(4, 6), (6,), f32(6).double()),
        TypeError,
        "layer_norm",
        "weight",
    ),
    ("ln_eps", lambda: F.layer_norm(f32(4, 6), (6,), eps=-1.0), ValueError, "layer_norm", "eps"),
    (
        "ln_neg_shape",
        lambda: F.layer_norm(f32(4, 6), (-6,)),
        ValueError,
        "layer_norm",
        "normalized_shape",
    ),
    (
        "ln_int",
        lambda: F.layer_norm(torch.ones(4, 6, dtype=torch.int64), (6,)),
        TypeError,
        "layer_norm",
        "x",
    ),
    (
        "aln_residual",
        lambda: F.add_layer_norm(f32(4, 6), f32(4, 5), (6,)),
        ValueError,
        "add_layer_norm",
        "residual",
    ),
    (
        "aln_residual_dtype",
        lambda: F.add_layer_norm(f32(4, 6), f32(4, 6).double(), (6,)),
        TypeError,
        "add_layer_norm",
        "residual",
    ),
    (
        "attn_rank",
        lambda: F.attention(f32(3, 4, 8), f32(3, 5, 8), f32(3, 5, 8)),
        ValueError,
        "attention",
        "q",
    ),
    ("attn_k", lambda: F.attention(q4, f32(2, 3, 5, 7), v4), ValueError, "attention", "k"),
    ("attn_v", lambda: F.attention(q4, k4, f32(2, 3, 6, 6)), ValueError, "attention", "v"),
    ("attn_heads", lambda: F.attention(q4, f32(2, 4, 5, 8), v4), ValueError, "attention", "k"),
    ("attn_dtype", lambda: F.attention(q4, k4, v4.double()), TypeError, "attention", "v"),
    (
        "attn_dropout",
        lambda: F.attention(q4, k4, v4, dropout_p=1.5),
        ValueError,
        "attention",
        "dropout_p",
    ),
    (
        "flash_bwd_rng",
        lambda: torch.ops.pyformer.flash_attention_backward(
            f32(2, 3, 4, 6),
            q4,
            k4,
            v4,
            f32(2, 3, 4, 6),
            f32(2, 3, 4),
            None,
            None,
            0,
            None,
            dropout_p=0.2,
        ),
        ValueError,
        "flash_attention_backward",
        "rng",
    ),
    (
        "attn_mask",
        lambda: F.attention(q4, k4, v4, torch.ones(2, 3, 4, 4, dtype=torch.bool)),
        ValueError,
        "attention",
        "mask",
    ),
    (
        "attn_kl",
        lambda: F.attention(q4, k4, v4, key_lengths=torch.tensor([5])),
        ValueError,
        "attention",
        "key_lengths",
    ),
    (
        "attn_kl_big",
        lambda: F.attention(q4, k4, v4, key_lengths=torch.tensor([5, 9])),
        ValueError,
        "attention",
        "key_lengths",
    ),
    (
        "attn_scale",
        lambda: F.attention(q4, k4, v4, scale=float("nan")),
        ValueError,
        "attention",
        "scale",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_raises_named_error(case):
    _, call, exc, op, arg = case
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert f"pyformer.{op}" in msg, msg
    assert f"'{arg}'" in msg, msg
    assert "expected" in msg and "got" in msg, msg


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="'k'"):
        F.scaled_qk(f32(2, 3, 8).cuda(), f32(2, 5, 8))
    with pytest.raises(ValueError, match="'mask'"):
        F.masked_softmax(f32(2, 5).cuda(), torch.ones(2, 5, dtype=torch.bool))


def test_differentiating_a_backward_op_called_directly_is_refused_loudly():
    # through the ops' autograd a gradient of a gradient works (test_registration.py); the
    # backward ops themselves, called directly, have no derivative and say so
    y = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1).requires_grad_()
    g = torch.randn(3, 5, dtype=torch.float64)
    dx = torch.ops.pyformer.masked_softmax_backward(g, y, 1.0)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(dx.sum(), y)
