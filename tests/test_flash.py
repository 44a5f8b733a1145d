"""Flash attention on the CPU (no probabilities, so the op takes the fused flash kernel,
csrc/cpu/flash_attention.cpp): every mask kind, dtype, grouped-query layout and dropout
against the float64 reference, at the kernel's block boundaries, for decode shapes (one query
against a long cache: the keys are split across threads) and long rows; its memory does not grow
as Lq x Lk, and its results are bitwise reproducible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from conftest import DEVICES, next_dropout_seed
from pyformer.testing import MASK_KINDS, make_mask, verify

ALL = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BLOCK_Q, BLOCK_K = 128, 256  # the kernel's blocks: sizes one below and above them are tested

# (B, H, H_kv, Lq, Lk, D, Dv)
SHAPES = [
    (2, 4, 2, BLOCK_Q + 1, BLOCK_K + 1, 32, 16),
    (1, 2, 2, BLOCK_Q, BLOCK_K, 64, 64),
    (2, 3, 1, BLOCK_Q - 1, 2 * BLOCK_K - 1, 16, 8),
    (1, 2, 1, 1, 2049, 64, 32),  # decode: split across threads
    (2, 8, 8, 7, 5, 8, 8),  # Lq > Lk: bottom-right rows with no key
]


def _inputs(B, H, Hkv, Lq, Lk, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64)
    return q, k, v, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_matches_reference(device, dtype, kind, shape):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v, g = _inputs(*shape, seed=zlib.crc32(f"{kind}{shape}".encode()) % 1000)
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk, generator=g)
    kw = dict(causal=causal)

    def impl(q, k, v, mask):
        lens = None if kl is None else kl.to(q.device)
        with torch.no_grad():
            return F.attention(q, k, v, mask, key_lengths=lens, **kw)[0]

    def reference(q, k, v, mask):
        return ref.attention(q, k, v, mask, key_lengths=kl, **kw)[0]

    verify(
        impl, reference, dict(q=q, k=k, v=v, mask=mask), dtype=dtype, device=device, generator=g
    ).assert_ok(f"{kind} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_flash_gradients_match_reference(device, dtype, kind, shape, dropout_p):
    """Training without need_weights: the flash node, whose backward recomputes the
    probabilities from the saved lse and, with dropout, regenerates the elements of the Philox
    key it drew (the reference's dropout_keep of that key); out, dq, dk (summed over each group
    of query heads), dv and, for an additive mask (which then requires grad), dmask summed to the
    mask's own shape, against the reference's."""
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v, g = _inputs(*shape, seed=zlib.crc32(f"grad{kind}{shape}".encode()) % 1000)
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk, generator=g)
    kw = dict(causal=causal, dropout_p=dropout_p)
    torch.manual_seed(11)
    seed = next_dropout_seed()

    def impl(q, k, v, mask):
        lens = None if kl is None else kl.to(q.device)
        torch.manual_seed(11)
        return F.attention(q, k, v, mask, key_lengths=lens, **kw)[0]

    def reference(q, k, v, mask):
        return ref.attention(q, k, v, mask, key_lengths=kl, dropout_seed=seed, **kw)[0]

    verify(
        impl,
        reference,
        dict(q=q, k=k, v=v, mask=mask),
        dtype=dtype,
        device=device,
        grad=["q", "k", "v"] + (["mask"] if kind.startswith("float") else []),
        generator=g,
    ).assert_ok(f"{kind} {shape} dropout {dropout_p}")


def test_flash_dropout_gradcheck_compile_and_memory():
    """With the key fixed by torch.manual_seed the call is a function: gradcheck and
    gradgradcheck pass through the regenerated mask (GQA, bottom-right causal, a learned bias).
    Under torch.compile each call draws its own mask (the key is not baked into the graph) and a
    seeded call equals eager. The flash node saves no (Lq, Lk) keep mask; the lse does not
    depend on dropout."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k.requires_grad_(), v.requires_grad_()
    bias = torch.randn(1, 1, 9, 12, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        torch.manual_seed(4)
        out, _, lse = F.attention(
            q, k, v, bias, causal="bottom_right", dropout_p=0.3, return_lse=True
        )
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    assert torch.autograd.gradgradcheck(f, (q, k, v, bias))
    _, _, lse0 = F.attention(q, k, v, bias, causal="bottom_right", return_lse=True)
    torch.testing.assert_close(f(q, k, v, bias)[1], lse0, rtol=0, atol=0)

    x = torch.randn(1, 2, 64, 16, requires_grad=True)
    fn = torch.compile(
        lambda x: F.attention(x, x, x, causal=True, dropout_p=0.5)[0], fullgraph=True
    )
    a, b = fn(x), fn(x)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    a = fn(x)
    torch.manual_seed(3)
    want = F.attention(x, x, x, causal=True, dropout_p=0.5)[0]
    torch.testing.assert_close(a, want)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gw,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(ga, gw)

    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    y = torch.randn(1, 2, 300, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.attention(y, y, y, dropout_p=0.2)
    assert (1, 2, 300) in shapes and not any(s[-2:] == (300, 300) for s in shapes), shapes


_COMPOSED_RUN = r"""
import json, torch, pyformer.functional as F, pyformer.reference as ref
from pyformer.testing import rel_err
g = torch.Generator().manual_seed(8)
res = {}
for dtype in (torch.float64, torch.float32, torch.bfloat16):
    q = torch.randn(2, 4, 50, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 70, 16, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(2, 1, 50, 70, generator=g, dtype=torch.float64)
    kl = torch.tensor([70, 0])  # the second batch fully masked
    args = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]
    torch.manual_seed(1)
    state = torch.get_rng_state()
    x = torch.zeros(1, 1, 1, 1)
    seed = int(torch.ops.pyformer.flash_attention(x, x, x, None, None, 0, None, 0.5)[2].item())
    torch.set_rng_state(state)
    out, _, lse = F.attention(*args, key_lengths=kl, causal="bottom_right", dropout_p=0.2,
                              return_lse=True)
    up = [t.detach().double().requires_grad_() for t in args]
    kw = dict(key_lengths=kl, causal="bottom_right")
    want, _ = ref.attention(*up, dropout_p=0.2, dropout_seed=seed, **kw)
    want_lse = ref.attention_lse(up[0], up[1], up[3], **kw)
    go, gl = torch.randn_like(want), torch.randn_like(want_lse).masked_fill(kl.view(2, 1, 1) == 0, 0)
    got = torch.autograd.grad((out, lse), args, (go.to(dtype), gl))
    exp = torch.autograd.grad((want, want_lse), up, (go, gl))
    ok = torch.isfinite(want_lse)
    res[str(dtype)] = dict(
        out=rel_err(out, want), lse=rel_err(lse[ok], want_lse[ok]),
        lse_masked=bool(torch.isneginf(lse[~ok]).all()),
        grads=[rel_err(a, b) for a, b in zip(got, exp)],
    )
print(json.dumps(res))
"""


def test_flash_op_composition_without_kernels():
    """PYFORMER_CPU_FLASH=0: the CPU declines the flash kernels as a device without them does,
    and the flash op runs the host's bmm composition, CUDA's path today (its lse from the
    probabilities in float32): out, lse and every gradient, dropout and a fully masked batch
    included, against the float64 reference."""
    env = dict(os.environ, PYFORMER_CPU_FLASH="0")
    run = subprocess.run(
        [sys.executable, "-c", _COMPOSED_RUN], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    for dtype, tol in (("torch.float64", 1e-12), ("torch.float32", 2e-6), ("torch.bfloat16", 2e-2)):
        r = res[dtype]
        assert r["lse_masked"], r
        assert r["out"] < tol and max(r["grads"]) < tol, (dtype, r)
        # lse comes from float32 probabilities for every dtype but float64
        assert r["lse"] < (1e-12 if dtype == "torch.float64" else 2e-6), (dtype, r)


def test_flash_node_saves_no_probabilities():
    """The autograd graph of a training call without need_weights holds q, k, v, out and lse
    only, nothing of size Lq x Lk; with need_weights it holds the probabilities."""
    q, k, v = (torch.randn(1, 2, 300, 16, requires_grad=True) for _ in range(3))

    def saved_shapes(**kw):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.attention(q, k, v, causal=True, **kw)
        return shapes

    flash = saved_shapes()
    assert (1, 2, 300) in flash and not any(s[-2:] == (300, 300) for s in flash), flash
    assert any(s[-2:] == (300, 300) for s in saved_shapes(need_weights=True))
    # a learned additive bias: still the flash node (the mask itself is an input, not saved)
    bias = torch.randn(1, 2, 1, 300, requires_grad=True)
    flash = saved_shapes(mask=bias)
    assert (1, 2, 300) in flash and not any(s[-2:] == (300, 300) for s in flash), flash


def test_flash_mask_gradient_matches_bmm_and_is_reproducible():
    """A learned bias that requires grad, broadcast over the batch (summed over it and the
    heads' groups): the flash backward's dmask equals the bmm algorithm's within float64
    rounding, and is bitwise the same run to run."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 130, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 260, 16, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 4, 130, 260, generator=g, dtype=torch.float64, requires_grad=True)
    kl = torch.tensor([260, 100, 1])
    go = torch.randn(3, 4, 130, 16, generator=g, dtype=torch.float64)
    grads = {}
    for alg in ("flash", "bmm", "flash"):
        out, _ = F.attention(q, k, v, bias, key_lengths=kl, causal="bottom_right", algorithm=alg)
        got = torch.autograd.grad(out, (q, bias), go)
        if alg in grads:
            assert all(torch.equal(a, b) for a, b in zip(got, grads[alg]))
        grads[alg] = got
    for a, b in zip(grads["flash"], grads["bmm"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads["flash"][1][..., 100:].abs().sum() > 0  # rows of batch 0 reach those keys


@pytest.mark.parametrize("Lk", [8192, 16384])
def test_flash_decode_and_long_rows(Lk):
    """One query row (decode) and a few (a short prefill chunk, bottom-right aligned) against
    long caches with right padding."""
    for Lq, causal in ((1, False), (3, "bottom_right")):
        q, k, v, g = _inputs(2, 4, 2, Lq, Lk, 64, 64, seed=Lk + Lq)
        kl = torch.tensor([Lk, Lk // 3])
        verify(
            lambda q, k, v: F.attention(q, k, v, key_lengths=kl, causal=causal)[0],
            lambda q, k, v: ref.attention(q, k, v, key_lengths=kl, causal=causal)[0],
            dict(q=q, k=k, v=v),
            dtype=torch.float32,
            device="cpu",
            generator=g,
        ).assert_ok(f"Lq={Lq} Lk={Lk}")


def test_flash_is_bitwise_reproducible():
    """The same inputs give the same bits run to run, with the keys split across threads or
    not."""
    for shape in ((1, 2, 1, 1, 4099, 64, 64), (2, 4, 2, 130, 600, 32, 32)):
        q, k, v, _ = _inputs(*shape, seed=1)
        q, k, v = q.float(), k.float(), v.float()
        runs = [F.attention(q, k, v, causal="bottom_right")[0] for _ in range(3)]
        assert all(torch.equal(r, runs[0]) for r in runs[1:]), shape


_PEAK = r"""
import json, resource, sys, torch
import pyformer.functional as F
L, H, D = int(sys.argv[1]), 8, 64
q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
with torch.no_grad():
    F.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True)  # load everything first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, _ = F.attention(q, k, v, causal=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_kib": after - before, "finite": bool(out.isfinite().all())}))
"""


def test_flash_memory_does_not_grow_as_lq_times_lk():
    """Inference at L = 4096 with 8 heads: the (B, H, Lq, Lk) float32 scores would be 512 MiB;
    the flash kernel's extra peak memory (resident set, measured in a fresh process) stays under
    32 MiB."""
    L = 4096
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, str(L)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["finite"]
    scores_mib = 8 * L * L * 4 / 2**20
    assert got["extra_kib"] / 1024 < 32, (got, scores_mib)


_TRAIN_PEAK = r"""
import json, resource, sys, torch
import pyformer.functional as F
L, H, D = int(sys.argv[1]), 4, 64
q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
small = [t[:, :, :64].detach().requires_grad_() for t in (q, k, v)]
F.attention(*small, causal=True)[0].sum().backward()  # load everything first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, _ = F.attention(q, k, v, causal=True)
out.sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_kib": after - before, "finite": bool(q.grad.isfinite().all())}))
"""


def test_flash_training_memory_does_not_grow_as_lq_times_lk():
    """A training step (forward and backward) at L = 4096 with 4 heads: the probabilities and
    their gradient would be 256 MiB each in float32; the flash node's extra peak memory stays
    under 48 MiB (q, k, v and their gradients are 16 MiB)."""
    L = 4096
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", _TRAIN_PEAK, str(L)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["finite"]
    assert got["extra_kib"] / 1024 < 48, got


def test_algorithm_argument():
    """algorithm="flash" and "bmm" agree (output and gradients); "bmm" keeps the probabilities
    for its backward, "flash" does not; "flash" refuses what it cannot do, by name."""
    q, k, v, _ = _inputs(2, 4, 2, 70, 300, 16, 16, seed=9)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    kl = torch.tensor([300, 120])
    res = {}
    for alg in ("flash", "bmm", "auto"):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, w = F.attention(q, k, v, key_lengths=kl, causal="bottom_right", algorithm=alg)
        assert w is None
        res[alg] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
        res[alg + " probs saved"] = any(s[-2:] == (70, 300) for s in shapes)
    assert res["bmm probs saved"] and not res["flash probs saved"]
    assert not res["auto probs saved"]  # auto: flash here
    for a, b in zip(res["flash"], res["bmm"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            F.attention(q, k, v, algorithm="bmm")[0], F.attention(q, k, v, algorithm="flash")[0]
        )
    with pytest.raises(ValueError, match="need_weights"):
        F.attention(q, k, v, need_weights=True, algorithm="flash")
    with pytest.raises(ValueError, match="algorithm"):
        F.attention(q, k, v, algorithm="fast")
    # need_weights with bmm returns them
    out, w = F.attention(q, k, v, need_weights=True, algorithm="bmm")
    assert w.shape == (2, 4, 70, 300)


_HALF_RUN = r"""
import json, sys, torch, pyformer, pyformer.functional as F
out = {}
for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 300, 64, generator=g).to(dtype) for _ in range(3))
    with torch.no_grad():
        out[name] = F.attention(q, k, v, causal=True)[0].float().tolist()
