"""Drop-in replacements for ``torch.nn.LayerNorm`` and ``torch.nn.MultiheadAttention``.

Both subclass the PyTorch module they replace: same constructor arguments, same parameters and
buffers, same ``state_dict`` keys and the same attributes that PyTorch's own Transformer layers
read (``batch_first``, ``_qkv_same_embed_dim``, ``in_proj_bias``, ...). Only ``forward`` differs:
it runs pyformer's kernels. An input the kernels do not take (a dtype or device they were not
built for, nested tensors, ``add_bias_kv``/``add_zero_attn``) goes to PyTorch's own forward, so the
answer is always right; it is just not pyformer's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
import torch.nn.functional as TF

from ._backend import BackendMixin, kernels_support

__all__ = ["LayerNorm", "MultiheadAttention"]


class LayerNorm(BackendMixin, torch.nn.LayerNorm):
    r"""Layer normalization over the trailing dims, on :func:`pyformer.functional.layer_norm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A drop-in for :class:`torch.nn.LayerNorm` (it subclasses it): the same arguments, parameters
    (``weight``, ``bias``) and ``state_dict`` keys, so ``load_state_dict`` works both ways. It adds
    one thing, the fused "Add & Norm" of a post-norm Transformer layer: ``norm(x, residual)``
    returns ``layer_norm(x + residual)`` computed in one pass by
    :func:`pyformer.functional.add_layer_norm`.

    Args:
        normalized_shape (int or list or torch.Size): the trailing shape normalized over.
        eps (float): added to the variance for stability. Default: 1e-5
        elementwise_affine (bool): learnable per-element ``weight`` (init 1) and ``bias``
            (init 0). Default: ``True``
        bias (bool): with ``elementwise_affine``, whether to learn ``bias`` too. Default: ``True``
        device, dtype: factory arguments of the parameters.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`; ``residual`` (optional) the same shape.
        - Output: the same shape as the input.

    Examples::

        >>> norm = pyformer.nn.LayerNorm(512)
        >>> y = norm(torch.randn(8, 20, 512))
        >>> norm.load_state_dict(torch.nn.LayerNorm(512).state_dict())
        >>> y = norm(attn_out, residual=x)          # Add & Norm: layer_norm(attn_out + x)
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if residual is not None:
            return self.add_norm(input, residual)[0]
        if self.backend == "reference" or kernels_support((input, self.weight, self.bias)):
            return self.F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(input)

    def add_norm(self, input: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        """``(layer_norm(input + residual), input + residual)`` in one pass (the Add & Norm)."""
        if self.backend == "reference" or kernels_support(
            (input, residual, self.weight, self.bias)
        ):
            return self.F.add_layer_norm(
                input, residual, self.normalized_shape, self.weight, self.bias, self.eps
            )
        s = input + residual
        return super().forward(s), s


def _additive(m: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask of ``dtype``: a bool "may attend" mask becomes 0 / -inf."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
    return m


def _combine(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """Both masks applied: AND of bool "may attend" masks, else the sum of additive ones (in the
    floating dtype they promote to; the op converts the result to the scores' dtype itself, from
    the unexpanded mask)."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    floats = [m.dtype for m in (a, b) if m.dtype != torch.bool]
    dtype = floats[0] if len(floats) == 1 else torch.promote_types(*floats)
    return _additive(a, dtype) + _additive(b, dtype)


def _right_padding_lengths(valid: Tensor) -> Optional[Tensor]:
    """Lengths (N,) if the bool (N, S) "valid key" mask is right padding, else None.

    Right padding (every row is ``True...True False...False``) is the common case; the kernels
    then take ``key_lengths`` and read no mask at all. The test reads the mask once on the host,
    so it is skipped while compiling (the mask is used instead: still correct).
    """
    if torch.compiler.is_compiling() or valid.dim() != 2:
        return None
    lengths = valid.sum(dim=-1)
    expected = torch.arange(valid.shape[-1], device=valid.device) < lengths.unsqueeze(-1)
    return lengths if torch.equal(expected, valid) else None


class MultiheadAttention(BackendMixin, torch.nn.MultiheadAttention):
    r"""Multi-head attention on :func:`pyformer.functional.attention`.

    .. math::
        \text{MultiHead}(Q, K, V) = \text{Concat}(head_1,\dots,head_h)W^O,\quad
        head_i = \text{softmax}\Big(\frac{QW_i^Q (KW_i^K)^T}{\sqrt{d_k}} + M\Big) VW_i^V

    A drop-in for :class:`torch.nn.MultiheadAttention` (it subclasses it): the same constructor,
    the same parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``, ``in_proj_bias``,
    ``out_proj``), so ``load_state_dict`` from a PyTorch module works, and the same ``forward``
    with PyTorch's conventions at the boundary:

    - ``key_padding_mask`` (N, S): bool ``True`` = *ignore* this key, or float, added.
    - ``attn_mask`` (L, S) or (N * num_heads, L, S): bool ``True`` = *not allowed*, or float, added.
    - ``is_causal``: a hint that ``attn_mask`` is the causal mask; it is then applied by index
      arithmetic in the kernel and ``attn_mask`` is not read (as PyTorch's hint allows).

    Inside, masks are converted to pyformer's convention (bool ``True`` = may attend, broadcast
    as (N, 1, 1, S) or (1, 1, L, S), never expanded); a right-padding ``key_padding_mask`` becomes
    ``key_lengths``. A query row whose every key is masked returns zeros (PyTorch returns NaN).
    ``add_bias_kv``, ``add_zero_attn``, nested tensors and dtypes or devices the kernels were not
    built for use PyTorch's own forward.

    Args:
        embed_dim (int): model dimension ``E``.
        num_heads (int): number of heads; ``embed_dim`` must divide by it.
        dropout (float): dropout on the attention probabilities in training. Default: 0.0
        bias (bool): biases on the input and output projections. Default: ``True``
        add_bias_kv, add_zero_attn (bool): as in PyTorch (run by PyTorch's forward).
        kdim, vdim (int, optional): key and value feature sizes. Default: ``embed_dim``
        batch_first (bool): inputs and outputs are (N, L, E) instead of (L, N, E).
        device, dtype: factory arguments of the parameters.

    Shape:
        - query: :math:`(L, N, E)`, :math:`(N, L, E)` with ``batch_first``, or :math:`(L, E)`
        - key: :math:`(S, N, E_k)`, :math:`(N, S, E_k)` or :math:`(S, E_k)`; value likewise with
          :math:`E_v`
        - output: like query; weights :math:`(N, L, S)` averaged over heads, else
          :math:`(N, \text{num\_heads}, L, S)` (no N for unbatched input)

    Returns:
        ``(attn_output, attn_weights)``, ``attn_weights`` None unless ``need_weights``. The weights
        are the probabilities before dropout.

    Examples::

        >>> mha = pyformer.nn.MultiheadAttention(256, 8, batch_first=True)
        >>> mha.load_state_dict(torch.nn.MultiheadAttention(256, 8, batch_first=True).state_dict())
        >>> x = torch.randn(4, 100, 256)
        >>> pad = torch.arange(100) >= torch.tensor([[100], [90], [50], [7]])  # True = padding
        >>> out, weights = mha(x, x, x, key_padding_mask=pad)
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        args = (
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        if (
            self.bias_k is not None
            or self.add_zero_attn
            or query.dim() not in (2, 3)
            or query.dim() != key.dim()
            or key.dim() != value.dim()
        ):
            return super().forward(*args)  # PyTorch's own path (and its shape errors)
        weights = [
            self.in_proj_weight,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
        ]
        if self.backend == "pyformer" and not kernels_support(
            [query, key, value, key_padding_mask, attn_mask] + weights
        ):
            return super().forward(*args)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "pyformer.nn.MultiheadAttention: is_causal=True is a hint that attn_mask is the "
                "causal mask, so attn_mask must be given (as in torch.nn.MultiheadAttention)"
            )

        batched = query.dim() == 3
        if hasattr(TF, "_mha_shape_check"):  # PyTorch's own checks and messages
            TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        self_attention = query is key and key is value
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E), views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        n, lq, e = query.shape
        lk = key.shape[1]
        # PyTorch raises AssertionError for these; so do we, naming the argument
        for arg, t, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.shape[0] != n or t.shape[-1] != dim:
                raise AssertionError(
                    f"pyformer.nn.MultiheadAttention: {arg} must have batch size {n} and "
                    f"{dim} features, got shape {tuple(t.shape)} (batch_first={self.batch_first})"
                )
        if value.shape[1] != lk:
            raise AssertionError(
                f"pyformer.nn.MultiheadAttention: key and value must have the same sequence "
                f"length, got {lk} and {value.shape[1]}"
            )
        h = self.num_heads
        dh = self.head_dim

        # projections: one matmul for self-attention with packed weights
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if self_attention:
                q, k, v = TF.linear(query, w, b).chunk(3, dim=-1)
            else:
                wq, wk, wv = w.chunk(3)
                bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
                q, k, v = TF.linear(query, wq, bq), TF.linear(key, wk, bk), TF.linear(value, wv, bv)
        else:
            b = self.in_proj_bias
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q = TF.linear(query, self.q_proj_weight, bq)
            k = TF.linear(key, self.k_proj_weight, bk)
            v = TF.linear(value, self.v_proj_weight, bv)
        # (N, L, E) -> (N, H, L, Dh): strided views, the kernels take them as they are
        q = q.unflatten(-1, (h, dh)).transpose(1, 2)
        k = k.unflatten(-1, (h, dh)).transpose(1, 2)
        v = v.unflatten(-1, (h, dh)).transpose(1, 2)

        # masks: PyTorch's convention (True = NOT allowed) -> pyformer's (True = may attend)
        causal = bool(is_causal)
        mask = None
        if attn_mask is not None and not causal:
            am = (
                attn_mask.view(1, 1, lq, lk)
                if attn_mask.dim() == 2
                else attn_mask.view(n, h, lq, lk)
            )
            mask = ~am if am.dtype == torch.bool else am
        key_lengths = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                valid = ~key_padding_mask
                key_lengths = _right_padding_lengths(valid)
                kp = None if key_lengths is not None else valid.view(n, 1, 1, lk)
            else:
                kp = key_padding_mask.view(n, 1, 1, lk)
            mask = _combine(mask, kp)

        out, probs = self.F.attention(
            q,
            k,
            v,
            mask,
            causal=causal,
            key_lengths=key_lengths,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )

        out = out.transpose(1, 2).reshape(n, lq, e)
        out = TF.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            probs = probs.mean(dim=1)
        if not batched:
            probs = probs.squeeze(0)
        return out, probs
