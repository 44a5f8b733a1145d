"""The attention dropout draw that docs/ops.md states: a Philox4x32-10 key drawn per call from
torch's default CPU generator, element n of the (B, H, Lq, Lk) probabilities kept when word n % 4
of Philox(n // 4) is at least floor(p * 2^32). The same elements for every dtype, mask, thread
count and both algorithms; pyformer.reference.dropout_keep is the independent definition, itself
checked against Philox's published known-answer vectors."""

from __future__ import annotations

import pytest
import torch

import pyformer.functional as PF
import pyformer.reference as ref
from conftest import next_dropout_seed

B, H, L, P = 2, 3, 40, 0.3


def test_reference_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (kat_vectors: counter, key -> output)."""
    s = ref._signed64
    cases = [
        ((0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((2**64 - 1, 2**64 - 1), 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x85A308D3243F6A88, 0x0370734413198A2E),
            0x299F31D0A4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for (lo, hi), key, want in cases:
        got = ref.philox4x32_10(
            torch.tensor([s(lo)]), torch.tensor([s(key)]), counter_hi=torch.tensor([s(hi)])
        )
        assert [int(w) for w in got.reshape(-1)] == list(want)


def bmm_keep(dtype, **masks):
    """The keep mask the bmm algorithm returns for one seeded call, and the generator after it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, 8, generator=gen, dtype=dtype) for _ in range(3))
    torch.manual_seed(5)
    _, _, keep = torch.ops.pyformer.attention(
        q, k, v, masks.get("mask"), None, int(masks.get("causal", 0)), masks.get("kl"), P
    )
    return keep, torch.rand(4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_attention_dropout_draw(dtype):
    torch.manual_seed(5)
    seed = next_dropout_seed()
    want = ref.dropout_keep(seed, (B, H, L, L), P)
    keep, after = bmm_keep(dtype)
    assert torch.equal(keep, want)
    # masks leave the draw as it was (masked positions are drawn too); one 64-bit draw per call
    mask = torch.rand(B, 1, L, L) > 0.3
    keep2, after2 = bmm_keep(dtype, mask=mask, causal=True, kl=torch.tensor([40, 9]))
    assert torch.equal(keep2, want) and torch.equal(after2, after)
    assert abs(want.float().mean().item() - (1 - P)) < 0.03  # 9600 draws: 5 sigma ~ 0.023
    # torch's dropout: the same distribution, other elements
    torch.manual_seed(5)
    assert not torch.equal(torch.nn.functional.dropout(torch.ones(B, H, L, L), P) != 0, want)


def test_dropout_keep_edges_and_threads():
    """p = 1 keeps nothing, a tiny p keeps almost all; the mask does not depend on the thread
    count; the key changes from call to call and follows torch.manual_seed."""
    x = torch.randn(1, 2, 300, 8)
    for p, lo, hi in ((1.0, 0.0, 0.0), (1e-9, 1.0, 1.0), (0.5, 0.45, 0.55)):
        _, _, keep = torch.ops.pyformer.attention(x, x, x, None, None, 0, None, p)
        assert lo <= keep.float().mean().item() <= hi
    threads = torch.get_num_threads()
    keeps = []
    for n in (1, 2):
        torch.set_num_threads(n)
        torch.manual_seed(1)
        keeps.append(torch.ops.pyformer.attention(x, x, x, None, None, 0, None, 0.4)[2])
    torch.set_num_threads(threads)
    assert torch.equal(keeps[0], keeps[1])
    torch.manual_seed(1)
    a = torch.ops.pyformer.attention(x, x, x, None, None, 0, None, 0.4)[2]
    b = torch.ops.pyformer.attention(x, x, x, None, None, 0, None, 0.4)[2]
    assert torch.equal(a, keeps[0]) and not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "key_lengths", "bottom_right"])
def test_both_algorithms_drop_the_same_elements(dtype, kind):
    """With v = I, out = probs * keep / (1 - p): the flash algorithm's dropped elements read off
    its output equal the bmm algorithm's keep mask for the same seed, in training and inference;
    and the flash algorithm's output matches the bmm algorithm's."""
    Lq, Lk = (24, 40) if kind == "bottom_right" else (40, 40)
    kw = {
        "none": {},
        "causal": dict(causal=True),
        "key_lengths": dict(key_lengths=torch.tensor([40, 13])),
        "bottom_right": dict(causal="bottom_right"),
    }[kind]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, Lq, 8, generator=gen, dtype=dtype)
    k = torch.randn(B, H, Lk, 8, generator=gen, dtype=dtype)
    v = torch.eye(Lk, dtype=dtype).expand(B, H, Lk, Lk)
    torch.manual_seed(9)
    out_b, probs = PF.attention(q, k, v, dropout_p=P, need_weights=True, **kw)
    keep = (out_b != 0) | (probs == 0)  # a masked position reads as kept
    torch.manual_seed(9)
    seed = next_dropout_seed()
    for grad in (False, True):
        qg = q.clone().requires_grad_(grad)
        torch.manual_seed(9)
        out_f, _ = PF.attention(qg, k, v, dropout_p=P, algorithm="flash", **kw)
        assert torch.equal((out_f != 0) | (probs == 0), keep)
        torch.testing.assert_close(
            out_f, out_b, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5
        )
    assert torch.equal(keep, ref.dropout_keep(seed, (B, H, Lq, Lk), P) | (probs == 0))
