"""The ops as PyTorch sees them: gradcheck in float64, torch.library.opcheck on every op (schema,
fake kernel, autograd registration, AOT dispatch), and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import pyformer
import pyformer.functional as F
from conftest import DEVICES

P = torch.ops.pyformer


def _d(*shape, device="cpu", grad=True):
    return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=grad)


def _attention_inputs(device):
    """q, k, v (float64, requiring grad), key_lengths, a bool padding mask and a float mask."""
    q, k, v = (
        _d(2, 2, 4, 3, device=device),
        _d(2, 2, 5, 3, device=device),
        _d(2, 2, 5, 2, device=device),
    )
    kl = torch.tensor([5, 3], device=device)
    pad = torch.arange(5, device=device) < torch.tensor([4, 5], device=device).view(2, 1, 1, 1)
    return q, k, v, kl, pad, _d(1, 2, 4, 5, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    gc = lambda f, xs: torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7, rtol=1e-5)
    q, k, v, kl, pad, fmask = _attention_inputs(device)
    assert gc(lambda q, k: F.scaled_qk(q, k), (q, k))
    assert gc(
        lambda s: F.masked_softmax(s, pad, scale=0.5, causal=True, key_lengths=kl),
        (_d(2, 2, 4, 5, device=device),),
    )
    assert gc(
        lambda s, m: F.masked_softmax(s, m, scale=1.5), (_d(2, 2, 4, 5, device=device), fmask)
    )
    x, w, b = _d(3, 4, 6, device=device), _d(6, device=device), _d(6, device=device)
    assert gc(lambda x, w, b: F.layer_norm(x, (6,), w, b), (x, w, b))
    assert gc(lambda x, w, b: F.layer_norm(x, (4, 6), w.repeat(4, 1), b.repeat(4, 1)), (x, w, b))
    r = _d(3, 4, 6, device=device)
    assert gc(lambda x, r, w, b: F.add_layer_norm(x, r, (6,), w, b), (x, r, w, b))
    assert gc(
        lambda q, k, v: F.attention(q, k, v, pad, key_lengths=kl, need_weights=True), (q, k, v)
    )
    assert gc(
        lambda q, k, v, m: F.attention(q, k, v, m, causal=True, need_weights=True), (q, k, v, fmask)
    )


def _samples(device):
    t = lambda *s, dtype=torch.float32: torch.randn(*s, device=device, dtype=dtype)
    kl = torch.tensor([5, 2], device=device)
    pad = torch.arange(5, device=device) < kl.view(2, 1, 1, 1)
    q, k, v = t(2, 3, 4, 8), t(2, 3, 5, 8), t(2, 3, 5, 6)
    probs = torch.softmax(t(2, 3, 4, 5), -1)
    # the flash op, grouped (4 query heads, 2 kv heads), bottom-right causal, with dropout
    fq, fk, fv = t(2, 4, 4, 8), t(2, 2, 5, 8), t(2, 2, 5, 6)
    fout, flse, frng = P.flash_attention(fq, fk, fv, None, 0.35, 2, kl, 0.2)
    return [
        (P.scaled_qk, (q, k, 0.3)),
        (P.scaled_qk_backward, (t(2, 3, 4, 5), q, k, 0.3)),
        (P.masked_softmax, (t(2, 3, 4, 5), pad, 0.5, True, kl)),
        (P.masked_softmax, (t(2, 3, 4, 5), t(1, 3, 4, 5), 1.0, False, None)),
        (P.masked_softmax_backward, (t(2, 3, 4, 5), probs, 0.5)),
        (P.layer_norm, (t(4, 7, 16), [16], t(16), t(16), 1e-5)),
        (P.layer_norm, (t(4, 7, 16), [7, 16], None, None, 1e-5)),
        (P.layer_norm_backward, (t(4, 16), t(4, 16), t(4), t(4).abs() + 0.5, t(16), [16])),
        (P.add_layer_norm, (t(4, 16), t(4, 16), [16], t(16), t(16), 1e-5)),
        (P.rms_norm, (t(4, 7, 16), [16], t(16), None)),
        (P.rms_norm, (t(4, 7, 16), [7, 16], None, 1e-6)),
        (P.rms_norm_backward, (t(4, 16), t(4, 16), t(4).abs() + 0.5, t(16), [16])),
        (P.add_rms_norm, (t(4, 16), t(4, 16), [16], t(16), None)),
        (P.apply_rotary, (t(2, 4, 5, 8), t(2, 2, 5, 8), t(1, 5, 8), t(1, 5, 8), False)),
        (P.apply_rotary, (t(2, 5, 4, 8).transpose(1, 2), t(2, 2, 5, 8), t(5, 4), t(5, 4), True)),
        (P.apply_rotary_backward, (t(2, 4, 5, 8), t(2, 2, 5, 8), t(2, 5, 6), t(2, 5, 6), False)),
        (P.swiglu, (t(3, 7), t(3, 7))),
        (P.swiglu_backward, (t(3, 7), t(3, 7), t(3, 7))),
        (P.attention, (q, k, v, pad, 0.35, False, kl, 0.0)),
        (P.attention, (q, k, v, t(2, 1, 4, 5), 0.35, True, None, 0.0)),
        (P.attention, (q, k, v, pad, 0.35, True, None, 0.3, False)),
        (P.flash_attention, (fq, fk, fv, None, 0.35, 2, kl, 0.2)),
        (P.flash_attention, (fq, fk, fv, t(2, 1, 4, 5), None, 0, None, 0.0)),
        (
            P.flash_attention_backward,
            (
                t(2, 4, 4, 6),
                fq,
                fk,
                fv,
                fout,
                flse,
                None,
                0.35,
                2,
                kl,
                False,
                t(2, 4, 4),
                0.2,
                frng,
            ),
        ),
        (
            P.attention_backward,
            (
                t(2, 3, 4, 6),
                None,
                q,
                k,
                v,
                probs,
                torch.empty(0, dtype=torch.bool, device=device),
                0.35,
                0.0,
            ),
        ),
        (
            P.attention_backward,
            (
                t(2, 3, 4, 6),
                t(2, 3, 4, 5),
                q,
                k,
                v,
                probs,
                torch.empty(0, dtype=torch.bool, device=device),
                0.35,
                0.0,
            ),
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(device):
    """A gradient of a gradient, every op, every mask kind that carries a gradient: the backward
    runs as differentiable ATen ops when create_graph=True (csrc/host/autograd.h)."""
    ggc = lambda f, xs: torch.autograd.gradgradcheck(f, xs, eps=1e-6, atol=1e-6, rtol=1e-4)
    q, k, v, kl, pad, fmask = _attention_inputs(device)
    assert ggc(lambda q, k: F.scaled_qk(q, k, scale=0.7), (q, k))
    s = _d(2, 2, 4, 5, device=device)
    assert ggc(lambda s: F.masked_softmax(s, pad, scale=0.5, causal=True, key_lengths=kl), (s,))
    assert ggc(lambda s, m: F.masked_softmax(s, m, scale=1.5), (s, fmask))
    x, w, b = _d(3, 4, 6, device=device), _d(6, device=device), _d(6, device=device)
    assert ggc(lambda x, w, b: F.layer_norm(x, (6,), w, b), (x, w, b))
    assert ggc(lambda x: F.layer_norm(x, (4, 6)), (x,))
    r = _d(3, 4, 6, device=device)
    assert ggc(lambda x, r, w, b: F.add_layer_norm(x, r, (6,), w, b), (x, r, w, b))
    assert ggc(lambda q, k, v: F.attention(q, k, v, key_lengths=kl)[0], (q, k, v))
    assert ggc(lambda q, k, v: F.attention(q, k, v, pad, causal=True)[0], (q, k, v))
    assert ggc(lambda q, k, v, m: F.attention(q, k, v, m, need_weights=True), (q, k, v, fmask))


def test_gradient_penalty_matches_torch():
    """A gradient penalty (the norm of d loss / d x, differentiated again) through pyformer's
    layers equals the same through torch's, in float64."""
    torch.manual_seed(0)
    import pyformer.nn as pnn

    ln_t = torch.nn.LayerNorm(6).double()
    ln_p = pnn.LayerNorm(6).double()
    ln_p.load_state_dict(ln_t.state_dict())
    x = _d(4, 6)

    def penalty(ln):
        y = torch.softmax(ln(x) * 2, -1)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, *ln.parameters()])

    for a, b in zip(penalty(ln_p), penalty(ln_t)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    forward = (
        P.scaled_qk,
        P.masked_softmax,
        P.layer_norm,
        P.add_layer_norm,
        P.rms_norm,
        P.add_rms_norm,
        P.apply_rotary,
        P.swiglu,
        P.attention,
        P.flash_attention,
    )
    for op, args in _samples(device):
        # forward ops with differentiable inputs (their autograd is checked); backward ops plain
        grad = op in forward
        args = tuple(
            a.detach().clone().requires_grad_(grad and a.is_floating_point())
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        )
        torch.library.opcheck(op, args)


def _model(x, r, w, b, q, k, v, s, kl):
    y, s2 = F.add_layer_norm(x, r, (x.shape[-1],), w, b)
    z = F.layer_norm(s2, (x.shape[-1],))
    out, probs = F.attention(q, k, v, causal=True, key_lengths=kl, need_weights=True)
    p = F.masked_softmax(F.scaled_qk(q, k), scale=0.5, key_lengths=kl)
    return y.sum() + z.square().sum() + out.square().sum() + probs.sum() + (p * s).sum()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    t = lambda *s: torch.randn(*s, device=device, requires_grad=True)
    args = [
        t(3, 5, 16),
        t(3, 5, 16),
        t(16),
        t(16),
        t(2, 2, 6, 8),
        t(2, 2, 6, 8),
        t(2, 2, 6, 4),
        torch.randn(2, 2, 6, 6, device=device),
        torch.tensor([6, 3], device=device),
    ]
    compiled = torch.compile(_model, fullgraph=True, backend="inductor")
    want = _model(*args)
    g_want = torch.autograd.grad(want, [a for a in args if a.requires_grad])
    got = compiled(*args)
    g_got = torch.autograd.grad(got, [a for a in args if a.requires_grad])
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_backends_and_version():
    info = pyformer.backends()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert isinstance(pyformer.__version__, str) and pyformer.__version__.count(".") >= 1
    assert hasattr(torch.ops.pyformer, "masked_softmax")


def _import_with(capability):
    """pyformer.backends() in a fresh interpreter with PYFORMER_CPU_CAPABILITY set."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYFORMER_CPU_CAPABILITY=capability)
    code = "import pyformer, json; print(json.dumps(pyformer.backends()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_cpu_capability_is_chosen_at_import():
    import json

    info = pyformer.backends()
    assert info["cpu_capability"] in ("avx2", "default")
    assert (info["cpu_capability"] == "default") == bool(info["cpu_capability_note"])
    forced = _import_with("default")
    assert forced.returncode == 0, forced.stderr
    got = json.loads(forced.stdout.strip().splitlines()[-1])
    assert got["cpu_capability"] == "default"
    assert "PYFORMER_CPU_CAPABILITY" in got["cpu_capability_note"]
    bad = _import_with("avx9000")
    assert bad.returncode != 0 and "PYFORMER_CPU_CAPABILITY must be" in bad.stderr


def test_baseline_and_avx2_kernels_agree():
    """The two CPU builds of the kernels give results within the contract's bounds of each other
    (each is checked against the float64 reference on its own by the whole suite, run once per
    capability in CI); here the point is that both are really there and both run."""
    import os
    import subprocess
    import sys

    if pyformer.backends()["cpu_capability"] != "avx2":
        pytest.skip("the AVX2 kernels are not in use here")
    code = (
        "import torch, pyformer, pyformer.functional as F, sys\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(6, 37, 301); w = torch.randn(301); b = torch.randn(301)\n"
        "y = torch.cat([F.masked_softmax(x, causal=True).flatten(),\n"
        "               F.layer_norm(x, (301,), w, b).flatten(),\n"
        "               F.attention(x[:2, None], x[2:4, None], x[4:, None])[0].flatten()])\n"
        "torch.save(y, sys.argv[1])\n"
    )
    import tempfile

    outs = {}
    with tempfile.TemporaryDirectory() as d:
        for cap in ("avx2", "default"):
            path = os.path.join(d, cap + ".pt")
            env = dict(os.environ, PYFORMER_CPU_CAPABILITY=cap)
            r = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True)
            assert r.returncode == 0, r.stderr.decode()
            outs[cap] = torch.load(path)
    torch.testing.assert_close(outs["avx2"], outs["default"], rtol=1e-5, atol=1e-6)


def test_baseline_library_holds_no_avx_instructions():
    """pyformer._C (loaded on every CPU) is baseline x86-64: no ymm/zmm register in its code, so a
    wheel built on an AVX2 machine imports on a CPU without AVX; the AVX2 code is all in
    pyformer/_cpu_avx2*.so, loaded only where the CPU has it."""
    import platform
    import shutil
    import subprocess

    if platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which("objdump"):
        pytest.skip("needs x86-64 and objdump")
    from pyformer import _C

    asm = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True
    ).stdout
    assert asm.count("\n") > 10_000, "objdump gave no disassembly"
    avx = [line for line in asm.splitlines() if "%ymm" in line or "%zmm" in line]
    assert not avx, f"{len(avx)} AVX instructions in {_C.__file__}, e.g. {avx[:3]}"


def test_compile_dynamic_normalized_shape_does_not_recompile():
    """normalized_shape is SymInt[]: under dynamic shapes a new row length is the same graph, forward
    and backward."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def step(x, w, r):
        y, s = F.add_layer_norm(x, r, (x.shape[-1],), w)
        return F.layer_norm(y, x.shape[-1:], w).sum() + s.sum()

    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    torch._dynamo.reset()
    for n in (8, 16, 24):
        x, r = torch.randn(3, n, requires_grad=True), torch.randn(3, n)
        w = torch.randn(n, requires_grad=True)
        got = torch.autograd.grad(compiled(x, w, r), (x, w))
        want = torch.autograd.grad(step(x, w, r), (x, w))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


def test_compile_dynamic_head_dim_does_not_recompile():
    """scale=None reaches the op, which resolves 1/sqrt(D) itself: under dynamic shapes a new head
    dim is the same graph, not a recompile."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def f(q, k):
        return F.attention(q, k, k)[0] + F.scaled_qk(q, k).sum(-1, keepdim=True)

    torch._dynamo.reset()
    for d in (8, 16, 24):
        q, k = torch.randn(1, 2, 5, d), torch.randn(1, 2, 7, d)
        got = f(q, k)
        want = F.attention(q, k, k)[0] + F.scaled_qk(q, k).sum(-1, keepdim=True)
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1
