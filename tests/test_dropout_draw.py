"""The attention dropout draw that docs/ops.md states: ``torch.rand(B, H, Lq, Lk) < 1 - p`` in
float32 on the default generator, the same elements for every dtype and mask, and not the elements
torch's own dropout draws under the same seed."""

from __future__ import annotations

import pytest
import torch

import pyformer.functional as PF

B, H, L, P = 2, 3, 16, 0.3


def keep_of(dtype, **masks):
    """The keep mask of one seeded call: v = I makes out = probs * keep / (1 - p), and every
    probability of an unmasked key is > 0."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, L, 8, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.eye(L, dtype=dtype).expand(B, H, L, L)
    torch.manual_seed(5)
    out, probs = PF.attention(q, k, v, dropout_p=P, need_weights=True, **masks)
    after = torch.rand(4)  # where the draw left the generator
    keep = out != 0
    torch.testing.assert_close(out, probs * keep / (1 - P), rtol=1e-6, atol=0)
    return keep, probs > 0, after


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_dropout_draw(dtype):
    torch.manual_seed(5)
    want = torch.rand(B, H, L, L) < 1 - P
    want_after = torch.rand(4)
    keep, _, after = keep_of(dtype)
    assert torch.equal(keep, want) and torch.equal(after, want_after)
    # masked positions are drawn too: a mask, causal or key_lengths leaves the other elements'
    # draw as it was
    mask = torch.rand(B, 1, L, L) > 0.3
    keep, allowed, after = keep_of(dtype, mask=mask, causal=True, key_lengths=torch.tensor([16, 9]))
    assert torch.equal(keep, want & allowed) and torch.equal(after, want_after)
    # torch's dropout: the same distribution, other elements, another generator state
    torch.manual_seed(5)
    torch_keep = torch.nn.functional.dropout(torch.ones(B, H, L, L), P) != 0
    assert not torch.equal(torch_keep, want)
    assert not torch.equal(torch.rand(4), want_after)
