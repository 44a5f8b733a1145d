"""masked_softmax: fake kernel and autograd.  probs = softmax(scale * scores + M, -1).

Backward uses the saved output alone: dscores = scale * y * (dy - sum(dy * y)). A floating mask
that requires grad gets the same formula without the scale, summed over its broadcast dims.
"""

import torch

lib = "pyformer::masked_softmax"


@torch.library.register_fake(lib)
def _masked_softmax_fake(scores, mask, scale, causal, key_lengths):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyformer::masked_softmax_backward")
def _masked_softmax_backward_fake(grad, out, scale):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    scores, mask, scale, causal, key_lengths = inputs
    ctx.scale = scale
    ctx.mask_shape = mask.shape if mask is not None else None
    ctx.mask_dtype = mask.dtype if mask is not None else None
    ctx.save_for_backward(output)


def mask_grad(dlogits, mask_shape, mask_dtype):
    """The gradient of an additive mask from that of the logits: summed over broadcast dims."""
    return dlogits.sum_to_size(mask_shape).to(mask_dtype)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    dscores = dmask = None
    if ctx.needs_input_grad[1]:  # a floating mask that requires grad
        dlogits = torch.ops.pyformer.masked_softmax_backward(grad, out, 1.0)
        dmask = mask_grad(dlogits, ctx.mask_shape, ctx.mask_dtype)
        if ctx.needs_input_grad[0]:
            dscores = dlogits * ctx.scale
    elif ctx.needs_input_grad[0]:
        dscores = torch.ops.pyformer.masked_softmax_backward(grad, out, ctx.scale)
    return dscores, dmask, None, None, None


torch.library.register_autograd(lib, _backward, setup_context=_setup)
