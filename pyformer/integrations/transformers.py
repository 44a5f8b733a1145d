"""pyformer as an attention implementation of Hugging Face ``transformers``.

    >>> import pyformer.integrations.transformers as pt
    >>> pt.register()                                   # -> "pyformer"
    >>> model = AutoModel.from_pretrained(path, attn_implementation="pyformer")
    >>> model.set_attn_implementation("pyformer")       # or switch an existing model

``register()`` adds :func:`pyformer_attention_forward` to transformers' ``AttentionInterface`` and,
where the installed version has one, transformers' own SDPA mask builder to its
``AttentionMaskInterface`` under the same name: that builder makes bool masks with ``True`` = may
attend, which is exactly pyformer's convention, and leaves the mask out (``None``) when plain
causal masking covers it, which pyformer then applies by index arithmetic (``causal=True``).

What the kernels do not take goes to transformers' SDPA path (PyTorch ops), never to a wrong
answer: ``softcap``, ``position_bias``, attention sinks (``s_aux``), paged caches, and dtypes or
devices pyformer was not built for. Fully masked query rows (a left-padded causal model's padding
rows) come out as zeros, like SDPA's, where ``eager`` averages the values.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["NAME", "register", "pyformer_attention_forward"]

NAME = "pyformer"

_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, L, D) -> (B, H_kv * n_rep, L, D): grouped-query attention's shared K/V heads."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _sdpa_fallback(
    module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def pyformer_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' attention-function signature on :func:`pyformer.functional.attention`.

    Args:
        module: the calling attention module (read: ``is_causal``, ``num_key_value_groups``).
        query: :math:`(B, H, L_q, D)`; key, value: :math:`(B, H_{kv}, L_k, D)`.
        attention_mask: None, bool (True = may attend) or float (added), broadcastable to
            :math:`(B, H, L_q, L_k)`.
        dropout: dropout probability on the attention probabilities (the caller passes 0 in eval).
        scaling: score scale; default :math:`1/\\sqrt{D}`.
        is_causal: overrides ``module.is_causal``; causal masking applies only without a mask and
            with more than one query (as transformers' SDPA path does).

    Returns:
        ``(attn_output, attn_weights)``: :math:`(B, L_q, H, D)` contiguous, and the probabilities
        :math:`(B, H, L_q, L_k)` when ``output_attentions`` is asked for, else None.
    """
    from ..nn._backend import kernels_support

    cache = kwargs.get("cache")
    if (
        any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS)
        or (cache is not None and type(cache).__name__ == "PagedAttentionCache")
        or not kernels_support((query, key, value, attention_mask))
    ):
        return _sdpa_fallback(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    import pyformer.functional as PF

    n_rep = getattr(module, "num_key_value_groups", 1) or 1
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    mask = attention_mask
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
    want = bool(kwargs.get("output_attentions", False))
    out, weights = PF.attention(
        query,
        key,
        value,
        mask,
        scale=scaling,
        causal=causal,
        dropout_p=float(dropout),
        need_weights=want,
    )
    return out.transpose(1, 2).contiguous(), weights


def register() -> str:
    """Register pyformer with ``transformers``; returns the name to use, ``"pyformer"``.

    After it, ``model.set_attn_implementation("pyformer")`` or
    ``from_pretrained(..., attn_implementation="pyformer")`` runs every attention of a model
    through pyformer's kernels. Calling it again is harmless.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, pyformer_attention_forward)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:  # older transformers: models build their own (float) masks, taken as is
        return NAME
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