print(json.dumps({"half_gemm": pyformer.backends()["cpu_half_gemm"], "out": out}))
"""


def test_half_types_with_and_without_the_mixed_precision_gemm():
    """bfloat16 and float16 flash attention through the BLAS's mixed-precision GEMM (where the
    BLAS has it and the CPU computes in the type) and, with PYFORMER_CPU_HALF_GEMM=0, on blocks
    converted to float: both within the dtype's bound of the float64 reference, and different
    from each other exactly where the mixed-precision path exists (so both really ran)."""
    runs = {}
    for switch in ("1", "0"):
        env = dict(os.environ, PYFORMER_CPU_HALF_GEMM=switch)
        run = subprocess.run(
            [sys.executable, "-c", _HALF_RUN], capture_output=True, text=True, env=env, timeout=300
        )
        assert run.returncode == 0, run.stderr
        runs[switch] = json.loads(run.stdout.strip().splitlines()[-1])
    assert runs["0"]["half_gemm"] == ""
    for name, dtype, bound in (("bf16", torch.bfloat16, 1.6e-2), ("fp16", torch.float16, 2e-3)):
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 4, 300, 64, generator=g).to(dtype).double() for _ in range(3))
        want = ref.attention(q, k, v, causal=True)[0]
        outs = {s: torch.tensor(r["out"][name], dtype=torch.float64) for s, r in runs.items()}
        for s, out in outs.items():
            err = ((out - want).norm() / want.norm()).item()
            assert err < bound, (name, s, err)
        assert torch.equal(outs["0"], outs["1"]) != (name in runs["1"]["half_gemm"]), name


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_return_lse_matches_reference(dtype, kind):
    """attention(..., return_lse=True): out and the log-sum-exp of each row's logits (-inf for a
    fully masked row) against the reference's, and the gradients flowing from both (through
    lse too: d lse / d logits = probs) to q, k, v and an additive mask."""
    shape = (2, 4, 2, BLOCK_Q + 1, BLOCK_K + 1, 32, 16)
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v, g = _inputs(*shape, seed=zlib.crc32(f"lse{kind}".encode()) % 1000)
    mask, causal, kl = make_mask(kind, B, H, Lq, Lk, generator=g)
    kw = dict(causal=causal, key_lengths=kl)

    def impl(q, k, v, mask):
        out, w, lse = F.attention(q, k, v, mask, return_lse=True, **kw)
        assert w is None
        assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
        return out, lse.to(q.dtype)  # verify holds every output to the tested dtype

    def reference(q, k, v, mask):
        return ref.attention(q, k, v, mask, **kw)[0], ref.attention_lse(q, k, mask, **kw)

    verify(
        impl,
        reference,
        dict(q=q, k=k, v=v, mask=mask),
        dtype=dtype,
        device="cpu",
        grad=["q", "k", "v"] + (["mask"] if kind.startswith("float") else []),
        generator=g,
    ).assert_ok(kind)


def test_return_lse_merges_key_chunks():
    """What lse is for: attention over two chunks of the keys, merged by their lse, is attention
    over all of them, forward and backward (the gradient flows through both lse)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (
        torch.randn(2, 4, 70, 32, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    kl = torch.tensor([70, 41])
    full, _ = F.attention(q, k, v, key_lengths=kl)
    o1, _, l1 = F.attention(q, k[:, :, :30], v[:, :, :30], return_lse=True)
    o2, _, l2 = F.attention(q, k[:, :, 30:], v[:, :, 30:], key_lengths=kl - 30, return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp().unsqueeze(-1) + o2 * (l2 - lse).exp().unsqueeze(-1)
    torch.testing.assert_close(merged, full, rtol=1e-12, atol=1e-12)
    go = torch.randn(full.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(full, (q, k, v), go)
    got = torch.autograd.grad(merged, (q, k, v), go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the lse of a fully masked row is -inf, and only lse carrying a gradient works too
    _, _, lse0 = F.attention(q, k, v, key_lengths=torch.tensor([0, 5]), return_lse=True)
    assert torch.isneginf(lse0[0]).all() and torch.isfinite(lse0[1]).all()
    (gq,) = torch.autograd.grad(lse0[1].sum(), q)
    assert torch.isfinite(gq).all() and gq[0].abs().sum() == 0 and gq[1].abs().sum() > 0


def test_return_lse_errors_and_compile():
    q = torch.randn(1, 2, 8, 16)
    for kw, what in (
        (dict(need_weights=True), "need_weights"),
        (dict(algorithm="bmm"), "bmm"),
        (dict(scale=0.0), "scale=0"),
    ):
        with pytest.raises(ValueError, match=what):
            F.attention(q, q, q, return_lse=True, **kw)
    with pytest.raises(ValueError, match="algorithm"):
        F.attention(q, q, q, return_lse=True, algorithm="fast")
    with pytest.raises(ValueError, match="D > 0"):
        F.attention(q[..., :0], q[..., :0], q, return_lse=True)
    q.requires_grad_()
    fn = torch.compile(lambda q: F.attention(q, q, q, causal=True, return_lse=True), fullgraph=True)
    out, w, lse = fn(q)
    want_out, _, want_lse = F.attention(q, q, q, causal=True, return_lse=True)
    assert w is None
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    (got,) = torch.autograd.grad(out.sum() + lse.sum(), q)
    (want,) = torch.autograd.grad(want_out.sum() + want_lse.sum(), q)
    torch.testing.assert_close(got, want)


def test_return_lse_gradcheck_and_nonfinite_fallback():
    """gradcheck and gradgradcheck through out and lse (the double backward runs the ATen
    formulas); and a NaN in a masked key's value row, where the flash backward declines and the
    bmm backward runs with lse's gradient added: the reference's gradients, NaN pattern too."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(
        1, 4, 5, 4, generator=g, dtype=torch.float64
    )  # grouped: 2 query heads a kv head
    k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    kl = torch.tensor([3])

    def fn(q, k, v):
        out, _, lse = F.attention(q, k, v, key_lengths=kl, causal="bottom_right", return_lse=True)
        return out, lse

    args = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    v_nan = v.clone()
    v_nan[0, 1, 4, 2] = float("nan")  # key 4 is past key_lengths: masked
    kw = dict(key_lengths=kl)

    def impl(q, k, v):
        out, _, lse = F.attention(q, k, v, return_lse=True, **kw)
        return out, lse

    def reference(q, k, v):
        return ref.attention(q, k, v, **kw)[0], ref.attention_lse(q, k, **kw)

    verify(
        impl,
        reference,
        dict(q=q, k=k, v=v_nan),
        dtype=torch.float64,
        device="cpu",
        grad=["q", "k", "v"],
        generator=g,
    ).assert_ok("NaN at a masked value row")


def test_return_lse_without_keys():
    """No keys at all (an empty chunk when merging by lse): zero output, lse -inf, zero
    gradients, with the keys split across threads (few heads) or not."""
    for b, h in ((1, 1), (4, 8)):
        q = torch.randn(b, h, 3, 8, requires_grad=True)
        kv = torch.randn(b, h, 0, 8, requires_grad=True)
        out, _, lse = F.attention(q, kv, kv, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        gq, gkv = torch.autograd.grad(out.sum() + lse.exp().sum(), (q, kv))
        assert torch.equal(gq, torch.zeros_like(q)) and gkv.shape == kv.shape


def test_flash_nonfinite_key_past_some_blocks_limits():
    """A NaN value row and an inf key row past the causal limit of the first query blocks but
    not the last: every block reads them (0 * NaN reaches every row's output, as in the
    reference), with one scan per head deciding the key ends of all its blocks."""
    q, k, v, g = _inputs(1, 2, 1, 2 * BLOCK_Q + 44, 2 * BLOCK_Q + 44, 16, 16, seed=4)
    v[0, 0, BLOCK_Q + 70, 3] = float("nan")
    k[0, 0, 2 * BLOCK_Q + 10, 1] = float("inf")
    verify(
        lambda q, k, v: F.attention(q, k, v, causal=True)[0],
        lambda q, k, v: ref.attention(q, k, v, causal=True)[0],
        dict(q=q, k=k, v=v),
        dtype=torch.float32,
        device="cpu",
        generator=g,
    ).assert_ok("non-finite rows past the first blocks' limits")


def test_flash_mask_changed_in_place_before_backward_raises():
    """The flash node reads the mask again in its backward: a learned bias changed in place in
    between (an optimizer step too early) raises autograd's error, never a silent wrong
    gradient."""
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    bias = torch.randn(1, 2, 8, 8, requires_grad=True)
    out, _ = F.attention(q, q, q, bias)
    with torch.no_grad():
        bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
