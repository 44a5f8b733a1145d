"""The ``pyformer`` command line: ``pyformer check``, ``pyformer bench`` and ``pyformer info``.

Installed as the console script ``pyformer`` (entry point ``pyformer.cli:main``); also runnable
as ``python -m pyformer.cli``.
"""

from __future__ import annotations

import click

from .bench import bench
from .check import check
from .info import info

__all__ = ["main"]


def _version() -> str:
    import pyformer

    return getattr(pyformer, "__version__", "unknown")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="pyformer")
def main():
    """pyformer: fused Transformer ops for PyTorch, checked and timed against PyTorch itself.

    \b
      pyformer check   every op, forward and backward, against the float64 reference
      pyformer bench   pyformer against the textbook composition and PyTorch's fused ops
      pyformer info    versions, compiled backends, GPU and architectures
    """


main.add_command(check)
main.add_command(bench)
main.add_command(info)
