"""swiglu: fake kernels.

Forward ``silu(gate) * up`` (contiguous, the dtype of ``gate``); backward is the op
swiglu_backward, returning dgate and dup. Autograd: csrc/host/swiglu.cpp.
"""

import torch

from ._fake import same_device


def _like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyformer::swiglu")
def _swiglu_fake(gate, up):
    same_device("swiglu", "gate", gate, up=up)
    torch._check(
        gate.shape == up.shape,
        lambda: f"pyformer.swiglu: argument 'up': expected shape {tuple(gate.shape)}",
    )
    return _like(gate)


@torch.library.register_fake("pyformer::swiglu_backward")
def _swiglu_backward_fake(grad, gate, up):
    same_device("swiglu_backward", "gate", gate, grad=grad, up=up)
    return _like(gate), _like(gate)
