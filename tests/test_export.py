"""torch.export of models on pyformer's ops and layers: the graph keeps torch.ops.pyformer.* calls
and the exported program gives eager's answers.

Both export modes run: non-strict (the default, Python traced with fake tensors) and strict
(TorchDynamo). Inputs are float64 so that any difference is the algorithm's, not rounding's.
"""

from __future__ import annotations

import pytest
import torch

import pyformer.functional as PF
import pyformer.nn as pnn

E, H = 16, 4
STRICT = [pytest.param(False, id="nonstrict"), pytest.param(True, id="strict")]


def pyformer_ops(ep):
    """The names of the torch.ops.pyformer ops the exported graph calls."""
    return {
        n.target.name()
        for n in ep.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "pyformer"
    }


def run(module, args):
    with torch.no_grad():
        out = module(*args)
    return out if isinstance(out, tuple) else (out,)


def assert_same(got, want, exact=False):
    # not bitwise by default: under no_grad eager attention runs the flash algorithm, while the
    # exported graph keeps the need_probs it was traced with (the bmm algorithm); float64 inputs
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        elif exact:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


class Functional(torch.nn.Module):
    """Every op of pyformer.functional that a model calls, with each kind of mask."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(E, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(E, dtype=torch.float64))

    def forward(self, x, mask, lengths):
        y = PF.layer_norm(x, (E,), self.weight, self.bias)
        q = y.unflatten(-1, (H, E // H)).transpose(1, 2)  # (B, H, L, Dh), a strided view
        k, v = q * 0.5, q.flip(-1)
        p = PF.masked_softmax(q @ k.transpose(-1, -2), mask, scale=0.5, key_lengths=lengths)
        p_causal = PF.masked_softmax(q @ k.transpose(-1, -2), causal=True)
        a_mask, _ = PF.attention(q, k, v, mask)
        a_causal, _ = PF.attention(q, k, v, causal=True)
        a_lengths, _ = PF.attention(q, k, v, key_lengths=lengths)
        a_all, w_all = PF.attention(
            q, k, v, mask, causal=True, key_lengths=lengths, need_weights=True
        )
        return y, p, p_causal, a_mask, a_causal, a_lengths, a_all, w_all


def functional_inputs(b=3, l=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, E, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, 1, l, l, generator=gen) > 0.25
    lengths = torch.randint(0, l + 1, (b,), generator=gen)
    return x, mask, lengths


@pytest.mark.parametrize("strict", STRICT)
def test_export_functional_ops(strict):
    model = Functional()
    args = functional_inputs()
    ep = torch.export.export(model, args, strict=strict)
    assert pyformer_ops(ep) == {
        "pyformer::layer_norm",
        "pyformer::masked_softmax",
        "pyformer::attention",
    }
    assert_same(run(ep.module(), args), run(model, args))
    # the graph holds no value of the example masks or lengths: other values, the same answers
    other = functional_inputs(seed=1)
    assert_same(run(ep.module(), other), run(model, other))


@pytest.mark.parametrize("strict", STRICT)
def test_export_functional_dynamic_shapes(strict):
    model = Functional()
    b, l = torch.export.Dim("b", min=2, max=64), torch.export.Dim("l", min=2, max=512)
    shapes = {"x": {0: b, 1: l}, "mask": {0: b, 2: l, 3: l}, "lengths": {0: b}}
    ep = torch.export.export(model, functional_inputs(), dynamic_shapes=shapes, strict=strict)
    other = functional_inputs(b=5, l=12, seed=2)
    assert_same(run(ep.module(), other), run(model, other))


@pytest.mark.parametrize("strict", STRICT)
def test_export_layer_norm(strict):
    norm = pnn.LayerNorm(E, dtype=torch.float64).eval()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x, r = (torch.randn(3, 7, E, dtype=torch.float64) for _ in range(2))
    ep = torch.export.export(norm, (x,), strict=strict)
    assert pyformer_ops(ep) == {"pyformer::layer_norm"}
    assert_same(run(ep.module(), (x,)), run(norm, (x,)))
    ep = torch.export.export(norm, (x, r), strict=strict)  # Add & Norm
    assert pyformer_ops(ep) == {"pyformer::add_layer_norm"}
    assert_same(run(ep.module(), (x, r)), run(norm, (x, r)))


class Attention(torch.nn.Module):
    """pyformer.nn.MultiheadAttention called with the masks given by name."""

    def __init__(self, need_weights=True, is_causal=False):
        super().__init__()
        self.mha = pnn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
        self.need_weights, self.is_causal = need_weights, is_causal

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        return self.mha(
            x,
            x,
            x,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=self.need_weights,
            is_causal=self.is_causal,
        )


B, L = 3, 7
LENGTHS = torch.tensor([[7], [4], [1]])
RIGHT = torch.arange(L) >= LENGTHS  # torch's convention: True = padding
LEFT = RIGHT.flip(-1)
CAUSAL = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
MHA_CASES = {
    "plain": ({}, {}),
    "need_weights_false": ({"need_weights": False}, {}),
    "key_padding_right": ({}, {"key_padding_mask": RIGHT}),
    "key_padding_left": ({}, {"key_padding_mask": LEFT}),
    "key_padding_float": (
        {},
        {"key_padding_mask": torch.zeros(B, L, dtype=torch.float64).masked_fill(LEFT, -1e9)},
    ),
    "attn_mask_bool": ({}, {"attn_mask": CAUSAL}),
    "attn_mask_float": ({}, {"attn_mask": torch.randn(L, L, dtype=torch.float64)}),
    "is_causal": ({"is_causal": True}, {"attn_mask": CAUSAL}),
    "both_masks": ({}, {"key_padding_mask": LEFT, "attn_mask": CAUSAL}),
}


@pytest.mark.parametrize("strict", STRICT)
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_export_multihead_attention(strict, case):
    init, masks = MHA_CASES[case]
    torch.manual_seed(0)
    model = Attention(**init)
    x = torch.randn(B, L, E, dtype=torch.float64)
    ep = torch.export.export(model, (x,), masks, strict=strict)
    assert pyformer_ops(ep) == {"pyformer::attention"}
    got = ep.module()
    with torch.no_grad():
        out, want = got(x, **masks), model(x, **masks)
    # eager reads a right-padding key_padding_mask's values and passes key_lengths instead; the
    # exported graph cannot depend on one mask's values and passes the mask: the same keys are
    # masked, and the kernels' sums over fewer keys may round differently in the last bits (as
    # may the flash algorithm, which eager runs under no_grad without need_weights)
    assert_same(out, want)
    if "key_padding_mask" in masks:  # other padding through the same graph
        other = dict(masks, key_padding_mask=masks["key_padding_mask"].roll(1, 0))
        with torch.no_grad():
            assert_same(got(x, **other), model(x, **other), exact=False)


@pytest.mark.parametrize("strict", STRICT)
def test_export_layers_dynamic_shapes(strict):
    """The drop-in layers export with symbolic batch and sequence dims and keep pyformer's ops."""
    mha = pnn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
    norm = pnn.LayerNorm(E, dtype=torch.float64).eval()
    x = torch.randn(3, 7, E, dtype=torch.float64)
    b, l = torch.export.Dim("b", min=2, max=64), torch.export.Dim("l", min=2, max=512)
    dims = {0: b, 1: l}
    ep = torch.export.export(mha, (x, x, x), dynamic_shapes=(dims, dims, dims), strict=strict)
    assert "pyformer::attention" in pyformer_ops(ep)
    y = torch.randn(5, 11, E, dtype=torch.float64)
    assert_same(run(ep.module(), (y, y, y)), run(mha, (y, y, y)))
    ep = torch.export.export(norm, (x,), dynamic_shapes=(dims,), strict=strict)
    assert pyformer_ops(ep) == {"pyformer::layer_norm"}
    assert_same(run(ep.module(), (y,)), run(norm, (y,)))
