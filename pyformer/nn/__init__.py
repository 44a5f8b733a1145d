"""pyformer's drop-in PyTorch modules, on pyformer's kernels.

- :class:`LayerNorm`, :class:`RMSNorm`, :class:`MultiheadAttention`: drop-in replacements for the PyTorch modules
  of the same names (subclasses, state_dict-compatible); :func:`pyformer.convert` swaps them into
  an existing model.
- :func:`set_backend` switches a model between pyformer's kernels (``"pyformer"``) and the
  pure-PyTorch reference (``"reference"``) without touching its weights; :data:`BACKENDS` names
  the two.
- :class:`ShapeError`, :class:`AttentionShapeError`, :class:`MaskDtypeError`
  (:mod:`pyformer.nn.errors`): what the layers raise for input they cannot take; each is also the
  exception type PyTorch's module raises there (``RuntimeError``, ``AssertionError``), so code
  that catches PyTorch's catches pyformer's.

The textbook Transformer built on these layers is in :mod:`pyformer.models`.

Importing this package costs little beyond ``import pyformer`` (which loads the kernels).
"""

from ._backend import BACKENDS, set_backend
from .errors import AttentionShapeError, MaskDtypeError, ShapeError
from .layers import LayerNorm, MultiheadAttention, RMSNorm

__all__ = [
    "BACKENDS",
    "set_backend",
    "LayerNorm",
    "RMSNorm",
    "MultiheadAttention",
    "ShapeError",
    "AttentionShapeError",
    "MaskDtypeError",
]
