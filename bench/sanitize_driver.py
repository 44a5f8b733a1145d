"""A small run of every pyformer CUDA kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck  python bench/sanitize_driver.py
    compute-sanitizer --tool racecheck python bench/sanitize_driver.py --quick

Shapes are tiny but chosen to reach every kernel variant: masked_softmax's small and large
warp-per-row paths, the block-per-row path, the long-row path with and without the shared-memory
row cache, vectorized and scalar (odd length) loads, every mask kind; layer_norm's and
add_layer_norm's same row paths plus the dweight/dbias partial and final kernels; scaled_qk's
tensor-core (vectorized and scalar loads) and SIMT kernels; attention forward and backward, with
and without dropout. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck so an
out-of-bounds access cannot hide inside a cached block. Exits 0 after printing "ok"; the
sanitizer's own summary says whether it found errors. Values are not checked here (the tests do).
"""

from __future__ import annotations

import argparse
import sys

import torch

import pyformer.functional as F

P = torch.ops.pyformer


def softmax_cases(dtypes, lengths):
    for dtype in dtypes:
        for Lk in lengths:
            B, H, Lq = 2, 2, 3
            x = torch.randn((B, H, Lq, Lk), device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            bool_mask = torch.rand((B, 1, 1, Lk), device="cuda") > 0.3
            float_mask = torch.randn((1, H, Lq, Lk), device="cuda", dtype=dtype)
            float_mask[..., ::5] = float("-inf")
            lastdim1 = torch.rand((B, 1, Lq, 1), device="cuda") > 0.5
            kl = torch.tensor([Lk // 2, Lk], device="cuda")
            for mask, causal, lens in [
                (None, False, None),
                (bool_mask, False, None),
                (float_mask, False, None),
                (lastdim1, False, None),
                (None, True, None),
                (None, False, kl),
                (bool_mask, True, kl),
            ]:
                y = P.masked_softmax(x, mask, 0.5, causal, lens)
                P.masked_softmax_backward(dy, y, 0.5)
            # odd offset: scalar loads
            xs = x.reshape(-1)[1:].narrow(0, 0, Lk - 1 if Lk > 1 else 1)
            P.masked_softmax(xs.reshape(1, -1), None, 1.0, False, None)


def layer_norm_cases(dtypes, widths):
    for dtype in dtypes:
        for N in widths:
            x = torch.randn((5, N), device="cuda", dtype=dtype)
            r = torch.randn_like(x)
            w = torch.randn(N, device="cuda", dtype=dtype)
            b = torch.randn(N, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            for ww, bb in [(w, b), (None, None)]:
                y, mean, rstd = P.layer_norm(x, [N], ww, bb, 1e-5)
                P.layer_norm_backward(dy, x, mean, rstd, ww, [N])
                P.add_layer_norm(x, r, [N], ww, bb, 1e-5)


def scaled_qk_cases(dtypes):
    for dtype in dtypes:
        for Lq, Lk, D in [(70, 33, 64), (5, 130, 7), (64, 64, 80)]:
            q = torch.randn((2, 2, Lq, D), device="cuda", dtype=dtype)
            k = torch.randn((2, 2, Lk, D), device="cuda", dtype=dtype)
            s = P.scaled_qk(q, k, 0.125)
            P.scaled_qk_backward(torch.randn_like(s), q, k, 0.125)


def attention_cases(dtypes):
    for dtype in dtypes:
        q = torch.randn((2, 2, 33, 16), device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn((2, 2, 70, 16), device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn((2, 2, 70, 24), device="cuda", dtype=dtype, requires_grad=True)
        kl = torch.tensor([0, 50], device="cuda")
        mask = torch.rand((2, 1, 1, 70), device="cuda") > 0.2
        for p in (0.0, 0.25):
            out, probs = F.attention(
                q, k, v, mask, causal=True, key_lengths=kl, dropout_p=p, need_weights=True
            )
            (out.sum() + probs.sum()).backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer dtypes and lengths (racecheck)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.quick:
        dtypes = [torch.bfloat16, torch.float32]
        lengths = [7, 200, 1000, 9000, 9001, 20000]
        widths = [7, 256, 1000, 1001, 9000, 9001]
    else:
        dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
        # warp small / warp large / block / long (cached for 2-byte types) / long; lengths no
        # vector width divides (1, 7, 301, 4097, 9001) take the scalar (VEC 1) kernels, forward
        # and backward, on every path
        lengths = [1, 7, 128, 200, 301, 512, 1000, 4097, 8192, 9000, 9001, 20000, 65536]
        # the same for the norms: 264 is the vectorized large-warp path of 2-byte types, 301,
        # 1001 and 9001 the scalar large-warp, block and long paths (float64 scalar dx: long)
        widths = [1, 7, 128, 256, 264, 301, 500, 1000, 1001, 4096, 9000, 9001]
    softmax_cases(dtypes, lengths)
    layer_norm_cases(dtypes, widths)
    scaled_qk_cases(dtypes)
    attention_cases([d for d in dtypes if d != torch.float64] or dtypes)
    torch.cuda.synchronize()
    print("sanitize_driver: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
