"""pyformer: hand-written C++/CUDA kernels for the core of the Transformer, as PyTorch ops.

``pyformer.functional`` holds the ops (scaled_qk, masked_softmax, layer_norm, add_layer_norm,
attention); ``pyformer.reference`` their pure-PyTorch textbook versions, the truth for the tests,
``pyformer check`` and ``pyformer bench``; ``pyformer.nn`` the drop-in LayerNorm and
MultiheadAttention; ``pyformer.models`` the textbook Transformer built on them;
``pyformer.convert(model)`` swaps torch.nn.LayerNorm / MultiheadAttention for pyformer's in place;
``pyformer.integrations.transformers.register()`` plugs the kernels into Hugging Face models.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (loads pyformer._C and registers the fake kernels)
from . import functional, reference  # noqa: E402,F401
from . import nn  # noqa: E402,F401
from . import models  # noqa: E402,F401
from .convert import convert  # noqa: E402,F401


def backends() -> dict:
    """What this build of pyformer holds.

    Returns a dict: ``cpu`` (always True), ``cuda`` (the CUDA kernels were compiled in),
    ``cuda_archs`` (the architectures they were compiled for, e.g. ``"8.0;9.0"``),
    ``cpu_capability`` (the instruction set the CPU kernels run with: ``"avx2"`` where the CPU has
    AVX2, FMA and F16C and the build has the AVX2 kernels, else ``"default"``, baseline x86-64;
    ``PYFORMER_CPU_CAPABILITY=default`` in the environment forces the baseline),
    ``cpu_capability_note`` (why it is ``"default"``, or empty), ``cpu_half_gemm`` (``"bf16"``
    where bfloat16 flash attention on the CPU runs the BLAS's mixed-precision GEMM: MKL's, on a
    CPU with AMX-BF16 or AVX512-BF16; empty elsewhere or with ``PYFORMER_CPU_HALF_GEMM=0``, and
    the blocks are then converted to float, as for float16) and
    ``cuda_available`` (compiled in and a GPU is visible now).
    """
    import torch

    from . import _C

    info = dict(_C.build_info())
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info
