"""pyformer's layers: drop-in PyTorch modules and the textbook Transformer, on pyformer's kernels.

- :class:`LayerNorm`, :class:`MultiheadAttention`: drop-in replacements for the PyTorch modules
  of the same names (subclasses, state_dict-compatible); :func:`pyformer.convert` swaps them into
  an existing model.
- The textbook Transformer: :class:`ScaledDotProductAttention`, :class:`MultiHeadAttention`,
  :class:`PositionalEncoding`, :class:`TransformerEmbedding`, :class:`PositionwiseFeedForward`,
  :class:`EncoderLayer`, :class:`DecoderLayer`, :class:`Encoder`, :class:`Decoder`,
  :class:`Transformer`.
- :func:`set_backend` switches a model between pyformer's kernels (``"pyformer"``) and the
  pure-PyTorch reference (``"reference"``) without touching its weights.

Importing this package costs little beyond ``import pyformer`` (which loads the kernels).
"""

from ._backend import BACKENDS, set_backend
from .layers import LayerNorm, MultiheadAttention
from .transformer import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    MultiHeadAttention,
    PositionalEncoding,
    PositionwiseFeedForward,
    ScaledDotProductAttention,
    TokenEmbedding,
    Transformer,
    TransformerEmbedding,
)

from . import transformer as _transformer

__all__ = ["BACKENDS", "set_backend", "LayerNorm", "MultiheadAttention", *_transformer.__all__]
