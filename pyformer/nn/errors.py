"""The exceptions the layers of :mod:`pyformer.nn` raise for input they cannot take.

Each one derives from the exception pyformer's ops raise for that input (``ValueError`` for a
shape, ``TypeError`` for a dtype) *and* from the one the PyTorch module it replaces raises, so an
``except`` written for either one catches it. The message is pyformer's: it names the layer, the
argument, what was expected and what was given.

- :class:`ShapeError` (``ValueError``, ``RuntimeError``): :class:`pyformer.nn.LayerNorm`, an input
  whose trailing dims are not ``normalized_shape`` (``torch.nn.LayerNorm`` raises
  ``RuntimeError``).
- :class:`AttentionShapeError` (a :class:`ShapeError` and an ``AssertionError``):
  :class:`pyformer.nn.MultiheadAttention`, a query, key, value or mask of the wrong shape
  (``torch.nn.MultiheadAttention`` raises ``AssertionError`` for most of these, ``RuntimeError``
  for an ``attn_mask`` of the wrong shape and in its fast path).
- :class:`MaskDtypeError` (``TypeError``, ``AssertionError``, ``RuntimeError``): an integer
  ``key_padding_mask`` or ``attn_mask`` given to :class:`pyformer.nn.MultiheadAttention`
  (``torch.nn.MultiheadAttention`` raises ``AssertionError``): a mask is bool or floating, never an
  integer tensor to add; or a floating mask of another dtype than the query (torch raises
  ``RuntimeError``).
"""

from __future__ import annotations

__all__ = ["ShapeError", "AttentionShapeError", "MaskDtypeError"]


class ShapeError(ValueError, RuntimeError):
    """An input of a shape the layer cannot take (a ``ValueError`` and a ``RuntimeError``)."""


class AttentionShapeError(ShapeError, AssertionError):
    """A query, key, value or mask of the wrong shape for ``MultiheadAttention`` (also an
    ``AssertionError``, what ``torch.nn.MultiheadAttention`` raises)."""


class MaskDtypeError(TypeError, AssertionError, RuntimeError):
    """A mask of a dtype ``MultiheadAttention`` cannot take: an integer mask, or a floating one of
    another dtype than the query (a ``TypeError``, an ``AssertionError`` and a ``RuntimeError``,
    what ``torch.nn.MultiheadAttention`` raises for the one or the other)."""
