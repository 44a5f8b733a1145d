"""The Python side of each op: its fake (meta) kernel, one module per op, for torch.compile.

The schemas live in csrc/ops.cpp, the host entries and the autograd formulas in
csrc/host/<op>.cpp, the kernels in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (docs/contributing.md).
Importing this package loads the compiled library and registers the fake kernels.
"""

import torch

from .. import _C  # noqa: F401  (loads the library: the schemas, kernels and autograd)
from . import attention, layer_norm, masked_softmax, rotary, scaled_qk, swiglu  # noqa: F401

ops = torch.ops.pyformer
