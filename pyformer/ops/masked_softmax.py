"""masked_softmax: fake kernels.  probs = softmax(scale * scores + M, -1).

Autograd: csrc/host/masked_softmax.cpp.
"""

import torch

from ._fake import same_device

lib = "pyformer::masked_softmax"


@torch.library.register_fake(lib)
def _masked_softmax_fake(scores, mask, scale, causal, key_lengths):
    same_device("masked_softmax", "scores", scores, mask=mask, key_lengths=key_lengths)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyformer::masked_softmax_backward")
def _masked_softmax_backward_fake(grad, out, scale):
    same_device("masked_softmax_backward", "out", out, grad=grad)
    return torch.empty_like(out, memory_format=torch.contiguous_format)
