"""``pyformer info``: versions, compiled backends, the GPU and the architectures compiled for."""

from __future__ import annotations

from typing import Dict, List, Tuple

import click
import torch

from .common import cpu_model, cuda_unavailable_reason, environment, json_option, write_json


def collect() -> Dict[str, object]:
    """Everything ``pyformer info`` reports, as a dict (also what ``--json`` writes)."""
    import pyformer

    backends = dict(pyformer.backends())
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return {
        **environment(),
        "backends": backends,
        "cuda_usable": cuda_unavailable_reason() is None,
        "cuda_reason": cuda_unavailable_reason(),
        "gpus": gpus,
        "torch_arch_list": torch.cuda.get_arch_list() if torch.version.cuda else [],
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }


def _cpu_kernels(b: Dict[str, object]) -> str:
    cap = str(b.get("cpu_capability") or "default")
    note = b.get("cpu_capability_note")
    return f"{cap} ({note})" if note else cap


def _lines(d: Dict[str, object]) -> List[Tuple[str, str]]:
    b = d["backends"]
    rows = [
        ("pyformer", str(d["pyformer"])),
        ("torch", str(d["torch"])),
        ("CUDA (torch built with)", str(d["cuda"] or "none")),
        ("python", str(d["python"])),
        ("backends compiled in", ", ".join(k for k in ("cpu", "cuda") if b.get(k)) or "none"),
        ("CPU kernels", _cpu_kernels(b)),
        ("CPU half-type GEMM", str(b.get("cpu_half_gemm") or "none (blocks converted to float)")),
        ("CUDA archs compiled for", str(b.get("cuda_archs") or "-")),
        ("torch CUDA arch list", " ".join(d["torch_arch_list"]) or "-"),
        ("CPU", f"{d['cpu']} ({d['cpu_threads']} threads)"),
    ]
    if d["gpus"]:
        for g in d["gpus"]:
            rows.append(
                (
                    f"GPU {g['index']}",
                    f"{g['name']}, compute capability {g['capability']}, {g['memory_gib']} GiB",
                )
            )
    else:
        rows.append(("GPU", "none"))
    rows.append(("pyformer on CUDA", "usable" if d["cuda_usable"] else f"no: {d['cuda_reason']}"))
    return rows


@click.command("info")
@json_option
def info(json_path):
    """Print versions (pyformer, torch, CUDA), the backends compiled in, the GPU and its compute
    capability, and the CUDA architectures compiled for."""
    d = collect()
    rows = _lines(d)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")
    if json_path:
        write_json(json_path, d)
