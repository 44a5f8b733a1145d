"""layer_norm, add_layer_norm, rms_norm and add_rms_norm: fake kernels.

Forward returns float32 mean and rstd per row (float64 for float64 input; rms_norm has no mean);
backward is the op layer_norm_backward, returning dx, dweight and dbias (rms_norm_backward: dx and
dweight). Autograd: csrc/host/layer_norm.cpp.
"""

import torch

from ._fake import same_device

lib = "pyformer::layer_norm"


def _stats_shape(x, normalized_shape):
    return x.shape[: x.dim() - len(normalized_shape)]


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _outputs(op, x, normalized_shape, weight, bias):
    """(y, mean, rstd) of layer_norm / add_layer_norm, after the checks both share."""
    same_device(op, "x", x, weight=weight, bias=bias)
    torch._check(
        tuple(x.shape[x.dim() - len(normalized_shape) :]) == tuple(normalized_shape),
        lambda: f"pyformer.{op}: x's trailing dims must be {tuple(normalized_shape)}",
    )
    shape = _stats_shape(x, normalized_shape)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(shape, dtype=_stats_dtype(x)),
        x.new_empty(shape, dtype=_stats_dtype(x)),
    )


@torch.library.register_fake(lib)
def _layer_norm_fake(x, normalized_shape, weight, bias, eps):
    return _outputs("layer_norm", x, normalized_shape, weight, bias)


@torch.library.register_fake("pyformer::layer_norm_backward")
def _layer_norm_backward_fake(grad, x, mean, rstd, weight, normalized_shape):
    same_device("layer_norm_backward", "x", x, grad=grad, mean=mean, rstd=rstd, weight=weight)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(tuple(normalized_shape)),
        x.new_empty(tuple(normalized_shape)),
    )


@torch.library.register_fake("pyformer::add_layer_norm")
def _add_layer_norm_fake(x, residual, normalized_shape, weight, bias, eps):
    same_device("add_layer_norm", "x", x, residual=residual)
    y, mean, rstd = _outputs("add_layer_norm", x, normalized_shape, weight, bias)
    return y, torch.empty_like(x, memory_format=torch.contiguous_format), mean, rstd


@torch.library.register_fake("pyformer::rms_norm")
def _rms_norm_fake(x, normalized_shape, weight, eps):
    y, _, rstd = _outputs("rms_norm", x, normalized_shape, weight, None)
    return y, rstd


@torch.library.register_fake("pyformer::rms_norm_backward")
def _rms_norm_backward_fake(grad, x, rstd, weight, normalized_shape):
    same_device("rms_norm_backward", "x", x, grad=grad, rstd=rstd, weight=weight)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(tuple(normalized_shape)),
    )


@torch.library.register_fake("pyformer::add_rms_norm")
def _add_rms_norm_fake(x, residual, normalized_shape, weight, eps):
    same_device("add_rms_norm", "x", x, residual=residual)
    y, _, rstd = _outputs("add_rms_norm", x, normalized_shape, weight, None)
    return y, torch.empty_like(x, memory_format=torch.contiguous_format), rstd
