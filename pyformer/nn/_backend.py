"""Which implementation of the ops a pyformer module calls: one code path, two backends.

Every module of :mod:`pyformer.nn` has a ``backend`` attribute, ``"pyformer"`` (the default: the
fast dispatcher-registered kernels of :mod:`pyformer.functional`) or ``"reference"`` (the
pure-PyTorch compositions of :mod:`pyformer.reference`, the truth the tests compare against).
The module code is the same for both; only the functions it calls differ. That is what lets the
trained example run the very same model twice and compare the loss curves.

Both modules are already imported by ``import pyformer``, so this costs nothing, and a plain
dict lookup (no import machinery at call time) keeps the modules traceable by ``torch.compile``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Iterable, Optional

import torch

from .. import functional as _functional
from .. import reference as _reference

BACKENDS = ("pyformer", "reference")
_MODULES = {"pyformer": _functional, "reference": _reference}


def check_backend(name: str) -> str:
    """``name`` if it is a known backend, else a ValueError naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"pyformer.nn: backend must be one of {BACKENDS}, got {name!r}")
    return name


def functional(name: str = "pyformer") -> ModuleType:
    """The module implementing the ops for backend ``name``."""
    mod = _MODULES.get(name)
    if mod is None:
        check_backend(name)
    return mod


def reference() -> ModuleType:
    """:mod:`pyformer.reference`, the pure-PyTorch fallback for inputs a kernel does not take."""
    return functional("reference")


_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_cuda_built = None


def _cuda_compiled() -> bool:
    global _cuda_built
    if _cuda_built is None:
        try:
            import pyformer

            _cuda_built = bool(pyformer.backends().get("cuda", False))
        except Exception:  # an older build without backends(): trust the dispatcher to say
            _cuda_built = False
    return _cuda_built


def kernels_support(tensors: Iterable[torch.Tensor]) -> bool:
    """True when pyformer's compiled kernels take every given floating tensor.

    The kernels cover float32, float64, float16 and bfloat16 on CPU and CUDA. Nested,
    sparse or quantized tensors, other devices (mps, xla, meta-free fakes aside) and a CUDA
    tensor in a build without CUDA kernels are left to PyTorch ops.
    """
    for t in tensors:
        if t is None:
            continue
        if t.is_nested or t.layout != torch.strided or t.is_quantized:
            return False
        # is_cpu / is_meta / is_cuda: a few times cheaper than t.device.type, read per call
        if t.is_cpu or t.is_meta:
            ok = t.dtype in _CPU_DTYPES or not t.is_floating_point()
        elif t.is_cuda:
            ok = _cuda_compiled() and (t.dtype in _CUDA_DTYPES or not t.is_floating_point())
        else:
            ok = False
        if not ok:
            return False
    return True


def set_backend(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """Switch every pyformer module inside ``module`` (itself included) to backend ``name``.

    Returns ``module``. Modules that are not pyformer's are left alone.

    Example::

        >>> model = pyformer.models.Transformer(0, 0, 10, 10, 32, 4, 16, 64, 2, 0.0)
        >>> pyformer.nn.set_backend(model, "reference")  # same weights, pure-PyTorch ops
    """
    check_backend(name)
    for m in module.modules():
        if hasattr(m, "_pyformer_backend"):
            m.backend = name
    return module


def uniform(x: torch.Tensor, tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """True when every given tensor (None aside) has the dtype and the device of ``x``.

    pyformer's ops take one dtype and one device for all their floating inputs; PyTorch's modules
    accept some mixes (float32 parameters with a bfloat16 input, ...), so a layer runs PyTorch's
    own implementation for them.
    """
    dtype, device = x.dtype, x.device
    for t in tensors:
        if t is not None and (t.dtype != dtype or t.device != device):
            return False
    return True


class BackendMixin:
    """Gives a module a ``backend`` attribute and ``self.F``, the ops of that backend.

    TorchScript compiles a module's properties too; these two are Python-only (a scripted layer
    runs PyTorch's own implementation, see :mod:`pyformer.nn.layers`), so it is told to skip them.
    """

    _pyformer_backend = "pyformer"
    __jit_unused_properties__ = ["backend", "F"]

    @property
    def backend(self) -> str:
        return self._pyformer_backend

    @backend.setter
    def backend(self, name: str) -> None:
        # stored on the instance, so set_backend on one model never changes another
        object.__setattr__(self, "_pyformer_backend", check_backend(name))

    @property
    def F(self) -> ModuleType:  # noqa: N802 (the conventional name for a functional module)
        return functional(self._pyformer_backend)
