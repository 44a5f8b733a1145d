"""apply_rotary: fake kernels.

The outputs have the strides of the inputs where those are dense and non-overlapping with a
unit-stride last dim (a (B, L, H, D) projection viewed as (B, H, L, D) stays so), contiguous
otherwise: what csrc/host/rotary.cpp allocates. The backward op apply_rotary_backward returns
dq and dk laid out alike from grad_q and grad_k.
"""

import torch

from ._fake import same_device


def _out_like(x):
    if x.dim() > 0 and x.size(-1) > 1 and x.stride(-1) != 1:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _outputs(op, q, k, cos, sin):
    same_device(op, "q", q, k=k, cos=cos, sin=sin)
    torch._check(q.dim() == 4, lambda: f"pyformer.{op}: argument 'q': expected (B, H, L, D)")
    torch._check(k.dim() == 4, lambda: f"pyformer.{op}: argument 'k': expected (B, H_kv, L, D)")
    return _out_like(q), _out_like(k)


@torch.library.register_fake("pyformer::apply_rotary")
def _apply_rotary_fake(q, k, cos, sin, interleaved=False):
    return _outputs("apply_rotary", q, k, cos, sin)


@torch.library.register_fake("pyformer::apply_rotary_backward")
def _apply_rotary_backward_fake(grad_q, grad_k, cos, sin, interleaved):
    return _outputs("apply_rotary_backward", grad_q, grad_k, cos, sin)
