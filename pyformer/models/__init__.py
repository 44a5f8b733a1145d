"""The textbook Transformer ("Attention Is All You Need", post-norm) on pyformer's kernels.

:class:`Transformer` and its parts: :class:`ScaledDotProductAttention`,
:class:`MultiHeadAttention`, :class:`PositionalEncoding`, :class:`TokenEmbedding`,
:class:`TransformerEmbedding`, :class:`PositionwiseFeedForward`, :class:`EncoderLayer`,
:class:`DecoderLayer`, :class:`Encoder`, :class:`Decoder`. They are built from the drop-in layers
of :mod:`pyformer.nn` and, like them, switch between pyformer's kernels and the pure-PyTorch
reference with :func:`pyformer.nn.set_backend`.

The torch drop-ins (:class:`pyformer.nn.LayerNorm`, :class:`pyformer.nn.MultiheadAttention`) are
in :mod:`pyformer.nn`; this package is a model written on them, not a replacement for a PyTorch
module.
"""

from .transformer import *  # noqa: F401,F403  (the names of transformer.__all__)
from .transformer import __all__  # noqa: F401
