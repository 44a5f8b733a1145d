"""layer_norm and add_layer_norm: fake kernels and autograd.

Forward saves float32 mean and rstd per row (float64 for float64 input); backward is the op
layer_norm_backward, returning dx, dweight and dbias. add_layer_norm (y = layer_norm(x + residual),
and s = x + residual) shares that backward: the gradient reaching s is that of y through the norm
plus the one flowing into s directly, and x and residual both receive it.
"""

import torch

lib = "pyformer::layer_norm"


def _stats_shape(x, normalized_shape):
    return x.shape[: x.dim() - len(normalized_shape)]


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake(lib)
def _layer_norm_fake(x, normalized_shape, weight, bias, eps):
    torch._check(
        tuple(x.shape[x.dim() - len(normalized_shape):]) == tuple(normalized_shape),
        lambda: f"pyformer.layer_norm: x's trailing dims must be {tuple(normalized_shape)}",
    )
    shape = _stats_shape(x, normalized_shape)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(shape, dtype=_stats_dtype(x)),
        x.new_empty(shape, dtype=_stats_dtype(x)),
    )


@torch.library.register_fake("pyformer::layer_norm_backward")
def _layer_norm_backward_fake(grad, x, mean, rstd, weight, normalized_shape):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(tuple(normalized_shape)),
        x.new_empty(tuple(normalized_shape)),
    )


@torch.library.register_fake("pyformer::add_layer_norm")
def _add_layer_norm_fake(x, residual, normalized_shape, weight, bias, eps):
    y, mean, rstd = _layer_norm_fake(x, normalized_shape, weight, bias, eps)
    return y, torch.empty_like(x, memory_format=torch.contiguous_format), mean, rstd


def _norm_backward(ctx, grad_y, x_or_s, mean, rstd, weight):
    """(dx, dweight, dbias) of the norm itself, None where no input needs it."""
    dx, dw, db = torch.ops.pyformer.layer_norm_backward(
        grad_y, x_or_s, mean, rstd, weight, ctx.normalized_shape
    )
    return dx, (dw if ctx.has_weight else None), (db if ctx.has_bias else None)


def _setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, mean, rstd, weight)


def _backward(ctx, grad_y, _gmean, _grstd):
    x, mean, rstd, weight = ctx.saved_tensors
    dx, dw, db = _norm_backward(ctx, grad_y, x, mean, rstd, weight)
    return dx, None, dw, db, None


torch.library.register_autograd(lib, _backward, setup_context=_setup)


def _setup_add(ctx, inputs, output):
    x, residual, normalized_shape, weight, bias, eps = inputs
    _, s, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, mean, rstd, weight)


def _backward_add(ctx, grad_y, grad_s, _gmean, _grstd):
    s, mean, rstd, weight = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(s)
    ds, dw, db = _norm_backward(ctx, grad_y, s, mean, rstd, weight)
    if grad_s is not None:
        ds = ds + grad_s
    return ds, ds, None, dw, db, None


torch.library.register_autograd("pyformer::add_layer_norm", _backward_add, setup_context=_setup_add)
