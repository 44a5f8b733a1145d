"""Accuracy of attention in bfloat16 and float16 on the CPU: pyformer, the pure-PyTorch
composition in the same dtype, and torch's SDPA, against the float64 reference.

    python bench/half_accuracy.py
    PYFORMER_CPU_HALF_GEMM=0 python bench/half_accuracy.py   # half types converted to float

q, k, v (2, 4, 1000, 64), causal; the relative Frobenius error of the output and of dq, dk, dv
(cotangent drawn once, the same for all). Prints the CPU's half-type flags and which path
pyformer's flash kernel takes (``pyformer.backends()["cpu_half_gemm"]``).
"""

from __future__ import annotations

import torch

import pyformer
import pyformer.functional as F
import pyformer.reference as ref


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(x for x in f if x.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    want = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    have = set(line.split(":", 1)[1].split())
    return " ".join(w for w in want if w in have) or "none of " + " ".join(want)


def main() -> None:
    print(
        f"torch {torch.__version__}; pyformer {pyformer.__version__}; CPU flags: {_flags()}; "
        f"half-type GEMM: {pyformer.backends()['cpu_half_gemm'] or 'none'}"
    )
    g = torch.Generator().manual_seed(4)
    for dt in (torch.bfloat16, torch.float16):
        q, k, v, go = (torch.randn(2, 4, 1000, 64, generator=g).to(dt) for _ in range(4))

        def run(fn, dtype):
            x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*x)
            grads = torch.autograd.grad(out, x, go.to(dtype))
            return [t.double() for t in (out, *grads)]

        want = run(lambda a, b, c: ref.attention(a, b, c, causal=True)[0], torch.float64)
        providers = {
            "pyformer": lambda a, b, c: F.attention(a, b, c, causal=True)[0],
            "composition": lambda a, b, c: ref.attention(a, b, c, causal=True)[0],
            "sdpa": lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
                a, b, c, is_causal=True
            ),
        }
        print(f"{dt}: relative error of out, dq, dk, dv")
        for name, fn in providers.items():
            errs = [((a - w).norm() / w.norm()).item() for a, w in zip(run(fn, dt), want)]
            print(f"  {name:<12} " + "  ".join(f"{e:.2e}" for e in errs))


if __name__ == "__main__":
    main()
