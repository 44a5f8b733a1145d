"""pyformer.models: the textbook Transformer and its modules.

Every comparison is against a float64 computation of the same thing (the pure-PyTorch reference
backend or PyTorch's own op) on fresh random inputs, by relative error ||out - ref|| / ||ref||
with docs/ops.md's bounds; gradients likewise. Tests also check that the fast ops really ran.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pyformer.models as pm
import pyformer.nn as pnn
from pyformer.testing import BOUNDS as BOUND
from pyformer.testing import rel_err as rel


def _tiny(backend="pyformer", dtype=torch.float64, drop=0.0, seed=0):
    torch.manual_seed(seed)
    return pm.Transformer(
        src_pad_idx=0,
        trg_pad_idx=0,
        enc_voc_size=11,
        dec_voc_size=13,
        d_model=32,
        n_head=4,
        max_len=20,
        ffn_hidden=48,
        n_layers=2,
        drop_prob=drop,
        dtype=dtype,
        backend=backend,
    )


def _batch(gen, b=3, s=9, t=7):
    src = torch.randint(1, 11, (b, s), generator=gen)
    trg = torch.randint(1, 13, (b, t), generator=gen)
    src[1, 6:] = 0
    src[2, 3:] = 0
    trg[1, 5:] = 0
    return src, trg


def test_transformer_structure_and_shapes():
    m = _tiny()
    names = dict(m.named_modules())
    for n in (
        "encoder.layers.0.attention.w_q",
        "encoder.layers.0.attention.w_k",
        "encoder.layers.0.attention.w_v",
        "encoder.layers.0.attention.w_concat",
        "decoder.layers.1.self_attention",
        "decoder.layers.1.enc_dec_attention",
        "decoder.layers.0.norm3",
        "encoder.emb.pos_emb",
        "decoder.linear",
    ):
        assert n in names, n
    assert isinstance(names["encoder.layers.0.norm1"], pnn.LayerNorm)
    assert "encoder.emb.pos_emb.encoding" not in m.state_dict()  # fixed, not persistent
    src, trg = _batch(torch.Generator().manual_seed(0))
    out = m(src, trg)
    assert out.shape == (3, 7, 13) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="max_len"):
        m(torch.ones(1, 25, dtype=torch.long), trg[:1])


def test_positional_encoding_values():
    pe = pm.PositionalEncoding(6, 10, dtype=torch.float64)
    enc = pe(torch.zeros(1, 4, dtype=torch.long))
    assert enc.shape == (4, 6)
    pos, i = 3, 1
    assert (
        abs(
            float(enc[pos, 2 * i])
            - torch.sin(torch.tensor(pos / 10000 ** (2 * i / 6), dtype=torch.float64)).item()
        )
        < 1e-15
    )
    assert (
        abs(
            float(enc[pos, 2 * i + 1])
            - torch.cos(torch.tensor(pos / 10000 ** (2 * i / 6), dtype=torch.float64)).item()
        )
        < 1e-15
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transformer_backends_agree(dtype, calls):
    """One code path, two backends: pyformer's kernels vs the float64 pure-PyTorch reference."""
    gen = torch.Generator().manual_seed(1)
    ref = _tiny("reference", torch.float64)
    m = _tiny("pyformer", dtype)
    m.load_state_dict(ref.state_dict())
    src, trg = _batch(gen)
    a, b = ref(src, trg), m(src, trg)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g.to(dtype))
    bound = BOUND[dtype] if dtype == torch.float64 else 2e-5  # a deep composition in float32
    assert rel(b, a) <= bound
    gbound = bound if dtype == torch.float64 else 1e-4
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if name.endswith("w_k.bias"):  # its exact gradient is 0 (softmax ignores a key bias)
            assert p.grad.abs().max() <= 1e-6 * g.abs().max(), name
            continue
        assert rel(p.grad, q.grad) <= gbound, name
    # 2 layers: 2 enc self + 2 dec self + 2 cross attentions, 4 + 6 Add & Norms
    assert calls.get("attention") == 6 and calls.get("add_layer_norm") == 10


