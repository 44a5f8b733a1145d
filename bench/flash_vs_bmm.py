"""pyformer's two attention algorithms against each other on the CPU: what ``algorithm="auto"``
would gain from choosing bmm anywhere.

    python bench/flash_vs_bmm.py

float32 forwards under ``torch.no_grad`` of q, k, v (B, H, L, D), with key lengths drawn in
[L/2, L] and causal, at short and middle lengths; each time is the median of
``torch.utils.benchmark``'s blocked_autorange (0.5 s per measurement). The ratio is bmm's time
over flash's (above 1: flash is faster).
"""

from __future__ import annotations

import torch
from torch.utils import benchmark

import pyformer
import pyformer.functional as pf

SHAPES = [
    (8, 12, 32, 64),
    (8, 12, 64, 64),
    (8, 12, 128, 64),
    (8, 12, 256, 64),
    (1, 8, 512, 64),
    (32, 12, 128, 64),
]


def _ms(fn, min_run_time: float = 0.5) -> float:
    """Median milliseconds of ``fn()`` over torch.utils.benchmark's blocked_autorange."""
    t = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return t.median * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}; pyformer {pyformer.__version__}; threads "
        f"{torch.get_num_threads()}; float32 forward, no_grad"
    )
    print(f"{'shape':<18} {'mask':<11} {'flash ms':>9} {'bmm ms':>8} {'bmm / flash':>11}")
    for b, h, length, d in SHAPES:
        q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
        lens = torch.randint(length // 2, length + 1, (b,))
        for name, kw in (("key_lengths", dict(key_lengths=lens)), ("causal", dict(causal=True))):
            with torch.no_grad():
                flash = _ms(lambda: pf.attention(q, k, v, algorithm="flash", **kw))
                bmm = _ms(lambda: pf.attention(q, k, v, algorithm="bmm", **kw))
            shape = str((b, h, length, d))
            print(f"{shape:<18} {name:<11} {flash:>9.2f} {bmm:>8.2f} {bmm / flash:>11.2f}")


if __name__ == "__main__":
    main()
