"""scaled_qk: fake kernel and autograd.  scores = scale * q @ k^T."""

import torch

lib = "pyformer::scaled_qk"


@torch.library.register_fake(lib)
def _scaled_qk_fake(q, k, scale):
    torch._check(q.dim() >= 2 and k.dim() == q.dim(), lambda: "pyformer.scaled_qk: q and k must be (..., L, D)")
    torch._check(q.shape[-1] == k.shape[-1], lambda: "pyformer.scaled_qk: q and k must share D")
    return q.new_empty((*q.shape[:-1], k.shape[-2]))


@torch.library.register_fake("pyformer::scaled_qk_backward")
def _scaled_qk_backward_fake(grad, q, k, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _setup(ctx, inputs, output):
    q, k, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k)


def _backward(ctx, grad):
    q, k = ctx.saved_tensors
    dq, dk = torch.ops.pyformer.scaled_qk_backward(grad, q, k, ctx.scale)
    return dq, dk, None


torch.library.register_autograd(lib, _backward, setup_context=_setup)
