"""attention: fake kernels.  out = dropout(masked_softmax(scale * q @ k^T + M)) @ v.

The op returns (out, probs, keep); probs are returned with need_probs (need_weights) and saved for
the bmm algorithm's backward, keep is the dropout mask (with need_probs). flash_attention returns
(out, lse, rng), rng the dropout's Philox key (csrc/philox.h), and its backward recomputes from
lse and rng. Autograd: csrc/host/attention.cpp.
"""

import torch

from ._fake import same_device

lib = "pyformer::attention"


@torch.library.register_fake(lib)
def _attention_fake(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_probs=True):
    same_device("attention", "q", q, k=k, v=v, mask=mask, key_lengths=key_lengths)
    torch._check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        lambda: "pyformer.attention: q, k, v must be 4-dim",
    )
    B, H, Lq, _ = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    keep_shape = (B, H, Lq, Lk) if dropout_p > 0 and need_probs else (0,)
    return (
        q.new_empty((B, H, Lq, Dv)),
        q.new_empty((B, H, Lq, Lk) if need_probs else (0,)),
        q.new_empty(keep_shape, dtype=torch.bool),
    )


@torch.library.register_fake("pyformer::attention_backward")
def _attention_backward_fake(grad_out, grad_probs, q, k, v, probs, keep, scale, dropout_p):
    same_device(
        "attention_backward",
        "q",
        q,
        grad_out=grad_out,
        grad_probs=grad_probs,
        k=k,
        v=v,
        probs=probs,
        keep=keep,
    )
    c = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
        torch.empty_like(probs, memory_format=c),
    )


@torch.library.register_fake("pyformer::flash_attention")
def _flash_attention_fake(q, k, v, mask, scale, causal, key_lengths, dropout_p=0.0):
    same_device("flash_attention", "q", q, k=k, v=v, mask=mask, key_lengths=key_lengths)
    torch._check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        lambda: "pyformer.flash_attention: q, k, v must be 4-dim",
    )
    B, H, Lq, _ = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    rng = torch.empty((1,) if dropout_p > 0 else (0,), dtype=torch.int64, device="cpu")
    return q.new_empty((B, H, Lq, v.shape[3])), q.new_empty((B, H, Lq), dtype=stat), rng


@torch.library.register_fake("pyformer::flash_attention_backward")
def _flash_attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    mask,
    scale,
    causal,
    key_lengths,
    logits_grad=False,
    grad_lse=None,
    dropout_p=0.0,
    rng=None,
):
    same_device(
        "flash_attention_backward",
        "q",
        q,
        grad_out=grad_out,
        k=k,
        v=v,
        out=out,
        lse=lse,
        mask=mask,
        key_lengths=key_lengths,
        grad_lse=grad_lse,
    )
    c = torch.contiguous_format
    B, H, Lq, _ = q.shape
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
        q.new_empty((B, H, Lq, k.shape[2]) if logits_grad else (0,)),
    )
