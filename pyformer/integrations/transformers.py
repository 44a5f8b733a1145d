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
A mask that is exactly right padding, alone or with causal masking (a prompt batch padded on the
right), goes to the kernels as ``key_lengths`` (and ``causal=True``) instead, so they skip the
padded keys rather than read the mask; any other mask (left padding included) is passed as is.

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


def _tracing(mask: torch.Tensor) -> bool:
    """True where the mask's values cannot be read on the host: torch.compile, torch.export, jit
    tracing, vmap/grad transforms, fake or meta tensors and other tensor subclasses (a graph must
    not depend on the values of one mask)."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._get_tracing_state() is not None
        or type(mask) is not torch.Tensor
        or torch._C._functorch.is_functorch_wrapped_tensor(mask)
        or mask.device.type == "meta"
    )


def _right_padding(
    mask: torch.Tensor, batch: int, lq: int, lk: int
) -> Optional[Tuple[torch.Tensor, bool]]:
    """``(key_lengths, causal)`` that mask exactly the keys ``mask`` masks, or None.

    ``mask`` is transformers' ``(B or 1, 1, Lq or 1, Lk)`` mask: bool (True = may attend) or float
    (added). It converts when every row allows exactly the keys ``j < n`` for some ``n`` (a
    prefix), with ``n`` the same in every row of a batch element (right padding: ``key_lengths =
    n``) or ``n = min(i + 1, L_b)`` in row ``i`` when ``Lq == Lk`` (causal, top-left as the kernel's
    ``causal=True``, plus right padding: ``key_lengths = L_b``). pyformer's kernels then skip the
    padded keys instead of reading and masking them. A float mask converts only when its entries
    are all 0 or -inf (another value is added to the scores, which key_lengths cannot do). Left
    padding, per-head masks and anything else keep the mask.

    Exact, not a heuristic: with ``f`` the index of a row's first False (``Lk`` when none, the
    first minimal value being the one ``torch.min`` returns) and ``c`` the row's sum, the ``f``
    entries before ``f`` are all nonzero, so ``c >= f`` with equality only when every entry past
    ``f`` is False: ``c == f`` holds exactly for a prefix of length ``f``. The lengths are then
    compared with the two patterns on ``(B, Lq)`` integers, so the conversion happens only where
    ``key_lengths`` (and ``causal``) allow the same keys of every row as the mask.

    Cost: two reductions over the mask (a byte per element: the uint8 view of a bool mask, or one
    bool temporary of that size and one more for the -inf check of a float mask), a few
    ``(B, Lq)`` ops and one device-to-host read; no tensor of the scores' size.
    """
    if mask.dim() != 4 or mask.size(1) != 1 or mask.size(3) != lk or lk == 0 or lq == 0:
        return None
    if mask.size(0) not in (1, batch) or mask.size(2) not in (1, lq) or mask.requires_grad:
        return None
    # a dim broadcast by stride 0 (an expand()) holds one distinct row: read it once
    for d in (0, 2):
        if mask.stride(d) == 0 and mask.size(d) > 1:
            mask = mask.narrow(d, 0, 1)
    if mask.dtype == torch.bool:
        allowed = mask.view(torch.uint8)
        others_ok = None
    elif mask.is_floating_point():
        allowed = mask == 0
        others_ok = torch.isneginf(mask).sum(-1)  # every entry that is not 0 must be -inf
    else:
        return None
    allowed = allowed[:, 0]  # (B', Lq', Lk)
    count = allowed.sum(-1, dtype=torch.int32)
    first_min, first_at = torch.min(allowed.view(torch.uint8), -1)
    n = torch.where(first_min == 0, first_at, lk)  # index of the first masked key, Lk if none
    prefix = count == n
    if others_ok is not None:
        prefix &= others_ok[:, 0] == lk - count
    rows = torch.arange(1, n.size(1) + 1, device=n.device)
    plain = (n == n[:, -1:]).all()
    causal = (n == torch.minimum(rows, n[:, -1:])).all() if n.size(1) == lq == lk else plain
    ok_plain, ok_causal = torch.stack([plain, causal]).logical_and(prefix.all()).tolist()
    if not (ok_plain or ok_causal):
        return None
    lengths = n[:, -1].expand(batch)  # row Lq-1 allows L_b keys in both patterns
    return lengths, not ok_plain  # a mask that is both (every L_b <= 1): no causal needed


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
        module: the calling attention module (read: ``is_causal``).
        query: :math:`(B, H, L_q, D)`; key, value: :math:`(B, H_{kv}, L_k, D)`.
        attention_mask: None, bool (True = may attend) or float (added), broadcastable to
            :math:`(B, H, L_q, L_k)`. Exactly right padding (with or without causal masking)
            becomes ``key_lengths``; the same keys are masked either way.
        dropout: dropout probability on the attention probabilities (the caller passes 0 in eval),
            drawn by :func:`pyformer.functional.attention`: seeded by ``torch.manual_seed`` but
            not the elements ``eager`` or ``sdpa`` drop.
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

    # grouped-query attention: key and value keep their H_kv heads; pyformer reads each kv head
    # for its group of query heads in place (no repeated copy)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    mask, key_lengths = attention_mask, None
    if mask is not None and not _tracing(mask):
        found = _right_padding(mask, query.shape[0], query.shape[2], key.shape[2])
        if found is not None:
            mask, (key_lengths, causal) = None, found
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
        key_lengths=key_lengths,
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
