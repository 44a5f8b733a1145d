"""Timing a callable on one device, and the reference rates a bench compares against.

One entry point, :func:`measure`: on CUDA it uses CUDA events after a warm-up, with the L2 cache
flushed (a buffer of twice its size is overwritten) before every repeat; on the CPU it uses
:mod:`torch.utils.benchmark` (``blocked_autorange``, all of torch's threads). Both report the
median and the 20th and 80th percentiles of the per-call times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
from torch.utils import benchmark

MIN_SAMPLES = 5


@dataclass
class Timing:
    """Per-call times in milliseconds: median, 20th and 80th percentile, and sample count."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int

    @classmethod
    def from_seconds(cls, times: Sequence[float]) -> "Timing":
        t = torch.tensor(list(times), dtype=torch.float64) * 1e3
        q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        return cls(float(q[0]), float(q[1]), float(q[2]), len(times))


def measure(fn: Callable[[], object], device: str, min_run_time: float = 0.5) -> Timing:
    """Time ``fn()`` on ``device`` (``"cpu"`` or ``"cuda"``).

    Args:
        fn: the work to time; called once first as a warm-up.
        device: where ``fn`` runs.
        min_run_time: seconds of measurement to aim for (at least 5 samples are taken).
    """
    if device == "cuda":
        return _measure_cuda(fn, min_run_time)
    return _measure_cpu(fn, min_run_time)


def _measure_cpu(fn, min_run_time: float) -> Timing:
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times: List[float] = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    while len(times) < MIN_SAMPLES:  # a slow fn: blocked_autorange may return few blocks
        times.extend(timer.timeit(number=1).times)
    return Timing.from_seconds(times)


_flush_buffers = {}


def _l2_flush_buffer() -> torch.Tensor:
    """A byte buffer twice the size of the current GPU's L2 cache (kept between calls)."""
    dev = torch.cuda.current_device()
    if dev not in _flush_buffers:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 * 2**20
        _flush_buffers[dev] = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
    return _flush_buffers[dev]


def _measure_cuda(fn, min_run_time: float, warmup: int = 3, max_reps: int = 1000) -> Timing:
    flush = _l2_flush_buffer()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    # Estimate one call to choose the repeat count.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est_s = max(start.elapsed_time(end) * 1e-3, 1e-6)
    reps = int(min(max_reps, max(MIN_SAMPLES * 2, min_run_time / est_s)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()  # evict the inputs from L2: every repeat starts cold
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return Timing.from_seconds([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])


def copy_bandwidth(device: str, nbytes: int, min_run_time: float) -> float:
    """Achieved ``dst.copy_(src)`` bandwidth in GB/s (bytes read plus bytes written, per second)
    for float32 tensors of ``nbytes`` each: the memory ceiling for the memory-bound ops."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, min_run_time)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


def matmul_rate(device: str, dtype: torch.dtype, n: int, min_run_time: float) -> float:
    """Achieved TFLOP/s of an ``n x n`` by ``n x n`` matrix product in ``dtype``: the compute
    ceiling the attention rows are compared with."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: torch.matmul(a, b), device, min_run_time)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12
