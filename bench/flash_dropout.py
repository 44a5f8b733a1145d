"""Attention dropout in training on the CPU: pyformer's flash algorithm (mask regenerated from a
Philox key in the backward) against its bmm algorithm (mask formed and saved), the flash algorithm
without dropout (what the generator costs) and ``F.scaled_dot_product_attention`` with the same
``dropout_p``.

    python bench/flash_dropout.py

float32 forward + backward of q, k, v (B, H, L, D) requiring grad, ``dropout_p = 0.1``; each time
is the median of ``torch.utils.benchmark``'s blocked_autorange (1 s per measurement). Ratios are
the other's time over flash-with-dropout's (above 1: flash with dropout is faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as tf
import flash_vs_bmm  # beside this script: its timer

import pyformer
import pyformer.functional as pf

P = 0.1
CASES = [
    ("(8,12,512,64) key_lengths", (8, 12, 512, 64), "key_lengths"),
    ("(1,8,4096,64) causal", (1, 8, 4096, 64), "causal"),
]


def _ms(fn) -> float:
    return flash_vs_bmm._ms(fn, min_run_time=1.0)


def main() -> None:
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}; pyformer {pyformer.__version__}; threads "
        f"{torch.get_num_threads()}; float32 forward+backward, dropout_p={P}"
    )
    cols = ("flash+drop", "flash", "bmm+drop", "sdpa+drop")
    print(f"{'case':<28}" + "".join(f"{c + ' ms':>14}" for c in cols) + "   ratios vs flash+drop")
    for name, (b, h, length, d), kind in CASES:
        q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
        go = torch.randn(b, h, length, d)
        if kind == "causal":
            kw, sd = dict(causal=True), dict(is_causal=True)
        else:
            lens = torch.randint(length // 2, length + 1, (b,))
            kw = dict(key_lengths=lens)
            sd = dict(attn_mask=(torch.arange(length) < lens[:, None])[:, None, None, :])

        def step(fn):
            return lambda: torch.autograd.backward(fn(), go)

        times = [
            _ms(step(lambda: pf.attention(q, k, v, dropout_p=P, algorithm="flash", **kw)[0])),
            _ms(step(lambda: pf.attention(q, k, v, algorithm="flash", **kw)[0])),
            _ms(step(lambda: pf.attention(q, k, v, dropout_p=P, algorithm="bmm", **kw)[0])),
            _ms(step(lambda: tf.scaled_dot_product_attention(q, k, v, dropout_p=P, **sd))),
        ]
        ratios = " ".join(f"{c}={t / times[0]:.2f}x" for c, t in zip(cols[1:], times[1:]))
        print(f"{name:<28}" + "".join(f"{t:>14.1f}" for t in times) + f"   {ratios}")


if __name__ == "__main__":
    main()
