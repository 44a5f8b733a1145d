"""masked_softmax: fake kernels.  probs = softmax(scale * scores + M, -1).

Autograd: csrc/host/masked_softmax.cpp.
"""

import torch

lib = "pyformer::masked_softmax"


@torch.library.register_fake(lib)
def _masked_softmax_fake(scores, mask, scale, causal, key_lengths):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyformer::masked_softmax_backward")
def _masked_softmax_backward_fake(grad, out, scale):
    return torch.empty_like(out, memory_format=torch.contiguous_format)