def test_transformer_masks_padding_and_causality():
    m = _tiny()
    m.eval()
    gen = torch.Generator().manual_seed(2)
    src, trg = _batch(gen)
    out = m(src, trg)
    # no query ever sees a padded key: give the padding token a nonzero embedding
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2.encoder.emb.tok_emb.weight[0].normal_()  # the pad embedding is no longer zero
    assert rel(m2(src, trg)[0], out[0]) == 0.0  # batch 0 has no padding
    non_pad = trg != 0
    diff = (m2(src, trg) - out).abs().amax(-1)
    assert (diff[non_pad] < 1e-12).all()
    # causality: changing future target tokens leaves earlier positions unchanged
    trg3 = trg.clone()
    trg3[:, 4:] = torch.randint(1, 13, trg3[:, 4:].shape, generator=gen)
    out3 = m(src, trg3)
    torch.testing.assert_close(out3[:, :4], out[:, :4], rtol=0, atol=1e-13)
    assert not torch.allclose(out3[0, 4:], out[0, 4:])


def test_transformer_attention_maps():
    m = _tiny()
    src, trg = _batch(torch.Generator().manual_seed(3))
    logits, maps = m(src, trg, return_attention=True)
    torch.testing.assert_close(logits, m(src, trg))
    assert set(maps) == {
        "encoder.layers.0.attention",
        "encoder.layers.1.attention",
        "decoder.layers.0.self_attention",
        "decoder.layers.0.enc_dec_attention",
        "decoder.layers.1.self_attention",
        "decoder.layers.1.enc_dec_attention",
    }
    cross = maps["decoder.layers.1.enc_dec_attention"]
    assert cross.shape == (3, 4, 7, 9)
    torch.testing.assert_close(cross.sum(-1), torch.ones(3, 4, 7, dtype=torch.float64))
    assert (cross[2, :, :, 3:] == 0).all()  # padded source keys get no weight
    dec_self = maps["decoder.layers.0.self_attention"]
    assert (dec_self[0].triu(1) == 0).all()  # causal
    for mod in m.modules():
        if isinstance(mod, pm.MultiHeadAttention):
            assert not mod.store_attention and mod.last_attention is None
    mha = m.encoder.layers[0].attention
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out, w = mha(x, x, x, need_weights=True)
    assert out.shape == (2, 5, 32) and w.shape == (2, 4, 5, 5)


def test_set_backend_and_dropout_reproducible():
    m = _tiny(drop=0.2)
    r = copy.deepcopy(m)
    pnn.set_backend(r, "reference")
    assert {mod.backend for mod in r.modules() if hasattr(mod, "_pyformer_backend")} == {
        "reference"
    }
    assert {mod.backend for mod in m.modules() if hasattr(mod, "_pyformer_backend")} == {"pyformer"}
    src, trg = _batch(torch.Generator().manual_seed(4))
    torch.manual_seed(7)
    a = m(src, trg)
    torch.manual_seed(7)
    b = r(src, trg)
    assert rel(a, b) <= 1e-12  # same dropout masks: the RNG stream does not depend on the backend
    with pytest.raises(ValueError, match="backend"):
        pnn.set_backend(m, "cuda")


def test_scaled_dot_product_attention_module():
    sdpa = pm.ScaledDotProductAttention()
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) < 0.7
    mask[..., 0] = True
    out, w = sdpa(q, k, v, mask, need_weights=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel(out, ref) <= 1e-12 and w.shape == (2, 3, 5, 5)


def test_transformer_compiles_fullgraph():
    """The modules trace into one graph: the ops' fake kernels, masks and backend lookup alike."""
    m = pm.Transformer(
        0, 0, 11, 11, d_model=32, n_head=4, max_len=16, ffn_hidden=48, n_layers=1, drop_prob=0.0
    )
    src = torch.randint(1, 11, (2, 7))
    src[1, 4:] = 0
    trg = torch.randint(1, 11, (2, 5))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(src, trg), m(src, trg), rtol=1e-6, atol=1e-6)
