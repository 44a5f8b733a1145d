"""``pyformer bench``: pyformer against the textbook composition and PyTorch's fused ops."""

from __future__ import annotations

import csv
import gc
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import click
import torch
from torch import Tensor

from pyformer.testing import Judgement, judge

from .benchcases import (
    COMPUTE_OPS,
    MODES,
    OPS,
    BenchConfig,
    Problem,
    Provider,
    check_targets,
    parse_sizes,
)
from .common import (
    DTYPE_NAMES,
    DTYPES,
    device_name,
    device_option,
    dtype_option,
    environment,
    format_table,
    json_option,
    op_option,
    resolve_devices,
    write_json,
)
from .timing import Timing, copy_bandwidth, matmul_rate, measure

PROVIDERS = ("pyformer", "textbook", "torch")


@dataclass
class Budget:
    """How long to measure: per timing, and the sizes of the reference measurements."""

    min_run_time: float
    copy_bytes: Dict[str, int]
    matmul_n: Dict[str, int]


FULL = Budget(0.5, {"cpu": 256 * 2**20, "cuda": 2**30}, {"cpu": 2048, "cuda": 8192})
QUICK = Budget(0.05, {"cpu": 32 * 2**20, "cuda": 2**28}, {"cpu": 1024, "cuda": 4096})


@dataclass
class BenchRow:
    """One (config, dtype, mode) on one device: every provider's timing and the derived rates."""

    device: str
    device_name: str
    op: str
    variant: str
    shape: str
    size: int
    dtype: str
    mode: str
    torch_label: str
    timings: Dict[str, Optional[Timing]] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)  # provider -> why it has no timing
    speedup: Dict[str, Optional[float]] = field(default_factory=dict)  # baseline -> x faster
    gbps: Dict[str, float] = field(default_factory=dict)
    tflops: Dict[str, float] = field(default_factory=dict)
    copy_gbps: Optional[float] = None
    matmul_tflops: Optional[float] = None
    fwd_err: Optional[float] = None  # pyformer's forward vs the float64 reference
    fwd_tol: Optional[float] = None  # its bound (docs/ops.md)


# ----------------------------------------------------------------------------- timing one problem


