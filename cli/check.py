"""``pyformer check``: every op, forward and backward, against the float64 reference."""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import click
import torch

from pyformer.testing import BOUNDS, verify

from . import cases as case_registry
from .common import (
    DTYPE_NAMES,
    DTYPES,
    EXIT_DISAGREE,
    EXIT_OK,
    TableFormat,
    device_option,
    dtype_option,
    environment,
    fmt_err,
    json_option,
    op_option,
    resolve_devices,
    write_json,
)


@dataclass
class CheckResult:
    """The outcome of one case in one dtype on one device (one row of the table)."""

    op: str
    device: str
    dtype: str
    shape: str
    mask: str
    status: str = "PASS"  # PASS, FAIL or SKIP
    fwd_err: Optional[float] = None
    grad_err: Optional[float] = None
    bound: float = 0.0
    errors: Dict[str, float] = field(default_factory=dict)
    torch_errors: Dict[str, float] = field(default_factory=dict)
    details: List[str] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- running one case


def _seed(seed: int, key: str) -> int:
    """A per-case seed: the same case gets the same inputs whatever else runs."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


# torch's own name of each dtype in error messages (c10::toString) and pyformer's.
_C10_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def _rejects_dtype(exc: Exception, dtype: torch.dtype) -> bool:
    """Whether an op's exception says that it does not support ``dtype`` (a SKIP, not a FAIL).

    Recognized: pyformer's argument checks ("expected a float32, ... tensor, got Half"),
    torch's dispatch errors ("... not implemented for 'Half'") and messages that name the dtype
    and say "not supported". Anything else an op raises is a failure.
    """
    msg = str(exc)
    names = (_C10_NAMES[dtype], DTYPE_NAMES[dtype], str(dtype))
    for name in map(re.escape, names):
        if re.search(rf"got {name}\b|not implemented for '{name}'", msg):
            return True
        if re.search(rf"\b{name}\b.*\b(not supported|unsupported)", msg, re.IGNORECASE):
            return True
    return False


def run_case(case, device: str, dtype: torch.dtype, seed: int) -> CheckResult:
    """Run one case in ``dtype`` on ``device`` and compare it with the float64 reference, by
    :func:`pyformer.testing.verify` (the tests' harness).

    The inputs are drawn in float64, rounded to ``dtype``; the reference runs on those rounded
    values in float64. Cotangents for the backward pass are drawn from the case's generator too.
    For half types the reference also runs in ``dtype`` itself (PyTorch's own error, which bounds
    ours). An exception of the op is the case's result: a SKIP when it says that the op does not
    support ``dtype``, else a FAIL.
    """
    res = CheckResult(
        case.op, device, DTYPE_NAMES[dtype], case.shape, case.mask, bound=BOUNDS[dtype]
    )
    start = time.perf_counter()
    g = torch.Generator().manual_seed(_seed(seed, f"{case.key}|{res.dtype}|{device}"))
    inputs = case.make_inputs(g)
    grad = [n for n, t in inputs.items() if t.is_floating_point() and n not in case.constants]
    v = verify(
        case.impl,
        case.ref,
        inputs,
        dtype=dtype,
        device=device,
        grad=grad,
        outputs=case.outputs,
        generator=g,
        ref_device=device,
    )
    res.seconds = time.perf_counter() - start
    if v.raised is not None:
        if _rejects_dtype(v.raised, dtype):
            first_line = (str(v.raised).strip().splitlines() or [""])[0]
            res.status = "SKIP"
            res.details.append(f"{res.dtype} not supported on {device}: {first_line}")
        else:
            res.status = "FAIL"
            res.details = v.failures
        return res
    res.fwd_err, res.grad_err = v.fwd_err, v.grad_err
    res.errors, res.torch_errors = v.errors, v.torch_errors
    res.details = v.failures
    res.status = "FAIL" if res.details else "PASS"
    return res


# ----------------------------------------------------------------------------- the command

HEADERS = ("op", "device", "dtype", "shape", "mask", "fwd err", "grad err", "bound", "result")
RIGHT = (False, False, False, False, False, True, True, True, False)


def _row(r: CheckResult) -> List[str]:
    return [
        r.op,
        r.device,
        r.dtype,
        r.shape,
        r.mask,
        fmt_err(r.fwd_err),
        fmt_err(r.grad_err),
        f"{r.bound:.1e}",
        r.status,
    ]


def _table_format(plan) -> TableFormat:
    """Column widths fixed from the plan, so rows print as soon as each case has run."""
    labels = [[c.op, dev, DTYPE_NAMES[dt], c.shape, c.mask] for c, dev, dt in plan]
    widths = [max([len(HEADERS[i])] + [len(l[i]) for l in labels]) for i in range(5)]
    widths += [max(len(HEADERS[5]), 7), max(len(HEADERS[6]), 7), 7, 6]
    return TableFormat(widths, RIGHT)


@click.command("check")
@device_option
@op_option(case_registry.op_names())
@dtype_option("float64, float32, float16, bfloat16")
@click.option(
    "--quick",
    is_flag=True,
    help="A small matrix (one awkward shape per op, every "
    "mask kind): under a minute on a 2-core CPU.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the random inputs; each case draws its own from it.",
)
@json_option
def check(device, ops, dtypes, quick, seed, json_path):
    """Check every op, forward and backward, against the float64 reference.

    Each case draws fresh random inputs, rounds them to the dtype under test, and compares the
    op's outputs and every gradient with pyformer.reference run in float64 on the same values,
    by the relative error ||out - ref|| / ||ref||. Bounds (docs/ops.md): float64 1e-12,
    float32 1e-5, float16 2e-3, bfloat16 1.6e-2; half types must also stay within twice the
    error of the pure-PyTorch composition in the same dtype, plus 1e-5.

    Exit status: 0 all pass, 1 any disagreement, 2 usage error, 3 requested device missing.
    """
    devices = resolve_devices(device)
    dts = [DTYPES[d] for d in (dtypes or DTYPES)]
    selected = case_registry.cases(ops or None, quick=quick)
    plan = [(c, dev, dt) for dev in devices for c in selected for dt in dts]

    fmt = _table_format(plan)
    click.echo(fmt.line(HEADERS))
    click.echo(fmt.rule())
    results = []
    for case, dev, dt in plan:
        try:
            r = run_case(case, dev, dt, seed)
        except Exception as exc:  # e.g. a CUDA error left behind by an earlier case: keep going
            r = CheckResult(
                case.op,
                dev,
                DTYPE_NAMES[dt],
                case.shape,
                case.mask,
                status="FAIL",
                bound=BOUNDS[dt],
                details=[
                    f"raised {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                ],
            )
        results.append(r)
        click.echo(fmt.line(_row(r)))
        for line in r.details:
            click.echo(f"    {'!' if r.status == 'FAIL' else '-'} {line}")

    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    if json_path:
        write_json(
            json_path,
            {
                "command": "check",
                "seed": seed,
                "quick": quick,
                "devices": devices,
                "environment": environment(),
                "passed": passed,
                "failed": failed,
                "skipped": skipped,
                "results": [asdict(r) for r in results],
            },
        )
    click.echo("")
    if skipped:
        click.echo(f"{skipped} skipped (dtype not supported by the op on that device)")
    click.echo(f"{passed} passed, {failed} failed")
    click.get_current_context().exit(EXIT_DISAGREE if failed else EXIT_OK)
