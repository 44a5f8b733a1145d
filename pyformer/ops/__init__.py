"""The Python side of each op: fake (meta) kernel and autograd, one module per op.

The schemas live in csrc/ops.cpp, the CPU kernels in csrc/cpu/<op>.cpp, the CUDA kernels in
csrc/cuda/<op>.cu; this package registers, for each op, a fake kernel (so torch.compile can trace
it) and its autograd formula (whose backward is an op of its own).
"""

import torch

from .. import _C  # noqa: F401  (loads the library: TORCH_LIBRARY(pyformer, m) and the kernels)
from . import attention, layer_norm, masked_softmax, scaled_qk  # noqa: F401

ops = torch.ops.pyformer


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"pyformer.{name}: double backward (a gradient of a gradient) is not supported"
        )

    return backward


# The backward ops are differentiable in name only: differentiating them again raises, rather
# than the dispatcher's default of silently treating them as constants.
for _name in ("scaled_qk_backward", "masked_softmax_backward", "layer_norm_backward", "attention_backward"):
    torch.library.register_autograd(f"pyformer::{_name}", _no_double_backward(_name.replace("_backward", "")))
