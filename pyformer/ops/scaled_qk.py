"""scaled_qk: fake kernels.  scores = scale * q @ k^T.  Autograd: csrc/host/scaled_qk.cpp."""

import torch

from ._fake import same_device

lib = "pyformer::scaled_qk"


@torch.library.register_fake(lib)
def _scaled_qk_fake(q, k, scale):
    same_device("scaled_qk", "q", q, k=k)
    torch._check(
        q.dim() >= 2 and k.dim() == q.dim(),
        lambda: "pyformer.scaled_qk: q and k must be (..., L, D)",
    )
    torch._check(q.shape[-1] == k.shape[-1], lambda: "pyformer.scaled_qk: q and k must share D")
    return q.new_empty((*q.shape[:-1], k.shape[-2]))


@torch.library.register_fake("pyformer::scaled_qk_backward")
def _scaled_qk_backward_fake(grad, q, k, scale):
    same_device("scaled_qk_backward", "q", q, grad=grad, k=k)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )
