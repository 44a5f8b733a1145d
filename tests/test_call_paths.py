"""The two ways a pyformer.functional call reaches its op, and what the host entry does once.

A call takes pyformer._C's direct entry (per-call cost close to a PyTorch op's) unless
torch.compile traces or an argument or mode overrides __torch_function__, where it takes
torch.ops.pyformer.<op>. Both are the same dispatcher call: the results and gradients must be
bitwise equal, and both must reject malformed arguments alike.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pyformer.functional as F
import pyformer.reference as ref
from conftest import compare

P = torch.ops.pyformer


class Recorder(TorchFunctionMode):
    """A __torch_function__ mode that records the pyformer ops it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if "pyformer" in str(getattr(func, "namespace", "")) or "pyformer" in str(func):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _calls():
    """(name, thunk building fresh leaves -> (outputs, inputs)) for every public op."""

    def attention():
        q, k, v = (
            torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)
        )
        m = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        out, w = F.attention(
            q, k, v, m, causal=True, key_lengths=torch.tensor([5, 3]), need_weights=True
        )
        return (out, w), (q, k, v, m)

    def masked_softmax():
        s = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
        m = torch.randn(2, 1, 1, 6, dtype=torch.float64, requires_grad=True)
        return (F.masked_softmax(s, m, scale=0.5, causal=True),), (s, m)

    def layer_norm():
        x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
        w, b = (torch.randn(16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        return (F.layer_norm(x, 16, w, b),), (x, w, b)

    def add_layer_norm():
        x, r = (torch.randn(3, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        w = torch.randn(16, dtype=torch.float64, requires_grad=True)
        return F.add_layer_norm(x, r, [16], w), (x, r, w)

    def scaled_qk():
        q, k = (torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        return (F.scaled_qk(q, k, 0.3),), (q, k)

    def rms_norm():
        x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
        w = torch.randn(16, dtype=torch.float64, requires_grad=True)
        return (F.rms_norm(x, 16, w),), (x, w)

    def add_rms_norm():
        x, r = (torch.randn(3, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        w = torch.randn(16, dtype=torch.float64, requires_grad=True)
        return F.add_rms_norm(x, r, [16], w, 1e-6), (x, r, w)

    def apply_rotary():
        q = torch.randn(2, 4, 3, 8, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 2, 3, 8, dtype=torch.float64, requires_grad=True)
        cos = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
        sin = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
        return F.apply_rotary(q, k, cos, sin, interleaved=True), (q, k, cos, sin)

    def swiglu():
        g, u = (torch.randn(3, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        return (F.swiglu(g, u),), (g, u)

    return [
        ("attention", attention),
        ("masked_softmax", masked_softmax),
        ("layer_norm", layer_norm),
        ("add_layer_norm", add_layer_norm),
        ("scaled_qk", scaled_qk),
        ("rms_norm", rms_norm),
        ("add_rms_norm", add_rms_norm),
        ("apply_rotary", apply_rotary),
        ("swiglu", swiglu),
    ]


def _run(thunk, seed):
    torch.manual_seed(seed)
    outs, ins = thunk()
    cot = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, ins, cot)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("name,thunk", _calls(), ids=[c[0] for c in _calls()])
def test_direct_entry_and_torch_ops_agree_bitwise(name, thunk):
    fast = _run(thunk, 7)
    with Recorder() as rec:  # a __torch_function__ mode sends the call through torch.ops
        slow = _run(thunk, 7)
    assert name in rec.seen, f"the mode did not see pyformer.{name}: {rec.seen}"
    for a, b in zip(fast[0] + list(fast[1]), slow[0] + list(slow[1])):
        assert torch.equal(a, b)


def test_direct_entry_used_outside_modes(monkeypatch):
    """Outside torch.compile and __torch_function__, no call goes through torch.ops.pyformer."""

    class NoOps:
        def __getattr__(self, name):
            raise AssertionError(f"torch.ops.pyformer.{name} called on the direct path")

    monkeypatch.setattr(F, "_P", NoOps())
    x = torch.randn(2, 3, 8, requires_grad=True)
    q = torch.randn(1, 2, 3, 8)
    F.layer_norm(x, 8).sum().backward()
    F.add_layer_norm(x, x, [8])
    F.masked_softmax(x, causal=True)
    F.scaled_qk(q, q)
    F.attention(q, q, q, causal=True)
    F.rms_norm(x, 8).sum().backward()
    F.add_rms_norm(x, x, [8])
    F.apply_rotary(q, q, torch.ones(3, 8), torch.zeros(3, 8))
    F.swiglu(x, x)


@pytest.mark.parametrize("mode", [False, True], ids=["direct", "torch_ops"])
def test_both_paths_reject_bad_arguments(mode):
    x = torch.randn(2, 3, 4, 5)
    q = torch.randn(1, 2, 3, 4)
    ctx = Recorder() if mode else torch.autograd.grad_mode.no_grad()
    with ctx:
        for bad in ("bottom-right", 2, None):
            with pytest.raises(TypeError, match="causal"):
                F.masked_softmax(x, causal=bad)
            with pytest.raises(TypeError, match="causal"):
                F.attention(q, q, q, causal=bad)
        # the two alignments are taken on both paths, with the same answer
        a = F.masked_softmax(x, causal="bottom_right")
        assert torch.equal(a, F.masked_softmax(x, torch.ones(4, 5, dtype=torch.bool).tril(1)))
        with pytest.raises(TypeError, match="normalized_shape"):
            F.layer_norm(x, (5.0,))
        with pytest.raises(TypeError, match="normalized_shape"):
            F.layer_norm(x, True)
        with pytest.raises(TypeError, match="normalized_shape"):
            F.add_layer_norm(x, x, [True])


def test_no_autograd_record_without_grad():
    """Nothing requires grad: the result has no grad_fn (and attention writes no probabilities
    it could not use)."""
    x = torch.randn(3, 8)
    assert F.layer_norm(x, 8).grad_fn is None
    q = torch.randn(1, 2, 3, 4)
    out, w = F.attention(q, q, q)
    assert out.grad_fn is None and w is None


def test_mask_layout_when_dims_do_not_merge():
    """A mask whose broadcast and dense dims alternate over scores of rank 10 leaves more leading
    dims than a layout holds (8): the host copies it into a layout that does, and the answer is
    the reference's."""
    shape = (2, 3, 2, 3, 2, 3, 2, 3, 2, 6)
    scores = torch.randn(*shape, dtype=torch.float64)
    mask = torch.rand(2, 1, 2, 1, 2, 1, 2, 1, 2, 6) > 0.3
    mask[..., 0] = True
    kl = torch.randint(1, 7, (2,))
    compare(
        lambda s: F.masked_softmax(s, mask, scale=0.5, causal=True, key_lengths=kl),
        lambda s: ref.masked_softmax(s, mask, scale=0.5, causal=True, key_lengths=kl),
        [scores],
        dtype=torch.float32,
        device="cpu",
        grad=(0,),
    )
    add = torch.randn(2, 1, 2, 1, 2, 1, 2, 1, 2, 6, dtype=torch.float64)
    add[..., 2] = float("-inf")
    compare(
        lambda s: F.masked_softmax(s, add.float()),
        lambda s: ref.masked_softmax(s, add),
        [scores],
        dtype=torch.float32,
        device="cpu",
        grad=(0,),
    )


def test_mha_float_mask_that_requires_grad_runs_the_kernel(calls):
    """A learned additive attn_mask: the drop-in MHA runs pyformer's attention (which
    differentiates the mask) and the mask's gradient is the reference's."""
    import pyformer.nn as pnn

    torch.manual_seed(0)
    mha = pnn.MultiheadAttention(8, 2, batch_first=True).double()
    tmha = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    tmha.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    am = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    am2 = am.detach().clone().requires_grad_(True)
    out, _ = mha(x, x, x, attn_mask=am, need_weights=False)
    tout, _ = tmha(x, x, x, attn_mask=am2, need_weights=False)
    assert calls.get("attention", 0) == 1
    torch.testing.assert_close(out, tout, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, am, g)
    (gt,) = torch.autograd.grad(tout, am2, g)
    torch.testing.assert_close(ga, gt, rtol=1e-10, atol=1e-12)
