"""pyformer.nn's drop-ins against the PyTorch modules they replace, on random configurations.

Each case builds the PyTorch module and pyformer's, loads one state_dict into both, runs both on
the same inputs and compares the outputs, the attention weights and, in float64, the gradients of
the inputs, the float masks and the parameters. Where PyTorch raises, pyformer must raise an
exception of the same type (an integer mask, a mask or input of the wrong shape, a dtype mix
PyTorch refuses). A case is drawn from a generator seeded by its number (and PYFORMER_TEST_SEED),
so a failure reproduces; the mask kinds and the LayerNorm dtype mixes are cycled through so each
one appears in every run.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import pyformer.nn as pnn
from pyformer.testing import BOUNDS, rel_err as rel

# PyTorch warns when key_padding_mask and attn_mask have different dtypes (bool and float); both
# modules accept the mix, and the cases use it on purpose
pytestmark = pytest.mark.filterwarnings(
    "ignore:Support for mismatched key_padding_mask:UserWarning"
)

BASE = int(os.environ.get("PYFORMER_TEST_SEED", "0"))
# pyformer and PyTorch compute the same thing in the same dtype; only rounding differs
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _close(a, b, tol, what):
    """||a - b|| <= tol * max(||b||, 1): relative, but absolute for a (near) zero ``b``, such as
    the input gradient of a layer norm over one element (zero whatever the input)."""
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.shape == b.shape and a.dtype == b.dtype, what
    err = (a.double() - b.double()).norm().item()
    assert err <= tol * max(b.double().norm().item(), 1.0), (what, err, rel(a, b))


# ----------------------------------------------------------------------------- MultiheadAttention

MASK_KINDS = [
    "none",
    "kpm_bool_right",
    "kpm_bool_any",
    "kpm_float",
    "am2_bool",
    "am2_float",
    "am3_bool",
    "am3_float",
    "causal",
    "causal+kpm_bool_right",
    "am2_bool+kpm_bool_any",
    "am2_float+kpm_bool_right",
    "am3_float+kpm_float",
    "int_kpm",
    "int_am",
    "bad_kpm",
    "bad_am",
]


def _mha_case(seed):
    r = random.Random(seed * 7919 + BASE)
    heads = r.choice([1, 2, 4])
    e = heads * r.choice([2, 3, 4])
    c = {
        "kind": MASK_KINDS[seed % len(MASK_KINDS)],
        "heads": heads,
        "embed": e,
        "kdim": r.choice([3, 5, e]) if r.random() < 0.3 else None,
        "vdim": r.choice([4, e]) if r.random() < 0.3 else None,
        "bias": r.random() < 0.8,
        # add_bias_kv / add_zero_attn run PyTorch's forward inside pyformer's module
        "add_bias_kv": r.random() < 0.12,
        "add_zero_attn": r.random() < 0.12,
        "batch_first": r.random() < 0.5,
        "unbatched": r.random() < 0.2,
        "n": r.randint(1, 3),
        "lq": r.randint(1, 6),
        "lk": r.randint(1, 7),
        "need_weights": r.random() < 0.6,
        "average": r.random() < 0.5,
        "mode": r.choice(["eval_no_grad", "eval", "train"]),
        "dtype": torch.float64 if r.random() < 0.6 else torch.float32,
    }
    same_dims = c["kdim"] in (None, e) and c["vdim"] in (None, e)
    c["self_attn"] = same_dims and r.random() < 0.5
    if c["self_attn"]:
        c["lk"] = c["lq"]
    return c


def _masks(c, gen):
    """The masks of case `c`, in PyTorch's convention (bool True = not allowed). Key 0 is never
    masked by a bool mask and float masks are finite there: a fully masked query row gives NaN in
    PyTorch and zeros in pyformer (docs/ops.md), a difference these cases do not test."""
    kind, n, h, lq, lk, dt = c["kind"], c["n"], c["heads"], c["lq"], c["lk"], c["dtype"]
    ub = c["unbatched"]
    kpm_shape = (lk,) if ub else (n, lk)
    am3_shape = (h, lq, lk) if ub else (n * h, lq, lk)
    kw = {}

    def bool_mask(shape):
        m = torch.rand(shape, generator=gen) < 0.35
        m[..., 0] = False
        return m

    def float_mask(shape):
        m = torch.randn(shape, generator=gen, dtype=dt)
        m = (
            m.masked_fill(bool_mask(shape), float("-inf"))
            if torch.rand(1, generator=gen) < 0.5
            else m
        )
        return m

    if "kpm_bool_right" in kind:
        lengths = torch.randint(1, lk + 1, kpm_shape[:-1] + (1,), generator=gen)
        kw["key_padding_mask"] = torch.arange(lk) >= lengths
        if ub:
            kw["key_padding_mask"] = kw["key_padding_mask"].reshape(lk)
    if "kpm_bool_any" in kind:
        kw["key_padding_mask"] = bool_mask(kpm_shape)
    if "kpm_float" in kind:
        kw["key_padding_mask"] = float_mask(kpm_shape)
    if "am2_bool" in kind:
        kw["attn_mask"] = bool_mask((lq, lk))
    if "am2_float" in kind:
        kw["attn_mask"] = float_mask((lq, lk))
    if "am3_bool" in kind:
        kw["attn_mask"] = bool_mask(am3_shape)
    if "am3_float" in kind:
        kw["attn_mask"] = float_mask(am3_shape)
    if "causal" in kind:  # top-left: key j > query i not allowed
        kw["attn_mask"] = torch.ones(lq, lk, dtype=torch.bool).triu(1)
        kw["is_causal"] = True
    if kind == "int_kpm":
        kw["key_padding_mask"] = bool_mask(kpm_shape).to(torch.uint8)
    if kind == "int_am":
        kw["attn_mask"] = bool_mask((lq, lk)).to(torch.int64)
    if kind == "bad_kpm":  # one key too many, or (batched) one batch element too many
        bad = (
            (lk + 1,)
            if ub
            else ((n, lk + 1) if torch.rand(1, generator=gen) < 0.5 else (n + 1, lk))
        )
        kw["key_padding_mask"] = torch.zeros(bad, dtype=torch.bool)
    if kind == "bad_am":
        bad = (lq, lk + 1) if torch.rand(1, generator=gen) < 0.5 else (am3_shape[0] + 1, lq, lk)
        kw["attn_mask"] = torch.zeros(bad)
    return kw


def _inputs(c, gen):
    dt, n, lq, lk = c["dtype"], c["n"], c["lq"], c["lk"]
    kdim, vdim = c["kdim"] or c["embed"], c["vdim"] or c["embed"]

    def seq(length, feat):
        if c["unbatched"]:
            return torch.randn(length, feat, generator=gen, dtype=dt)
        shape = (n, length, feat) if c["batch_first"] else (length, n, feat)
        return torch.randn(shape, generator=gen, dtype=dt)

    q = seq(lq, c["embed"])
    if c["self_attn"]:
        return q, q, q
    return q, seq(lk, kdim), seq(lk, vdim)


def _leaves(qkv, masks, grad):
    """Fresh leaves for one module: the inputs (one tensor for self-attention, as PyTorch's packed
    path needs `query is key is value`) and the float masks, requiring grad when `grad`. A causal
    hint's mask is not read by pyformer (the causal mask is applied by index), so its gradient is
    not compared."""
    q, k, v = qkv
    if q is k and k is v:
        x = q.detach().clone().requires_grad_(grad)
        q2 = k2 = v2 = x
    else:
        q2, k2, v2 = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    kw = {}
    for name, m in masks.items():
        if isinstance(m, torch.Tensor):
            m = m.clone()
            if grad and m.is_floating_point() and not masks.get("is_causal"):
                m.requires_grad_()
        kw[name] = m
    return (q2, k2, v2), kw


def _run_mha(mod, qkv, kw, c):
    return mod(*qkv, need_weights=c["need_weights"], average_attn_weights=c["average"], **kw)


@pytest.mark.parametrize("seed", range(100))
def test_mha_matches_torch(seed):
    c = _mha_case(seed)
    gen = torch.Generator().manual_seed(seed + 1000 * BASE)
    kw_mod = dict(
        bias=c["bias"],
        add_bias_kv=c["add_bias_kv"],
        add_zero_attn=c["add_zero_attn"],
        kdim=c["kdim"],
        vdim=c["vdim"],
        batch_first=c["batch_first"],
        dtype=c["dtype"],
    )
    t = torch.nn.MultiheadAttention(c["embed"], c["heads"], **kw_mod)
    with torch.no_grad():  # nonzero biases, so they are compared too
        for name, prm in t.named_parameters():
            if "bias" in name:
                prm.uniform_(-0.5, 0.5, generator=gen)
    p = pnn.MultiheadAttention(c["embed"], c["heads"], **kw_mod)
    assert p.state_dict().keys() == t.state_dict().keys()
    p.load_state_dict(t.state_dict())
    t.train(c["mode"] == "train")
    p.train(c["mode"] == "train")

    qkv = _inputs(c, gen)
    masks = _masks(c, gen)
    grad = c["mode"] != "eval_no_grad"
    (qt, kt, vt), mt = _leaves(qkv, masks, grad)
    (qp, kp, vp), mp = _leaves(qkv, masks, grad)
    ctx = torch.no_grad() if not grad else torch.enable_grad()

    with ctx:
        try:
            out_t, w_t = _run_mha(t, (qt, kt, vt), mt, c)
        except (AssertionError, RuntimeError) as e:  # PyTorch refuses: pyformer must as well
            with pytest.raises(type(e)) as info:
                _run_mha(p, (qp, kp, vp), mp, c)
            if c["kind"].startswith("int"):
                assert isinstance(info.value, pnn.MaskDtypeError)
            elif not (c["add_bias_kv"] or c["add_zero_attn"]):  # else PyTorch's own error
                assert isinstance(info.value, pnn.AttentionShapeError)
            return
        assert not c["kind"].startswith(("int", "bad")), "PyTorch accepted a bad mask"
        out_p, w_p = _run_mha(p, (qp, kp, vp), mp, c)

    tol = TOL[c["dtype"]]
    _close(out_p, out_t, tol, "output")
    _close(w_p, w_t, tol, "weights")
    if not grad or c["dtype"] != torch.float64:
        return

    g = torch.randn(out_t.shape, generator=gen, dtype=out_t.dtype)
    gw = None if w_t is None else torch.randn(w_t.shape, generator=gen, dtype=w_t.dtype)

    def grads(out, w, leaves, mod):
        loss = (out * g).sum() + ((w * gw).sum() if w is not None else 0)
        wrt = list(leaves) + list(mod.parameters())
        return torch.autograd.grad(loss, wrt, allow_unused=True)

    def leaves(q, k, v, m):
        xs = [q] if (q is k and k is v) else [q, k, v]
        return xs + [x for x in m.values() if isinstance(x, torch.Tensor) and x.requires_grad]

    names = ["query", "key", "value"] + [n for n, _ in p.named_parameters()]
    gt = grads(out_t, w_t, leaves(qt, kt, vt, mt), t)
    gp = grads(out_p, w_p, leaves(qp, kp, vp, mp), p)
    assert len(gt) == len(gp)
    for i, (a, b) in enumerate(zip(gp, gt)):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        _close(a, b, tol, f"gradient {i} ({names[i] if i < len(names) else 'mask'})")


# -------------------------------------------------------------------------------------- LayerNorm

# (input dtype, parameter dtype); PyTorch accepts a float32 parameter with a half input and
# refuses other mixes: pyformer must do the same (it runs PyTorch's layer norm for every mix).
# float64 thrice: its cases compare the gradients too
LN_DTYPES = [
    (torch.float64, torch.float64),
    (torch.float64, torch.float64),
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
]


def _ln_case(seed):
    r = random.Random(seed * 104729 + BASE)
    ndim = r.randint(1, 4)
    shape = [r.randint(1, 6) for _ in range(ndim)]
    k = r.randint(1, min(ndim, 3))
    xdtype, pdtype = LN_DTYPES[seed % len(LN_DTYPES)]
    return {
        "shape": shape,
        "nshape": shape[-k:],
        "affine": r.random() < 0.75,
        "bias": r.random() < 0.7,
        "eps": r.choice([1e-5, 1e-3, 0.1]),
        "xdtype": xdtype,
        "pdtype": pdtype,
        "residual": r.random() < 0.2,
        "grad": r.random() < 0.7,
        "bad": r.random() < 0.08,  # trailing dims that are not normalized_shape
    }


@pytest.mark.parametrize("seed", range(60))
def test_layer_norm_matches_torch(seed):
    c = _ln_case(seed)
    gen = torch.Generator().manual_seed(seed + 1000 * BASE)
    kw = dict(eps=c["eps"], elementwise_affine=c["affine"], bias=c["bias"], dtype=c["pdtype"])
    t = torch.nn.LayerNorm(c["nshape"], **kw)
    if c["affine"]:
        with torch.no_grad():
            t.weight.uniform_(0.5, 1.5, generator=gen)
            if t.bias is not None:
                t.bias.uniform_(-0.5, 0.5, generator=gen)
    p = pnn.LayerNorm(c["nshape"], **kw)
    assert p.state_dict().keys() == t.state_dict().keys()
    p.load_state_dict(t.state_dict())

    shape = list(c["shape"])
    if c["bad"]:
        shape[-1] += 1
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    r64 = torch.randn(shape, generator=gen, dtype=torch.float64) if c["residual"] else None
    xd = c["xdtype"]
    grad = c["grad"] and xd.is_floating_point

    def run(mod):
        x = x64.to(xd).requires_grad_(grad)
        r = None if r64 is None else r64.to(xd).requires_grad_(grad)
        if mod is p:
            y = p(x, residual=r)
        else:
            y = t(x if r is None else x + r)
        return y, [x] + ([r] if r is not None else [])

    # a parameter of another dtype than the input: pyformer runs PyTorch's layer norm
    mixed = any(prm.dtype != xd for prm in t.parameters())
    try:
        y_t, in_t = run(t)
    except RuntimeError as e:
        with pytest.raises(RuntimeError) as info:
            run(p)
        if not mixed:  # the wrong shape, found by pyformer's op
            assert c["bad"] and isinstance(info.value, pnn.ShapeError)
        else:  # a dtype mix: pyformer runs PyTorch's layer norm, which raised this
            assert str(info.value) == str(e)
        return
    assert not c["bad"], "PyTorch accepted an input of the wrong shape"
    y_p, in_p = run(p)
    assert y_p.dtype == y_t.dtype and y_p.shape == y_t.shape
    if mixed:  # PyTorch's own computation: the same bits
        torch.testing.assert_close(y_p, y_t, rtol=0, atol=0)
    elif xd in TOL:
        _close(y_p, y_t, TOL[xd], "output")
    else:  # half types: both against float64 from the same rounded inputs (docs/ops.md)
        ref = torch.nn.functional.layer_norm(
            x64.to(xd).double() + (0 if r64 is None else r64.to(xd).double()),
            c["nshape"],
            None if t.weight is None else t.weight.double(),
            None if t.bias is None else t.bias.double(),
            c["eps"],
        )
        if r64 is None:  # with a residual, the sum is rounded to the half type first in PyTorch
            assert rel(y_p, ref) <= max(BOUNDS[xd], 2 * rel(y_t, ref) + 1e-5)
        else:
            assert rel(y_p, y_t) <= 2 * BOUNDS[xd]
    if not grad or xd != torch.float64 or mixed:
        return
    g = torch.randn(y_t.shape, generator=gen, dtype=y_t.dtype)
    gt = torch.autograd.grad(y_t, in_t + list(t.parameters()), g)
    gp = torch.autograd.grad(y_p, in_p + list(p.parameters()), g)
    for i, (a, b) in enumerate(zip(gp, gt)):
        _close(a, b, TOL[xd], f"gradient {i}")
