"""The textbook Transformer ("Attention Is All You Need", post-norm) on pyformer's ops.

The module tree follows the well-known teaching implementation (``w_q``/``w_k``/``w_v``/
``w_concat``, ``TransformerEmbedding``, ``EncoderLayer``/``DecoderLayer``, ...) so that a reader
who knows that code knows this one. Every op inside runs through ``self.F``: pyformer's kernels
(:mod:`pyformer.functional`) by default, or the pure-PyTorch compositions of
:mod:`pyformer.reference` after ``pyformer.nn.set_backend(model, "reference")`` (or
``Transformer(..., backend="reference")``): one code path, two backends.

Masks follow pyformer's convention: bool, ``True`` = may attend, shaped to broadcast against
(B, H, Lq, Lk) (padding masks are (B, 1, 1, Lk)); causal masking is a flag, never a tensor.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn._backend import BackendMixin, check_backend, kernels_support, reference, set_backend
from ..nn.layers import LayerNorm

__all__ = [
    "ScaledDotProductAttention",
    "MultiHeadAttention",
    "PositionalEncoding",
    "TokenEmbedding",
    "TransformerEmbedding",
    "PositionwiseFeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "Encoder",
    "Decoder",
    "Transformer",
]


class ScaledDotProductAttention(BackendMixin, nn.Module):
    r"""softmax(Q K^T / sqrt(d) + M) V on :func:`pyformer.functional.attention`.

    Args (forward):
        q (Tensor): :math:`(B, H, L_q, D)`
        k (Tensor): :math:`(B, H, L_k, D)`
        v (Tensor): :math:`(B, H, L_k, D_v)`
        mask (Tensor, optional): bool (``True`` = may attend) or float (added), broadcastable to
            :math:`(B, H, L_q, L_k)`.
        causal (bool): query ``i`` sees keys ``j <= i`` only.
        key_lengths (Tensor, optional): :math:`(B,)` int, keys ``j >= key_lengths[b]`` masked.
        dropout_p (float): dropout on the probabilities.
        need_weights (bool): also return the probabilities.

    Returns:
        ``(out, weights)``: :math:`(B, H, L_q, D_v)` and :math:`(B, H, L_q, L_k)` or None.
    """

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[Tensor] = None,
        *,
        causal: bool = False,
        key_lengths: Optional[Tensor] = None,
        dropout_p: float = 0.0,
        need_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        ops = self.F
        if self.backend == "pyformer" and not kernels_support((q, k, v, mask)):
            ops = reference()  # PyTorch ops for what the kernels do not take
        return ops.attention(
            q,
            k,
            v,
            mask,
            causal=causal,
            key_lengths=key_lengths,
            dropout_p=dropout_p,
            need_weights=need_weights,
        )


class MultiHeadAttention(BackendMixin, nn.Module):
    r"""Multi-head attention with separate ``w_q``, ``w_k``, ``w_v`` and ``w_concat`` projections.

    Args:
        d_model (int): model dimension; must divide by ``n_head``.
        n_head (int): number of heads.
        drop_prob (float): dropout on the attention probabilities in training. Default: 0.0
        device, dtype: factory arguments of the parameters.

    Forward:
        ``forward(q, k, v, mask=None, *, causal=False, key_lengths=None, need_weights=False)``
        with ``q`` :math:`(B, L_q, d_{model})`, ``k``/``v`` :math:`(B, L_k, d_{model})` and masks as
        in :class:`ScaledDotProductAttention`. Returns the output :math:`(B, L_q, d_{model})`, or
        ``(output, weights)`` with weights :math:`(B, H, L_q, L_k)` when ``need_weights``.

    Attention maps: set ``store_attention = True`` and the weights of the last call are kept in
    ``last_attention`` (detached); :meth:`Transformer.forward` with ``return_attention=True``
    does that for every attention of a model.
    """

    def __init__(
        self, d_model: int, n_head: int, drop_prob: float = 0.0, *, device=None, dtype=None
    ):
        super().__init__()
        if d_model % n_head:
            raise ValueError(
                f"MultiHeadAttention: d_model ({d_model}) must be divisible by n_head ({n_head})"
            )
        fk = {"device": device, "dtype": dtype}
        self.n_head = n_head
        self.drop_prob = drop_prob
        self.attention = ScaledDotProductAttention()
        self.w_q = nn.Linear(d_model, d_model, **fk)
        self.w_k = nn.Linear(d_model, d_model, **fk)
        self.w_v = nn.Linear(d_model, d_model, **fk)
        self.w_concat = nn.Linear(d_model, d_model, **fk)
        self.store_attention = False
        self.last_attention: Optional[Tensor] = None

    def split(self, t: Tensor) -> Tensor:
        """(B, L, d_model) -> (B, H, L, d_model / H), a view."""
        return t.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

    @staticmethod
    def concat(t: Tensor) -> Tensor:
        """(B, H, L, Dh) -> (B, L, H * Dh)."""
        b, h, length, dh = t.shape
        return t.transpose(1, 2).reshape(b, length, h * dh)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[Tensor] = None,
        *,
        causal: bool = False,
        key_lengths: Optional[Tensor] = None,
        need_weights: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        q, k, v = self.split(self.w_q(q)), self.split(self.w_k(k)), self.split(self.w_v(v))
        want = need_weights or self.store_attention
        out, weights = self.attention(
            q,
            k,
            v,
            mask,
            causal=causal,
            key_lengths=key_lengths,
            dropout_p=self.drop_prob if self.training else 0.0,
            need_weights=want,
        )
        if self.store_attention:
            self.last_attention = weights.detach()
        out = self.w_concat(self.concat(out))
        return (out, weights) if need_weights else out


class PositionalEncoding(nn.Module):
    r"""The sinusoidal position encoding (a fixed, non-persistent buffer).

    .. math::
        PE_{(pos, 2i)} = \sin(pos / 10000^{2i/d_{model}}),\quad
        PE_{(pos, 2i+1)} = \cos(pos / 10000^{2i/d_{model}})

    ``forward(x)`` with token ids ``x`` :math:`(B, L)` returns the :math:`(L, d_{model})`
    encodings of positions ``0..L-1`` (added to token embeddings by broadcasting).
    """

    def __init__(self, d_model: int, max_len: int, *, device=None, dtype=None):
        super().__init__()
        self.max_len = max_len
        pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
        two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
        angle = pos / torch.pow(10000.0, two_i / d_model)
        enc = torch.zeros(max_len, d_model, dtype=torch.float64)
        enc[:, 0::2] = torch.sin(angle)
        enc[:, 1::2] = torch.cos(angle[:, : d_model // 2])
        self.register_buffer(
            "encoding",
            enc.to(device=device, dtype=dtype or torch.get_default_dtype()),
            persistent=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"PositionalEncoding: sequence length {length} exceeds max_len {self.max_len}"
            )
        return self.encoding[:length]


class TokenEmbedding(nn.Embedding):
    """Token ids -> vectors; the padding token's vector is zero and gets no gradient."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        padding_idx: Optional[int] = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__(vocab_size, d_model, padding_idx=padding_idx, device=device, dtype=dtype)


