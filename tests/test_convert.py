"""pyformer.convert: PyTorch's Transformer models give the same outputs and gradients after
conversion, in float64 and float32 (docs/ops.md's bounds against a float64 run of the original)."""

from __future__ import annotations

import copy

import pytest
import torch

from pyformer.testing import rel_err as rel
import pyformer.nn as pnn
from pyformer.convert import Replacement, convert

from pyformer.testing import BOUNDS as BOUND

pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
]


def _grads(model, *inputs):
    out = []
    for p in model.parameters():
        out.append(p.grad.detach().clone())
    for x in inputs:
        out.append(x.grad.detach().clone())
    return out


def _check(a_out, b_out, a_grads, b_grads, dtype):
    assert rel(b_out, a_out) <= BOUND[dtype]
    assert len(a_grads) == len(b_grads)
    for i, (ga, gb) in enumerate(zip(a_grads, b_grads)):
        assert rel(gb, ga) <= BOUND[dtype] * (1 if dtype == torch.float64 else 10), i


def _padding(b, s, lengths):
    return torch.arange(s) >= torch.tensor(lengths)[:, None]  # True = padding (PyTorch's way)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_same_outputs_and_gradients(dtype, batch_first, calls):
    torch.manual_seed(0)
    d, b, s, t = 32, 3, 9, 6
    ref = torch.nn.Transformer(
        d_model=d,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=48,
        dropout=0.0,
        batch_first=batch_first,
        dtype=torch.float64,
    )
    model = copy.deepcopy(ref).to(dtype)
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    replaced = convert(model)
    assert all(isinstance(r, Replacement) for r in replaced)
    assert sum(r.new is pnn.MultiheadAttention for r in replaced) == 2 + 2 * 2
    assert sum(r.new is pnn.LayerNorm for r in replaced) == 2 * 2 + 2 * 3 + 2
    assert isinstance(model.encoder.layers[0].self_attn, pnn.MultiheadAttention)
    assert isinstance(model.decoder.norm, pnn.LayerNorm)
    assert [id(p) for p in model.parameters()] == params_before  # in place: the same tensors
    assert list(model.state_dict()) == keys_before
    assert all(p.dtype == dtype for p in model.parameters())

    src = torch.randn(b, s, d, dtype=torch.float64)
    tgt = torch.randn(b, t, d, dtype=torch.float64)
    if not batch_first:
        src, tgt = src.transpose(0, 1).contiguous(), tgt.transpose(0, 1).contiguous()
    pad = _padding(b, s, [9, 5, 2])
    tpad = _padding(b, t, [6, 6, 4])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
    kw = dict(
        src_key_padding_mask=pad,
        tgt_key_padding_mask=tpad,
        memory_key_padding_mask=pad,
        tgt_is_causal=True,
    )
    src.requires_grad_()
    tgt.requires_grad_()
    a = ref(src, tgt, tgt_mask=causal, **kw)
    w = torch.randn_like(a)  # (a plain sum would be ~0 after the final LayerNorm)
    (a * w).sum().backward()
    src2 = src.detach().to(dtype).requires_grad_()
    tgt2 = tgt.detach().to(dtype).requires_grad_()
    bo = model(src2, tgt2, tgt_mask=causal.to(dtype), **kw)
    (bo * w.to(dtype)).sum().backward()
    _check(a, bo, _grads(ref, src, tgt), _grads(model, src2, tgt2), dtype)
    assert calls["attention"] == 6 and calls["layer_norm"] == 12

    # eval mode without autograd: PyTorch's fused fast paths must not bypass the converted layers
    ref.eval()
    model.eval()
    calls.clear()
    with torch.no_grad():
        a = ref(src, tgt, tgt_mask=causal, **kw)
        bo = model(src2, tgt2, tgt_mask=causal.to(dtype), **kw)
    assert rel(bo, a) <= BOUND[dtype]
    assert calls["attention"] == 6 and calls["layer_norm"] == 12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_with_padding(dtype, norm_first, calls):
    torch.manual_seed(1)
    d, b, s = 48, 4, 13
    layer = torch.nn.TransformerEncoderLayer(
        d,
        6,
        dim_feedforward=64,
        dropout=0.0,
        batch_first=True,
        norm_first=norm_first,
        activation="gelu",
        dtype=torch.float64,
    )
    ref = torch.nn.TransformerEncoder(
        layer,
        num_layers=3,
        norm=torch.nn.LayerNorm(d, dtype=torch.float64),
        enable_nested_tensor=False,
    )
    with torch.no_grad():  # non-trivial norms
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = copy.deepcopy(ref).to(dtype)
    replaced = convert(model)
    assert len(replaced) == 3 * 3 + 1
    x = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    pad = _padding(b, s, [13, 10, 4, 1])
    pad[3, 0], pad[3, 5] = False, False  # not right padding: the mask path, not key_lengths
    for mask in (pad, _padding(b, s, [13, 10, 4, 1])):
        calls.clear()
        for p in list(ref.parameters()) + list(model.parameters()):
            p.grad = None
        x.grad = None
        a = ref(x, src_key_padding_mask=mask)
        w = torch.randn_like(a)
        (a * w).sum().backward()
        x2 = x.detach().to(dtype).requires_grad_()
        bo = model(x2, src_key_padding_mask=mask)
        (bo * w.to(dtype)).sum().backward()
        _check(a, bo, _grads(ref, x), _grads(model, x2), dtype)
        assert calls["attention"] == 3 and calls["layer_norm"] == 7


def test_encoder_nested_fast_path_disabled(calls):
    """An encoder built with nested tensors enabled runs the converted layers in eval mode."""
    torch.manual_seed(2)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    model = copy.deepcopy(ref)
    convert(model)
    assert model.use_nested_tensor is False
    x = torch.randn(3, 8, 32)
    pad = _padding(3, 8, [8, 6, 3])
    with torch.no_grad():
        a = ref(x, src_key_padding_mask=pad)  # PyTorch's nested-tensor path: zeros at padding
        bo = model(x, src_key_padding_mask=pad)
    keep = ~pad
    assert rel(bo[keep], a[keep]) <= 1e-5
    assert calls["attention"] == 2


def test_convert_generic_model_and_options():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(16)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.inner = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))

    class MyNorm(torch.nn.LayerNorm):  # a user subclass with its own forward: left alone
        def forward(self, x):
            return super().forward(x) * 2

    m = torch.nn.Sequential(Block(), MyNorm(16))
    r = convert(m, attention=False)
    assert [x.name for x in r] == ["0.ln", "0.inner.1"]
    assert type(m[0].attn) is torch.nn.MultiheadAttention and type(m[1]) is MyNorm
    r = convert(m)
    assert [x.name for x in r] == ["0.attn"]
    assert convert(m) == []  # idempotent
    ln = torch.nn.LayerNorm(8)
    assert convert(ln) == [Replacement("", torch.nn.LayerNorm, pnn.LayerNorm)]
    assert isinstance(ln, pnn.LayerNorm)
    r = convert(torch.nn.LayerNorm(4), backend="reference")
    with pytest.raises(ValueError, match="backend"):
        convert(torch.nn.LayerNorm(4), backend="nope")


def test_exported_as_pyformer_convert():
    import pyformer

    assert pyformer.convert is convert  # pyformer/__init__.py: from .convert import convert
    m = torch.nn.Sequential(torch.nn.LayerNorm(4))
    assert [r.name for r in pyformer.convert(m)] == ["0"]