def _outputs(result) -> List[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    return [t for t in result if isinstance(t, Tensor)]


def _mode_fn(p: Provider, mode: str):
    """The callable timed for ``mode``: forward under ``torch.no_grad()``; backward alone (the
    forward graph built once, outside the timer, and kept); or forward then backward."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return p.fn()

        return forward
    outs = _outputs(p.fn())
    cots = [torch.randn_like(o) for o in outs]
    if mode == "backward":
        return lambda: torch.autograd.grad(outs, p.leaves, cots, retain_graph=True)
    return lambda: torch.autograd.grad(_outputs(p.fn()), p.leaves, cots)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _agreement(problem: Problem, dtype: torch.dtype) -> Judgement:
    """pyformer's forward against the float64 reference on the same inputs, by
    :func:`pyformer.testing.judge` (the tests' and ``pyformer check``'s rule and bounds, the
    textbook composition in ``dtype`` as the composed result): checked before anything is timed."""
    with torch.no_grad():
        ours = _outputs(problem.providers["pyformer"].fn())[0]
        textbook = _outputs(problem.providers["textbook"].fn())[0]
        expect = _outputs(problem.reference())[0]
    return judge(ours, expect, dtype, textbook)


def time_problem(
    cfg: BenchConfig,
    problem: Problem,
    dtype: torch.dtype,
    device: str,
    modes: Sequence[str],
    budget: Budget,
    rates: dict,
) -> List[BenchRow]:
    """Time every provider of ``problem`` in every mode; one :class:`BenchRow` per mode."""
    try:
        verdict = _agreement(problem, dtype)
        err, tol = verdict.err, verdict.bound
    except Exception:  # the provider's own timing below reports the error
        err = tol = None
    rows = []
    for mode in modes:
        row = BenchRow(
            device,
            rates["name"],
            cfg.op,
            cfg.variant,
            cfg.shape,
            cfg.size,
            DTYPE_NAMES[dtype],
            mode,
            cfg.torch_label,
            fwd_err=err,
            fwd_tol=tol,
            copy_gbps=rates["copy"],
            matmul_tflops=rates["matmul"].get(dtype),
        )
        for name in PROVIDERS:
            if name not in problem.providers:
                continue
            try:
                row.timings[name] = measure(
                    _mode_fn(problem.providers[name], mode), device, budget.min_run_time
                )
            except Exception as exc:  # e.g. a dtype the provider rejects on this device
                row.timings[name] = None
                row.errors[name] = _first_line(exc)
        _derive(row, problem)
        rows.append(row)
    return rows


def _derive(row: BenchRow, problem: Problem) -> None:
    """Speedups over each baseline; GB/s or TFLOP/s of every provider that was timed."""
    ours = row.timings.get("pyformer")
    for base in ("textbook", "torch"):
        t = row.timings.get(base)
        if ours is not None and t is not None:
            row.speedup[base] = t.median_ms / ours.median_ms
    for name, t in row.timings.items():
        if t is None:
            continue
        seconds = t.median_ms * 1e-3
        if problem.bytes:
            row.gbps[name] = problem.bytes[row.mode] / seconds / 1e9
        if problem.flops:
            row.tflops[name] = problem.flops[row.mode] / seconds / 1e12


# ----------------------------------------------------------------------------- report


def _fmt_ms(x: float) -> str:
    """Milliseconds with about three significant digits."""
    return (
        f"{x:.0f}"
        if x >= 100
        else f"{x:.1f}"
        if x >= 10
        else f"{x:.2f}"
        if x >= 1
        else f"{x:.3f}"
        if x >= 0.01
        else f"{x:.4f}"
    )


def _ms(t: Optional[Timing]) -> str:
    return "n/a" if t is None else _fmt_ms(t.median_ms)


def _ms_range(t: Optional[Timing]) -> str:
    if t is None:
        return "n/a"
    return f"{_fmt_ms(t.median_ms)} [{_fmt_ms(t.p20_ms)}-{_fmt_ms(t.p80_ms)}]"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _achieved(row: BenchRow) -> str:
    """pyformer's rate and its share of the ceiling measured in the same run."""
    share = _share(row)
    pct = "" if math.isnan(share) else f" ({share:.0f}% {'copy' if row.gbps else 'mm'})"
    if "pyformer" in row.gbps:
        return f"{row.gbps['pyformer']:.3g} GB/s{pct}"
    if "pyformer" in row.tflops:
        return f"{row.tflops['pyformer']:.3g} TFLOP/s{pct}"
    return "-"


HEADERS = (
    "op",
    "variant",
    "shape",
    "dtype",
    "mode",
    "pyformer ms [p20-p80]",
    "textbook ms",
    "torch ms",
    "torch op",
    "vs textbook",
    "vs torch",
    "pyformer achieved",
)
RIGHT = (False, False, False, False, False, True, True, True, False, True, True, True)


def table_lines(rows: Sequence[BenchRow]) -> List[str]:
    cells = [
        [
            r.op,
            r.variant,
            r.shape,
            r.dtype,
            r.mode,
            _ms_range(r.timings.get("pyformer")),
            _ms(r.timings.get("textbook")),
            _ms(r.timings.get("torch")) if "torch" in r.timings else "-",
            r.torch_label,
            _x(r.speedup.get("textbook")),
            _x(r.speedup.get("torch")),
            _achieved(r),
        ]
        for r in rows
    ]
    return format_table(HEADERS, cells, RIGHT)


def _header_lines(device: str, rates: dict, sweep_name: str, budget: Budget) -> List[str]:
    env = environment()
    lines = [
        f"device: {device} - {rates['name']}; torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if device == "cuda" else "")
        + f"; pyformer {env['pyformer']}; sweep '{sweep_name}'",
        f"copy bandwidth: {rates['copy']:.1f} GB/s (copy_ of {budget.copy_bytes[device] >> 20}"
        f" MiB float32, read + write)",
    ]
    for dt, rate in rates["matmul"].items():
        n = budget.matmul_n[device]
        lines.append(f"matmul rate: {rate:.3g} TFLOP/s ({DTYPE_NAMES[dt]}, {n}x{n} @ {n}x{n})")
    timer = (
        "CUDA events after warm-up, L2 flushed before each repeat"
        if device == "cuda"
        else "torch.utils.benchmark blocked_autorange"
    )
    lines.append(f"timing: {timer}; median [p20-p80] of per-call times")
    if device == "cpu" and rates.get("load") is not None:
        # Another busy process makes torch's threads wait for each other at every parallel
        # region, which penalizes many-kernel compositions most: say so next to the numbers.
        busy = rates["load"] >= 0.5
        lines.append(
            f"load average before the run: {rates['load']:.2f} on {os.cpu_count()} CPUs"
            + (
                " - other processes were running: expect noisy CPU timings"
                " (run on an idle machine, or with --threads 1)"
                if busy
                else ""
            )
        )
    return lines


NOTES = """\
notes: forward runs under torch.no_grad(); backward times autograd.grad alone on a kept graph;
  both = forward + backward. textbook = pyformer.reference with zero_masked_rows=False (matmul,
  scale, masked_fill, softmax, matmul; layer norm from mean and var). torch op: F.softmax is timed
  alone on scores already scaled and masked outside the timer; attention baselines get the
  (B,1,1,Lk) bool mask equivalent to pyformer's key_lengths (lengths drawn uniformly in
  [Lk/2, Lk]). vs X = X's time / pyformer's (higher is better for pyformer). GB/s counts each
  input read once and each output written once (over 100% of copy: the data fit in cache);
  attention TFLOP/s counts 4*B*H*Lq*Lk*D (halved when causal) forward, twice that backward."""


# ----------------------------------------------------------------------------- files


def git_commit() -> str:
    """The commit of the source tree pyformer was imported from, or ``""``."""
    import pyformer

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(pyformer.__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


CSV_FIELDS = (
    "timestamp",
    "commit",
    "device",
    "device_name",
    "pyformer",
    "torch",
    "cuda",
    "op",
    "variant",
    "shape",
    "size",
    "dtype",
    "mode",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "pyformer_speedup",
    "gb_per_s",
    "copy_gb_per_s",
    "tflop_per_s",
    "matmul_tflop_per_s",
    "error",
)


def append_csv(path: str, rows: Sequence[BenchRow], stamp: str, commit: str) -> None:
    """Append one line per (row, provider) to ``path``, writing the header if the file is new."""
    env = environment()
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    ours = {id(r): r.timings.get("pyformer") for r in rows}
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            for name, t in r.timings.items():
                mine = ours[id(r)]
                w.writerow(
                    {
                        "timestamp": stamp,
                        "commit": commit,
                        "device": r.device,
                        "device_name": r.device_name,
                        "pyformer": env["pyformer"],
                        "torch": env["torch"],
                        "cuda": env["cuda"] or "",
                        "op": r.op,
                        "variant": r.variant,
                        "shape": r.shape,
                        "size": r.size,
                        "dtype": r.dtype,
                        "mode": r.mode,
                        "provider": name if name != "torch" else r.torch_label,
                        "median_ms": t.median_ms if t else "",
                        "p20_ms": t.p20_ms if t else "",
                        "p80_ms": t.p80_ms if t else "",
                        "pyformer_speedup": t.median_ms / mine.median_ms if t and mine else "",
                        "gb_per_s": r.gbps.get(name, ""),
                        "copy_gb_per_s": r.copy_gbps or "",
                        "tflop_per_s": r.tflops.get(name, ""),
                        "matmul_tflop_per_s": r.matmul_tflops or "",
                        "error": r.errors.get(name, ""),
                    }
                )


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or a usage error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise click.UsageError(
            "--plot needs matplotlib, which is not installed: "
            "pip install matplotlib (or pip install 'pyformer[bench]')."
        )
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(path: str, rows: Sequence[BenchRow]) -> None:
    """A PNG with one row of panels per mode: pyformer's speedup over each baseline (solid:
    textbook, dashed: PyTorch's fused op), and its achieved share of the copy bandwidth
    (memory-bound ops) or of the matmul rate (attention, scaled_qk), against size."""
    plt = _pyplot()
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(13, 4.2 * len(modes)), squeeze=False)
    several_devices = len({r.device for r in rows}) > 1
    keys = sorted({(r.device, r.op, r.variant, r.dtype) for r in rows})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(keys)}
    for (ax_speed, ax_rate), mode in zip(axes, modes):
        for key in keys:
            rs = sorted(
                (r for r in rows if r.mode == mode and (r.device, r.op, r.variant, r.dtype) == key),
                key=lambda r: r.size,
            )
            if not rs:
                continue
            dev, op, variant, dt = key
            label = f"{op} ({variant}) {dt}" + (f" {dev}" if several_devices else "")
            xs, color = [r.size for r in rs], colors[key]
            for base, style in (("textbook", "-o"), ("torch", "--s")):
                ys = [r.speedup.get(base, math.nan) for r in rs]
                if not all(math.isnan(y) for y in ys):
                    name = "textbook" if base == "textbook" else rs[0].torch_label
                    ax_speed.plot(xs, ys, style, color=color, label=f"{label} vs {name}")
            ax_rate.plot(
                xs,
                [_share(r) for r in rs],
                ":^" if op in COMPUTE_OPS else "-o",
                color=color,
                label=label + (" % matmul" if op in COMPUTE_OPS else " % copy"),
            )
        ax_speed.axhline(1.0, color="gray", lw=0.8)
        ax_speed.set(
            xscale="log",
            yscale="log",
            ylabel="speedup of pyformer (x)",
            title=f"{mode}: pyformer speedup (solid: textbook, dashed: torch op)",
        )
        ax_rate.set(
            xscale="log",
            ylabel="% of ceiling measured in this run",
            title=f"{mode}: achieved bandwidth (% copy) or compute (% matmul)",
        )
        for ax in (ax_speed, ax_rate):
            ax.set_xlabel("size: sequence length L (attention, softmax, qk) or hidden N (norms)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    names = "; ".join(sorted({r.device_name for r in rows}))
    fig.suptitle(f"pyformer bench on {names}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _share(r: BenchRow) -> float:
    """pyformer's achieved rate as a percentage of the ceiling measured in the same run."""
    if "pyformer" in r.gbps and r.copy_gbps:
        return 100 * r.gbps["pyformer"] / r.copy_gbps
    if "pyformer" in r.tflops and r.matmul_tflops:
        return 100 * r.tflops["pyformer"] / r.matmul_tflops
    return math.nan


# ----------------------------------------------------------------------------- the command


def _rates(device: str, dtypes, need_matmul: bool, budget: Budget) -> dict:
    """The ceilings every row is compared with, measured now, on this device."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    copy = copy_bandwidth(device, budget.copy_bytes[device], budget.min_run_time)
    matmul = (
        {dt: matmul_rate(device, dt, budget.matmul_n[device], budget.min_run_time) for dt in dtypes}
        if need_matmul
        else {}
    )
    return {"name": device_name(device), "copy": copy, "matmul": matmul, "load": load}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@click.command("bench")
@device_option
@op_option(OPS)
@dtype_option("float32 on the CPU, bfloat16 on CUDA")
@click.option(
    "--mode",
    "modes",
    type=click.Choice(MODES),
    multiple=True,
    help="forward, backward or both (forward+backward); repeat for several. "
    "Default: all three (for the target sweeps: the modes of their targets).",
)
@click.option(
    "--sizes",
    default="default",
    show_default=True,
    help="A sweep: 'default' (gpu on CUDA, cpu on the CPU, quick with --quick), "
    "'cpu' (L 128-1024, N 768-4096), 'gpu' (L 128-8192, N 768-8192, causal "
    "attention too), 'quick' (tiny), 'cpu-targets' (the three CPU speed targets, "
    "float32), 'gpu-targets' (the GPU speed targets, bf16 and fp16), 'per-call' "
    "(tiny shapes: each op's per-call cost against torch's, float32), 'cpu-flash' "
    "(attention at growing lengths and decode against torch's SDPA, float32), "
    "'flash-targets' (the CPU flash attention speed targets against SDPA), 'block-targets' "
    "(the CPU targets of rms_norm, apply_rotary and swiglu, float32), or sizes "
    "such as 256,1024 used as both sequence lengths and hidden sizes. The target "
    "sweeps end with their targets, met or not.",
)
@click.option(
    "--quick", is_flag=True, help="Tiny shapes and short timings: a smoke test, not a measurement."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch (torch.set_num_threads); default: torch's default. "
    "On a machine shared with other jobs, 1 thread gives steadier timings.",
)
@json_option
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append one row per provider (with device, versions, commit, time) to this CSV.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG of speedup and achieved bandwidth against size (needs matplotlib).",
)
def bench(device, ops, dtypes, modes, sizes, quick, seed, threads, json_path, csv_path, plot_path):
    """Time pyformer against the textbook composition and PyTorch's fused ops.

    \b
    The CPU speed targets:  pyformer bench --device cpu --sizes cpu-targets
    The GPU speed targets:  pyformer bench --device cuda --sizes gpu-targets
    A smoke test:           pyformer bench --device cpu --quick
    """
    devices = resolve_devices(device)
    if plot_path:
        _pyplot()  # fail before timing anything, not after
    budget = QUICK if quick else FULL
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    all_rows: List[BenchRow] = []
    report = []
    default_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for dev in devices:
            rows, summary, lines = run_device(
                dev, list(ops or OPS), dtypes, modes, sizes, quick, seed, budget
            )
            all_rows.extend(rows)
            report.append(summary)
            click.echo("\n".join(lines) + "\n")
    finally:
        torch.set_num_threads(default_threads)
    click.echo(NOTES)

    commit = git_commit()
    if json_path:
        write_json(
            json_path,
            {
                "command": "bench",
                "timestamp": stamp,
                "commit": commit,
                "environment": environment(),
                "quick": quick,
                "seed": seed,
                "devices": report,
                "rows": [asdict(r) for r in all_rows],
            },
        )
    if csv_path:
        append_csv(csv_path, all_rows, stamp, commit)
    if plot_path:
        plot(plot_path, all_rows)
        click.echo(f"plot written to {plot_path}")


def run_device(
    dev: str,
    ops: Sequence[str],
    dtypes: Sequence[str],
    modes: Sequence[str],
    sizes: Optional[str],
    quick: bool,
    seed: int,
    budget: Budget,
):
    """Bench one device: returns its rows, a summary for the JSON, and the report lines."""
    sweep = parse_sizes(sizes, quick, dev)
    dts = [DTYPES[d] for d in (dtypes or sweep.dtypes or ())] or [
        torch.float32 if dev == "cpu" else torch.bfloat16
    ]
    configs = sweep.configs(dev, ops)
    if not configs:
        raise click.UsageError(f"sweep '{sweep.name}' has nothing for --op {', '.join(ops)}")
    # a config's own dtypes, unless --dtype names them
    work = [
        (c, dt)
        for c in configs
        for dt in ([DTYPES[d] for d in c.dtypes] if c.dtypes and not dtypes else dts)
    ]
    used = list(dict.fromkeys(dt for _, dt in work))
    rates = _rates(dev, used, any(c.op in COMPUTE_OPS for c in configs), budget)
    rows: List[BenchRow] = []
    with click.progressbar(
        work,
        label=f"bench {dev}",
        file=sys.stderr,
        item_show_func=lambda w: w and f"{w[0].op} {w[0].shape}",
    ) as bar:
        for i, (cfg, dt) in enumerate(bar):
            g = torch.Generator(device=dev).manual_seed(seed + i)
            run_modes = list(modes or cfg.modes or sweep.modes)
            try:
                problem = cfg.make(dt, dev, g)
            except Exception as exc:  # e.g. out of memory: a row that says so, and go on
                new = [
                    BenchRow(
                        dev,
                        rates["name"],
                        cfg.op,
                        cfg.variant,
                        cfg.shape,
                        cfg.size,
                        DTYPE_NAMES[dt],
                        m,
                        cfg.torch_label,
                        timings={"pyformer": None},
                        errors={"pyformer": "making the inputs: " + _first_line(exc)},
                    )
                    for m in run_modes
                ]
            else:
                new = time_problem(cfg, problem, dt, dev, run_modes, budget, rates)
                del problem
            _free(dev)
            rows.extend(new)
            if not sys.stderr.isatty():  # a log: each row as soon as it is measured, so that a
                for r in new:  # run stopped by a time limit still leaves its numbers
                    click.echo(
                        f"row: {r.op} {r.variant} {r.shape} {r.dtype} {r.mode}: "
                        + ", ".join(f"{n} {_ms(t)} ms" for n, t in r.timings.items()),
                        err=True,
                    )

    lines = _header_lines(dev, rates, sweep.name, budget) + [""] + table_lines(rows)
    warned = set()
    for r in rows:
        for name, why in r.errors.items():
            lines.append(f"  ! {r.op} {r.shape} {r.dtype} {r.mode}: {name} failed: {why}")
        key = (r.op, r.variant, r.shape, r.dtype)
        if r.fwd_err is not None and not r.fwd_err <= r.fwd_tol and key not in warned:
            warned.add(key)
            lines.append(
                f"  ! {r.op} {r.shape} {r.dtype}: pyformer's forward differs from the float64 "
                f"reference by {r.fwd_err:.1e} (> {r.fwd_tol:.1e})"
            )
    verdicts = check_targets(sweep.targets, rows)
    lines += target_lines(sweep.name, verdicts)
    summary = {
        "device": dev,
        "device_name": rates["name"],
        "sweep": sweep.name,
        "load_average": rates["load"],
        "copy_gb_per_s": rates["copy"],
        "matmul_tflop_per_s": {DTYPE_NAMES[k]: v for k, v in rates["matmul"].items()},
        "targets": verdicts,
    }
    return rows, summary, lines


def target_lines(sweep_name: str, verdicts: Sequence[dict]) -> List[str]:
    """The sweep's speed targets, one line per target and measured row: met or short."""
    if not verdicts:
        return []
    cells = [
        [
            "met" if v["met"] else "NOT MET",
            v["target"],
            v["shape"],
            v["dtype"],
            "n/a" if v["value"] is None else f"{v['value']:.3g}",
        ]
        for v in verdicts
    ]
    met = sum(v["met"] for v in verdicts)
    return ["", f"targets of sweep '{sweep_name}': {met} of {len(verdicts)} met"] + format_table(
        ("verdict", "target", "shape", "dtype", "measured"),
        cells,
        (False, False, False, False, True),
    )
