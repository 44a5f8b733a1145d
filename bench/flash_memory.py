"""Extra peak memory of causal attention inference: pyformer's flash algorithm vs torch's SDPA.

    python bench/flash_memory.py                      # (1, 8, 16384, 64) float32, the target
    python bench/flash_memory.py --lengths 4096 16384 --json out.json

Each measurement runs in a fresh process: q, k, v (1, H, L, D) are made and one small call loads
every library, then the peak resident set (``ru_maxrss``) is read before and after one causal
forward under ``torch.no_grad``; the difference is the call's extra peak memory (its output
included: (1, H, L, D) float32 is 32 MiB at L = 16384, H = 8, D = 64). The (B, H, L, L) scores
that an unfused attention forms would take 8 GiB there. The two providers alternate, ``--repeats``
times each, and the table shows the largest of each provider's repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_RUN = r"""
import json, resource, sys, torch
import torch.nn.functional as F
import pyformer.functional as pf
provider, L, H, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
fn = {
    "pyformer": lambda q, k, v: pf.attention(q, k, v, causal=True)[0],
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}[provider]
with torch.no_grad():
    fn(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # load everything first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn(q, k, v)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (after - before) / 1024, "finite": bool(out.isfinite().all())}))
"""


def measure(provider: str, length: int, heads: int, dim: int) -> float:
    run = subprocess.run(
        [sys.executable, "-c", _RUN, provider, str(length), str(heads), str(dim)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=True,
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if not got["finite"]:
        raise RuntimeError(f"{provider} at L = {length} returned non-finite values")
    return got["extra_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    import pyformer

    print(
        f"torch {torch.__version__}; pyformer {pyformer.__version__}; threads "
        f"{torch.get_num_threads()}; float32, causal, q, k, v (1, {a.heads}, L, {a.dim})"
    )
    rows = []
    for length in a.lengths:
        got = {"pyformer": [], "sdpa": []}
        for _ in range(a.repeats):
            for provider in got:
                got[provider].append(measure(provider, length, a.heads, a.dim))
        row = {"L": length, **{p: max(v) for p, v in got.items()}, "runs": got}
        row["ratio"] = row["pyformer"] / row["sdpa"] if row["sdpa"] > 0 else float("inf")
        rows.append(row)
    print(f"{'L':>6}  {'pyformer MiB':>12}  {'SDPA MiB':>9}  {'pyformer / SDPA':>15}")
    for r in rows:
        print(f"{r['L']:>6}  {r['pyformer']:>12.1f}  {r['sdpa']:>9.1f}  {r['ratio']:>15.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