class TransformerEmbedding(nn.Module):
    r"""Token embedding + sinusoidal positional encoding, then dropout.

    Args:
        vocab_size (int), d_model (int), max_len (int), drop_prob (float),
        padding_idx (int, optional): the padding token id. device, dtype: factory arguments.

    Shape: ids :math:`(B, L)` -> :math:`(B, L, d_{model})`.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        max_len: int,
        drop_prob: float,
        padding_idx: Optional[int] = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.tok_emb = TokenEmbedding(vocab_size, d_model, padding_idx, device=device, dtype=dtype)
        self.pos_emb = PositionalEncoding(d_model, max_len, device=device, dtype=dtype)
        self.drop_out = nn.Dropout(p=drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_out(self.tok_emb(x) + self.pos_emb(x))


class PositionwiseFeedForward(nn.Module):
    r"""``linear2(dropout(relu(linear1(x))))``, applied at every position.

    Args: d_model (int), hidden (int), drop_prob (float), device, dtype.
    """

    def __init__(
        self, d_model: int, hidden: int, drop_prob: float = 0.1, *, device=None, dtype=None
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden, device=device, dtype=dtype)
        self.linear2 = nn.Linear(hidden, d_model, device=device, dtype=dtype)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(p=drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    r"""Padding-masked self-attention and a feed-forward block, each followed by Add & Norm.

    ``x = norm1(dropout1(self_attn(x)) + x)``; ``x = norm2(dropout2(ffn(x)) + x)``, each Add & Norm
    one call of :func:`pyformer.functional.add_layer_norm`.

    Args: d_model, ffn_hidden, n_head (int), drop_prob (float), device, dtype.

    Forward: ``forward(x, src_mask=None, src_key_lengths=None)``; ``x`` :math:`(B, S, d_{model})`,
    ``src_mask`` bool :math:`(B, 1, 1, S)` (``True`` = real token).
    """

    def __init__(
        self,
        d_model: int,
        ffn_hidden: int,
        n_head: int,
        drop_prob: float,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.attention = MultiHeadAttention(d_model, n_head, **fk)
        self.norm1 = LayerNorm(d_model, **fk)
        self.dropout1 = nn.Dropout(p=drop_prob)
        self.ffn = PositionwiseFeedForward(d_model, ffn_hidden, drop_prob, **fk)
        self.norm2 = LayerNorm(d_model, **fk)
        self.dropout2 = nn.Dropout(p=drop_prob)

    def forward(
        self, x: Tensor, src_mask: Optional[Tensor] = None, src_key_lengths: Optional[Tensor] = None
    ) -> Tensor:
        y = self.attention(x, x, x, src_mask, key_lengths=src_key_lengths)
        x = self.norm1(self.dropout1(y), residual=x)
        y = self.ffn(x)
        return self.norm2(self.dropout2(y), residual=x)


class DecoderLayer(nn.Module):
    r"""Causal self-attention, encoder-decoder cross-attention and a feed-forward block, each
    followed by Add & Norm (:func:`pyformer.functional.add_layer_norm`).

    Args: d_model, ffn_hidden, n_head (int), drop_prob (float), device, dtype.

    Forward: ``forward(dec, enc, trg_mask=None, src_mask=None)``; ``dec`` :math:`(B, T, d)`,
    ``enc`` :math:`(B, S, d)`, ``trg_mask`` bool broadcastable to :math:`(B, 1, T, T)` (combined
    with the causal mask), ``src_mask`` bool :math:`(B, 1, 1, S)`.
    """

    def __init__(
        self,
        d_model: int,
        ffn_hidden: int,
        n_head: int,
        drop_prob: float,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.self_attention = MultiHeadAttention(d_model, n_head, **fk)
        self.norm1 = LayerNorm(d_model, **fk)
        self.dropout1 = nn.Dropout(p=drop_prob)
        self.enc_dec_attention = MultiHeadAttention(d_model, n_head, **fk)
        self.norm2 = LayerNorm(d_model, **fk)
        self.dropout2 = nn.Dropout(p=drop_prob)
        self.ffn = PositionwiseFeedForward(d_model, ffn_hidden, drop_prob, **fk)
        self.norm3 = LayerNorm(d_model, **fk)
        self.dropout3 = nn.Dropout(p=drop_prob)

    def forward(
        self,
        dec: Tensor,
        enc: Optional[Tensor],
        trg_mask: Optional[Tensor] = None,
        src_mask: Optional[Tensor] = None,
    ) -> Tensor:
        y = self.self_attention(dec, dec, dec, trg_mask, causal=True)
        x = self.norm1(self.dropout1(y), residual=dec)
        if enc is not None:
            y = self.enc_dec_attention(x, enc, enc, src_mask)
            x = self.norm2(self.dropout2(y), residual=x)
        y = self.ffn(x)
        return self.norm3(self.dropout3(y), residual=x)


class Encoder(nn.Module):
    """Embedding and ``n_layers`` :class:`EncoderLayer`: ids :math:`(B, S)` -> :math:`(B, S, d)`."""

    def __init__(
        self,
        enc_voc_size: int,
        max_len: int,
        d_model: int,
        ffn_hidden: int,
        n_head: int,
        n_layers: int,
        drop_prob: float,
        padding_idx: Optional[int] = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.emb = TransformerEmbedding(
            enc_voc_size, d_model, max_len, drop_prob, padding_idx, **fk
        )
        self.layers = nn.ModuleList(
            [EncoderLayer(d_model, ffn_hidden, n_head, drop_prob, **fk) for _ in range(n_layers)]
        )

    def forward(self, x: Tensor, src_mask: Optional[Tensor] = None) -> Tensor:
        x = self.emb(x)
        for layer in self.layers:
            x = layer(x, src_mask)
        return x


class Decoder(nn.Module):
    """Embedding, ``n_layers`` :class:`DecoderLayer` and the output projection to logits."""

    def __init__(
        self,
        dec_voc_size: int,
        max_len: int,
        d_model: int,
        ffn_hidden: int,
        n_head: int,
        n_layers: int,
        drop_prob: float,
        padding_idx: Optional[int] = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.emb = TransformerEmbedding(
            dec_voc_size, d_model, max_len, drop_prob, padding_idx, **fk
        )
        self.layers = nn.ModuleList(
            [DecoderLayer(d_model, ffn_hidden, n_head, drop_prob, **fk) for _ in range(n_layers)]
        )
        self.linear = nn.Linear(d_model, dec_voc_size, **fk)

    def forward(
        self,
        trg: Tensor,
        enc_src: Tensor,
        trg_mask: Optional[Tensor] = None,
        src_mask: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.emb(trg)
        for layer in self.layers:
            x = layer(x, enc_src, trg_mask, src_mask)
        return self.linear(x)


class Transformer(nn.Module):
    r"""The encoder-decoder Transformer of "Attention Is All You Need" (post-norm).

    Args:
        src_pad_idx (int): padding token id of the source vocabulary.
        trg_pad_idx (int): padding token id of the target vocabulary.
        enc_voc_size (int): source vocabulary size.
        dec_voc_size (int): target vocabulary size.
        d_model (int): model dimension.
        n_head (int): attention heads.
        max_len (int): longest sequence the positional encoding covers.
        ffn_hidden (int): hidden size of the feed-forward blocks.
        n_layers (int): encoder layers and decoder layers (each).
        drop_prob (float): dropout on embeddings, sub-layer outputs and feed-forward hiddens.
        device, dtype: factory arguments of the parameters.
        backend (str): ``"pyformer"`` (the kernels, default) or ``"reference"`` (pure PyTorch).

    ``forward(src, trg)`` builds the masks itself from the token ids: the source padding mask
    (B, 1, 1, S) for encoder self-attention and cross-attention, the target padding mask
    (B, 1, 1, T) together with the causal flag for decoder self-attention.

    Shape:
        - src: :math:`(B, S)` int64 token ids; trg: :math:`(B, T)` int64 token ids
        - output: logits :math:`(B, T, \text{dec\_voc\_size})`

    Examples::

        >>> model = pyformer.models.Transformer(0, 0, 100, 100, d_model=64, n_head=4, max_len=32,
        ...                                     ffn_hidden=128, n_layers=2, drop_prob=0.1)
        >>> logits = model(src, trg_in)                      # (B, T, 100)
        >>> logits, maps = model(src, trg_in, return_attention=True)
        >>> maps["decoder.layers.1.enc_dec_attention"].shape  # (B, 4, T, S)
    """

    def __init__(
        self,
        src_pad_idx: int,
        trg_pad_idx: int,
        enc_voc_size: int,
        dec_voc_size: int,
        d_model: int,
        n_head: int,
        max_len: int,
        ffn_hidden: int,
        n_layers: int,
        drop_prob: float,
        *,
        device=None,
        dtype=None,
        backend: str = "pyformer",
    ):
        super().__init__()
        check_backend(backend)
        self.src_pad_idx = src_pad_idx
        self.trg_pad_idx = trg_pad_idx
        fk = {"device": device, "dtype": dtype}
        self.encoder = Encoder(
            enc_voc_size,
            max_len,
            d_model,
            ffn_hidden,
            n_head,
            n_layers,
            drop_prob,
            src_pad_idx,
            **fk,
        )
        self.decoder = Decoder(
            dec_voc_size,
            max_len,
            d_model,
            ffn_hidden,
            n_head,
            n_layers,
            drop_prob,
            trg_pad_idx,
            **fk,
        )
        set_backend(self, backend)

    def make_src_mask(self, src: Tensor) -> Tensor:
        """Bool (B, 1, 1, S): ``True`` where the source token is not padding."""
        return (src != self.src_pad_idx)[:, None, None, :]

    def make_trg_mask(self, trg: Tensor) -> Tensor:
        """Bool (B, 1, 1, T): ``True`` where the target token is not padding (causal is a flag)."""
        return (trg != self.trg_pad_idx)[:, None, None, :]

    def encode(self, src: Tensor) -> Tuple[Tensor, Tensor]:
        """``(enc_src, src_mask)``: the encoder output (B, S, d_model) and the source mask."""
        src_mask = self.make_src_mask(src)
        return self.encoder(src, src_mask), src_mask

    def decode(self, trg: Tensor, enc_src: Tensor, src_mask: Tensor) -> Tensor:
        """Logits (B, T, dec_voc_size) for target ids ``trg`` given the encoder output."""
        return self.decoder(trg, enc_src, self.make_trg_mask(trg), src_mask)

    def forward(
        self, src: Tensor, trg: Tensor, return_attention: bool = False
    ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
        if not return_attention:
            enc_src, src_mask = self.encode(src)
            return self.decode(trg, enc_src, src_mask)
        attns = {name: m for name, m in self.named_modules() if isinstance(m, MultiHeadAttention)}
        before = {name: m.store_attention for name, m in attns.items()}
        try:
            for m in attns.values():
                m.store_attention = True
            enc_src, src_mask = self.encode(src)
            logits = self.decode(trg, enc_src, src_mask)
            maps = {name: m.last_attention for name, m in attns.items()}
        finally:
            for name, m in attns.items():
                m.store_attention = before[name]
                m.last_attention = None
        return logits, maps
