"""Drop-in replacements for ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and
``torch.nn.MultiheadAttention``.

Each subclasses the PyTorch module they replace: same constructor arguments, same parameters and
buffers, same ``state_dict`` keys and the same attributes that PyTorch's own Transformer layers
read (``batch_first``, ``_qkv_same_embed_dim``, ``in_proj_bias``, ...). Only ``forward`` differs:
it runs pyformer's kernels. An input the kernels do not take (a dtype or device they were not
built for, a mix of dtypes or devices, nested tensors, ``add_bias_kv``/``add_zero_attn``) goes to
PyTorch's own forward, so the answer is always PyTorch's; each layer decides this in one method,
``_kernels_take``. Bad input raises the exceptions of :mod:`pyformer.nn.errors`, which are also the
types PyTorch's modules raise. Under ``torch.jit.script`` both layers run PyTorch's own
implementation (TorchScript cannot compile pyformer's Python path or call its ops).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
import torch.nn.functional as TF

from ._backend import BackendMixin, kernels_support, uniform
from .errors import AttentionShapeError, MaskDtypeError, ShapeError

__all__ = ["LayerNorm", "RMSNorm", "MultiheadAttention"]


class LayerNorm(BackendMixin, torch.nn.LayerNorm):
    r"""Layer normalization over the trailing dims, on :func:`pyformer.functional.layer_norm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A drop-in for :class:`torch.nn.LayerNorm` (it subclasses it): the same arguments, parameters
    (``weight``, ``bias``) and ``state_dict`` keys, so ``load_state_dict`` works both ways. It adds
    one thing, the fused "Add & Norm" of a post-norm Transformer layer: ``norm(x, residual)``
    returns ``layer_norm(x + residual)`` computed in one pass by
    :func:`pyformer.functional.add_layer_norm`.

    An input the kernels do not take runs :func:`torch.nn.functional.layer_norm`, with PyTorch's
    answer or error: a dtype other than the parameters' (e.g. a bfloat16 input with float32
    parameters, which PyTorch accepts), an integer input, another device, a negative or non-finite
    ``eps``. An input whose trailing dims are not ``normalized_shape`` raises
    :class:`pyformer.nn.ShapeError`, a ``ValueError`` and a ``RuntimeError`` (what
    ``torch.nn.LayerNorm`` raises). Under ``torch.jit.script`` the module runs
    :func:`torch.nn.functional.layer_norm` (``residual`` added first).

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
        if torch.jit.is_scripting():
            if residual is not None:
                input = input + residual
            return TF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._forward(input, residual)

    @torch.jit.unused
    def _forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        if residual is not None:
            return self.add_norm(input, residual)[0]
        if not self._kernels_take((input, self.weight, self.bias)):
            return super().forward(input)
        try:
            return self.F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        except ValueError as e:  # a shape: raised as the RuntimeError torch.nn.LayerNorm raises
            raise ShapeError(str(e)) from e

    def add_norm(self, input: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        """``(layer_norm(input + residual), input + residual)`` in one pass (the Add & Norm)."""
        if not self._kernels_take((input, residual, self.weight, self.bias)):
            s = input + residual
            return super().forward(s), s
        try:
            return self.F.add_layer_norm(
                input, residual, self.normalized_shape, self.weight, self.bias, self.eps
            )
        except ValueError as e:
            raise ShapeError(str(e)) from e

    def _kernels_take(self, tensors: Sequence[Optional[Tensor]]) -> bool:
        """Whether pyformer's ops take ``tensors`` (the input first, then the residual if any and
        the parameters); if not, the layer runs PyTorch's layer norm. The one place this is
        decided: a floating input, one dtype and one device for all, an ``eps`` the op takes
        (finite, >= 0), and a dtype and device the kernels were built for (the reference backend
        runs on any)."""
        x = tensors[0]
        if not (x.is_floating_point() and uniform(x, tensors) and 0.0 <= self.eps < math.inf):
            return False
        return self.backend == "reference" or kernels_support(tensors)


class RMSNorm(BackendMixin, torch.nn.RMSNorm):
    r"""RMS normalization over the trailing dims, on :func:`pyformer.functional.rms_norm`.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} * \gamma

    A drop-in for :class:`torch.nn.RMSNorm` (it subclasses it): the same arguments, parameter
    (``weight``) and ``state_dict`` keys. Like :class:`LayerNorm` it adds the fused residual add
    of a pre-norm block: ``norm(x, residual=r)`` returns ``rms_norm(x + r)``, and
    :meth:`add_norm` returns the sum too, both from :func:`pyformer.functional.add_rms_norm`.

    An input the kernels do not take runs :func:`torch.nn.functional.rms_norm`, with PyTorch's
    answer or error (a dtype other than the weight's, an integer input, another device, a
    negative or non-finite ``eps``). Trailing dims that are not ``normalized_shape`` raise
    :class:`pyformer.nn.ShapeError` (a ``RuntimeError``, as PyTorch's module raises).

    Args:
        normalized_shape (int or list or torch.Size): the trailing shape normalized over.
        eps (float, optional): added to the mean square; None is the machine epsilon of the
            computation type, as in PyTorch. Default: ``None``
        elementwise_affine (bool): a learnable per-element ``weight`` (init 1). Default: ``True``
        device, dtype: factory arguments of the parameter.

    Examples::

        >>> norm = pyformer.nn.RMSNorm(4096)
        >>> y = norm(torch.randn(8, 20, 4096))
        >>> y, s = norm.add_norm(attn_out, residual=x)   # rms_norm(attn_out + x), attn_out + x
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            if residual is not None:
                x = x + residual
            return TF.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return self._forward(x, residual)

    @torch.jit.unused
    def _forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        if residual is not None:
            return self.add_norm(x, residual)[0]
        if not self._kernels_take((x, self.weight)):
            return super().forward(x)
        try:
            return self.F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        except ValueError as e:  # a shape: raised as the RuntimeError torch.nn.RMSNorm raises
            raise ShapeError(str(e)) from e

    def add_norm(self, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        """``(rms_norm(x + residual), x + residual)`` in one pass."""
        if not self._kernels_take((x, residual, self.weight)):
            s = x + residual
            return super().forward(s), s
        try:
            return self.F.add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps)
        except ValueError as e:
            raise ShapeError(str(e)) from e

    def _kernels_take(self, tensors: Sequence[Optional[Tensor]]) -> bool:
        """As :meth:`LayerNorm._kernels_take`, with ``eps`` None allowed."""
        x = tensors[0]
        eps_ok = self.eps is None or 0.0 <= self.eps < math.inf
        if not (x.is_floating_point() and uniform(x, tensors) and eps_ok):
            return False
        return self.backend == "reference" or kernels_support(tensors)


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


_MHA = "pyformer.nn.MultiheadAttention"


def _dims(*dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _check_mask_dtype(name: str, m: Optional[Tensor]) -> None:
    """An integer mask is an error (as in PyTorch), never added as an additive mask."""
    if m is not None and m.dtype != torch.bool and not m.is_floating_point():
        raise MaskDtypeError(
            f"{_MHA}: argument '{name}': expected a bool or floating mask, got dtype {m.dtype} "
            "(an integer mask is never added; convert it with .bool())"
        )


def _check_mask_float_dtype(name: str, m: Optional[Tensor], query: Tensor, need_weights: bool):
    """A floating mask of another dtype than the query is an error too, except float32 without
    need_weights: the dtypes PyTorch takes (its need_weights path adds the mask in the query's
    dtype, its SDPA path also takes float32)."""
    if m is None or not m.is_floating_point():
        return
    takes = (query.dtype,) if need_weights else (query.dtype, torch.float32)
    if m.dtype not in takes:
        also = "" if need_weights else " or float32"
        raise MaskDtypeError(
            f"{_MHA}: argument '{name}': expected a bool mask or one of the query's dtype "
            f"({query.dtype}){also}, got dtype {m.dtype}"
        )


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

    - ``key_padding_mask`` (N, S), (S) unbatched: bool ``True`` = *ignore* this key, or float,
      added.
    - ``attn_mask`` (L, S) or (N * num_heads, L, S), (num_heads, L, S) unbatched: bool ``True`` =
      *not allowed*, or float, added.
    - ``is_causal``: a hint that ``attn_mask`` is the causal mask; it is then applied by index
      arithmetic in the kernel and ``attn_mask`` is not read (as PyTorch's hint allows).

    Inside, masks are converted to pyformer's convention (bool ``True`` = may attend, broadcast
    as (N, 1, 1, S) or (1, 1, L, S), never expanded); a right-padding ``key_padding_mask`` becomes
    ``key_lengths``. A query row whose every key is masked returns zeros (PyTorch returns NaN).
    A float mask may have another floating dtype than the query (it is converted).

    ``add_bias_kv``, ``add_zero_attn``, nested tensors, dtypes or devices the kernels were not
    built for, and a mix of dtypes or devices among query, key, value and the parameters (e.g. an
    ``in_proj_bias`` of another dtype, which PyTorch accepts) run PyTorch's own forward, with its
    answer or its error. Under ``torch.jit.script`` the module runs PyTorch's computation
    (:func:`torch.nn.functional.multi_head_attention_forward`).

    Errors: a query, key, value or mask of the wrong shape raises
    :class:`pyformer.nn.AttentionShapeError` (a ``ValueError``, an ``AssertionError`` and a
    ``RuntimeError``: what PyTorch raises for these); an integer mask, or a floating mask of
    another dtype than the query (float32 is also taken without ``need_weights``), raises :class:`pyformer.nn.MaskDtypeError` (a ``TypeError``,
    an ``AssertionError`` and a ``RuntimeError``).

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
        if torch.jit.is_scripting():
            return self._torch_forward(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        return self._forward(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )

    def _torch_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """PyTorch's computation, what a scripted module runs: ``torch.nn.MultiheadAttention``'s
        forward without its fused inference fast path (TorchScript cannot call ``super()``)."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            # as PyTorch does, keeping `query is key is value` (one packed projection)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = (
                    query.transpose(1, 0),
                    key.transpose(1, 0),
                    value.transpose(1, 0),
                )
        out, weights = TF.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def _kernels_take(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
    ) -> bool:
        """Whether pyformer's path takes these inputs; if not, the layer runs PyTorch's forward.
        The one place this is decided: no ``add_bias_kv``/``add_zero_attn``, a floating query,
        one dtype and one device for query, key, value and every parameter (masks: the device; a
        float mask of another dtype is converted), and tensors the kernels were built for (the
        reference backend runs on any)."""
        if self.bias_k is not None or self.add_zero_attn or not query.is_floating_point():
            return False
        params = (
            self.in_proj_weight,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
        )
        if not uniform(query, (key, value) + params):
            return False
        for m in (key_padding_mask, attn_mask):
            if m is not None and m.device != query.device:
                return False
        return self.backend == "reference" or kernels_support(
            (query, key, value, key_padding_mask, attn_mask)
        )

    def _check_shapes(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
    ) -> None:
        """The shapes ``torch.nn.MultiheadAttention`` takes; anything else raises
        :class:`AttentionShapeError` naming the argument (never a reshape error deep inside, or an
        error about an argument the caller did not pass). Only integers are compared until a check
        fails: the messages are built then."""
        nd = query.dim()
        if nd not in (2, 3):
            raise AttentionShapeError(
                f"{_MHA}: argument 'query': expected a 3-D (batched) or 2-D (unbatched) tensor, "
                f"got shape {_dims(*query.shape)}"
            )
        for name, t in (("key", key), ("value", value)):
            if t.dim() != nd:
                raise AttentionShapeError(
                    f"{_MHA}: argument '{name}': expected a {nd}-D tensor (as 'query' is), "
                    f"got shape {_dims(*t.shape)}"
                )
        batched = nd == 3
        # the batch and sequence dims: (N, L, E), (L, N, E), or (L, E) unbatched
        b, s = ((0, 1) if self.batch_first else (1, 0)) if batched else (0, 0)
        n = query.shape[b] if batched else 1
        lq, lk = query.shape[s], key.shape[s]
        if query.shape[-1] != self.embed_dim:
            self._shape_error("query", query, "L", "N", self.embed_dim)
        if key.shape[-1] != self.kdim or (batched and key.shape[b] != n):
            self._shape_error("key", key, "S", n, self.kdim)
        if (
            value.shape[-1] != self.vdim
            or value.shape[s] != lk
            or (batched and value.shape[b] != n)
        ):
            self._shape_error("value", value, lk, n, self.vdim)
        if key_padding_mask is not None:
            kpm = key_padding_mask.shape
            if (batched and kpm != (n, lk)) or (not batched and kpm != (lk,)):
                raise AttentionShapeError(
                    f"{_MHA}: argument 'key_padding_mask': expected shape "
                    + (f"(N, S) = {_dims(n, lk)}" if batched else f"(S) = {_dims(lk)}")
                    + f", got {_dims(*kpm)}"
                )
        if attn_mask is not None:
            am, h = attn_mask.shape, self.num_heads
            if am != (lq, lk) and am != ((n * h, lq, lk) if batched else (h, lq, lk)):
                three = (
                    f"(N * num_heads, L, S) = {_dims(n * h, lq, lk)}"
                    if batched
                    else f"(num_heads, L, S) = {_dims(h, lq, lk)}"
                )
                raise AttentionShapeError(
                    f"{_MHA}: argument 'attn_mask': expected shape (L, S) = {_dims(lq, lk)} or "
                    f"{three}, got {_dims(*am)}"
                )

    def _shape_error(self, name: str, t: Tensor, seq, batch, features: int) -> None:
        """Raises the error of a query, key or value of the wrong shape, in the input's layout."""
        if t.dim() == 2:
            expected, how = _dims(seq, features), "unbatched"
        elif self.batch_first:
            expected, how = _dims(batch, seq, features), "batch_first=True"
        else:
            expected, how = _dims(seq, batch, features), "batch_first=False"
        raise AttentionShapeError(
            f"{_MHA}: argument '{name}': expected shape {expected} ({how}), got {_dims(*t.shape)}"
        )

    @torch.jit.unused
    def _forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if not self._kernels_take(query, key, value, key_padding_mask, attn_mask):
            return super().forward(  # PyTorch's own path (and its errors)
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                f"{_MHA}: is_causal=True is a hint that attn_mask is the causal mask, so "
                "attn_mask must be given (as in torch.nn.MultiheadAttention)"
            )
        self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        _check_mask_float_dtype("key_padding_mask", key_padding_mask, query, need_weights)
        _check_mask_float_dtype("attn_mask", attn_mask, query, need_weights)

        batched = query.dim() == 3
        self_attention = query is key and key is value
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E), views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        n, lq, e = query.shape
        lk = key.shape[1]
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

        try:
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
        except ValueError as e:  # what the checks above let through, as PyTorch's error types
            raise AttentionShapeError(str(e)) from e

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
