"""attention: fake kernel and autograd.  out = dropout(masked_softmax(scale * q @ k^T + M)) @ v.

The op returns (out, probs, keep); probs are saved for backward (and returned to the user with
need_weights), keep is the dropout mask. With need_probs=False (inference: no need_weights, no
grad) probs come back empty and are never written; differentiating such a call raises. Backward is the op attention_backward, which also returns
the gradient of the logits, summed into a floating mask that requires grad.
"""

import torch

from .masked_softmax import mask_grad

lib = "pyformer::attention"


@torch.library.register_fake(lib)
def _attention_fake(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_probs=True):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "pyformer.attention: q, k, v must be 4-dim")
    B, H, Lq, _ = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    keep_shape = (B, H, Lq, Lk) if dropout_p > 0 else (0,)
    return (
        q.new_empty((B, H, Lq, Dv)),
        q.new_empty((B, H, Lq, Lk) if need_probs else (0,)),
        q.new_empty(keep_shape, dtype=torch.bool),
    )


@torch.library.register_fake("pyformer::attention_backward")
def _attention_backward_fake(grad_out, grad_probs, q, k, v, probs, keep, scale, dropout_p):
    c = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
        torch.empty_like(probs, memory_format=c),
    )


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, causal, key_lengths, dropout_p, need_probs = inputs
    out, probs, keep = output
    ctx.need_probs = need_probs
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mask_shape = mask.shape if mask is not None else None
    ctx.mask_dtype = mask.dtype if mask is not None else None
    ctx.mark_non_differentiable(keep)
    # a probs output that nothing differentiates arrives as None, not as a (B,H,Lq,Lk) tensor of
    # zeros that the backward would then read and add
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, probs, keep)


def _backward(ctx, grad_out, grad_probs, _gkeep):
    if not ctx.need_probs:
        raise RuntimeError("pyformer.attention: called with need_probs=False, which keeps nothing "
                           "for backward; pass need_probs=True to differentiate")
    q, k, v, probs, keep = ctx.saved_tensors
    if grad_out is None:
        grad_out = q.new_zeros((*q.shape[:3], v.shape[3]))
    dq, dk, dv, dlogits = torch.ops.pyformer.attention_backward(
        grad_out, grad_probs, q, k, v, probs, keep, ctx.scale, ctx.dropout_p
    )
    dmask = mask_grad(dlogits, ctx.mask_shape, ctx.mask_dtype) if ctx.needs_input_grad[3] else None
    return dq, dk, dv, dmask, None, None, None, None, None


torch.library.register_autograd(lib, _backward, setup_context=_setup)
