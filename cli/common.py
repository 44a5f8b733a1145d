"""What ``pyformer check``, ``bench`` and ``info`` share: dtypes, devices, options, tables, JSON."""

from __future__ import annotations

import json
import math
import platform
from typing import Dict, Iterable, List, Optional, Sequence

import click
import torch

DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
DEVICE_CHOICES = ("cpu", "cuda", "all")

# Exit codes shared by the commands (click itself exits 2 on a usage error).
EXIT_OK, EXIT_DISAGREE, EXIT_USAGE, EXIT_NO_DEVICE = 0, 1, 2, 3


class DeviceUnavailable(click.ClickException):
    """A device asked for on the command line is not there; exits with status 3."""

    exit_code = EXIT_NO_DEVICE


def cuda_unavailable_reason() -> Optional[str]:
    """Why pyformer cannot run on CUDA here, or None if it can."""
    import pyformer

    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if not pyformer.backends().get("cuda", False):
        return "pyformer was built without its CUDA kernels (pyformer.backends()['cuda'] is False)"
    return None


def resolve_devices(choice: Optional[str]) -> List[str]:
    """Device names to run on for ``--device``.

    ``None`` (the default) and ``"all"`` mean every device present; ``"cuda"`` raises
    :class:`DeviceUnavailable` (exit status 3) when CUDA cannot be used.
    """
    reason = cuda_unavailable_reason()
    if choice == "cuda":
        if reason is not None:
            raise DeviceUnavailable(f"--device cuda was requested but is not available: {reason}.")
        return ["cuda"]
    if choice == "cpu":
        return ["cpu"]
    return ["cpu"] + ([] if reason else ["cuda"])


def device_name(device: str) -> str:
    """Human-readable name of a device: the GPU's name, or the CPU model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{cpu_model()} ({n} thread{'s' if n != 1 else ''})"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- click options


def device_option(f):
    return click.option(
        "--device",
        type=click.Choice(DEVICE_CHOICES),
        default=None,
        help="Device to run on; default (and 'all'): every device present. "
        "Exit status 3 if 'cuda' is requested but not available.",
    )(f)


def dtype_option(default_help: str):
    def deco(f):
        return click.option(
            "--dtype",
            "dtypes",
            type=click.Choice(tuple(DTYPES)),
            multiple=True,
            help=f"Data type; repeat for several. Default: {default_help}.",
        )(f)

    return deco


def op_option(choices: Sequence[str]):
    def deco(f):
        return click.option(
            "--op",
            "ops",
            type=click.Choice(tuple(choices)),
            multiple=True,
            help="Op to run; repeat for several. Default: all.",
        )(f)

    return deco


def json_option(f):
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, writable=True),
        default=None,
        help="Also write the results to this JSON file.",
    )(f)


# ----------------------------------------------------------------------------- output


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]
) -> List[str]:
    """Lines of an aligned text table: a header, a rule, then one line per row.

    Args:
        headers: column titles.
        rows: cells, already formatted as strings.
        right: per column, True to right-align (numbers), False to left-align (labels).
    """
    rows = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = TableFormat(widths, right)
    return [fmt.line(headers), fmt.rule()] + [fmt.line(r) for r in rows]


class TableFormat:
    """Fixed column widths, so rows can be printed one by one as they are computed."""

    def __init__(self, widths: Sequence[int], right: Sequence[bool], sep: str = "  "):
        self.widths, self.right, self.sep = list(widths), list(right), sep

    def line(self, cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, self.widths, self.right)]
        return self.sep.join(out).rstrip()

    def rule(self) -> str:
        return self.sep.join("-" * w for w in self.widths)


def fmt_err(x: Optional[float]) -> str:
    """A relative error as ``1.2e-07``; ``-`` when absent, ``nan``/``inf`` as such."""
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.1e}"


def shape_str(shape: Sequence[int]) -> str:
    """``(8,12,512,64)``: a shape without spaces."""
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _json_default(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(o):
    """JSON has no NaN or infinity: write them as strings."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented, strict JSON (non-finite floats become strings)."""
    with open(path, "w") as f:
        json.dump(_clean(payload), f, indent=2, default=_json_default, allow_nan=False)
        f.write("\n")


def environment() -> Dict[str, Optional[str]]:
    """Versions that every JSON/CSV record carries."""
    import pyformer

    return {
        "pyformer": getattr(pyformer, "__version__", None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
