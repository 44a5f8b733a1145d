"""pyformer's ops, the public entry points: torch.ops.pyformer.* with PyTorch-style signatures.

Every function here runs on the CPU and CUDA kernels compiled into ``pyformer._C``, is
differentiable (autograd everywhere; backward passes are ops of their own) and traces under
``torch.compile(fullgraph=True)``. Semantics: ``docs/ops.md``; the pure-PyTorch
equivalents are in :mod:`pyformer.reference`.

Masks follow :func:`torch.nn.functional.scaled_dot_product_attention`: a bool ``mask`` is True
where a query **may** attend a key, a floating ``mask`` is added to the scaled scores (``-inf``
masks). ``causal=True`` (or ``"top_left"``) lets query ``i`` attend keys ``j <= i``,
``causal="bottom_right"`` keys ``j <= i + Lk - Lq`` (a KV cache's alignment); ``key_lengths`` (an int tensor of
shape ``(B,)``) masks keys ``j >= key_lengths[b]`` without any mask tensor. All given masks
combine. A query row with every key masked gets all-zero probabilities (and output), never NaN.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C
from . import ops as _ops  # noqa: F401  (registers the ops)

__all__ = [
    "scaled_qk",
    "masked_softmax",
    "layer_norm",
    "add_layer_norm",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "swiglu",
    "attention",
]

_P = torch.ops.pyformer
_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function_variadic


# Each function below takes ``pyformer._C``'s direct entry (the same dispatcher call as
# ``torch.ops.pyformer``, without the generic OpOverload's per-call Python cost) unless
# torch.compile is tracing or an argument or a mode overrides ``__torch_function__``; the test is
# written out in each function rather than called, a Python call being a fair share of a small
# op's cost.


_CAUSAL = {False: 0, True: 1, "top_left": 1, "bottom_right": 2}


def _causal(causal) -> int:
    """The schema's code: 0 none, 1 top-left (key j <= i), 2 bottom-right (j <= i + Lk - Lq)."""
    if causal is True or causal is False or isinstance(causal, str):
        code = _CAUSAL.get(causal)
        if code is not None:
            return code
    raise TypeError(
        'pyformer: argument \'causal\': expected a bool, "top_left" or "bottom_right", '
        f"got {causal!r}"
    )


def _scale(scale: Optional[float]) -> Optional[float]:
    # None reaches the op, which takes 1/sqrt(D) (1 when D = 0): D stays symbolic under
    # torch.compile(dynamic=True) instead of being read here
    return None if scale is None else float(scale)


def _shape(normalized_shape: Union[int, Sequence[int], torch.Size]) -> List[int]:
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        return [normalized_shape]
    if not isinstance(normalized_shape, (list, tuple, torch.Size)):
        raise TypeError(
            "pyformer: argument 'normalized_shape': expected an int or a sequence of ints, "
            f"got {type(normalized_shape).__name__}"
        )
    out = []
    for s in normalized_shape:
        if isinstance(s, bool) or not (
            isinstance(s, (int, torch.SymInt)) or hasattr(type(s), "__index__")
        ):
            raise TypeError(
                "pyformer: argument 'normalized_shape': expected an int or a sequence of ints, "
                f"got an element of type {type(s).__name__}"
            )
        out.append(s if isinstance(s, (int, torch.SymInt)) else operator.index(s))
    return out


def scaled_qk(q: Tensor, k: Tensor, scale: Optional[float] = None) -> Tensor:
    r"""Scaled attention scores :math:`\text{scale} \cdot q k^\top`, the scale fused into the product.

    Args:
        q: queries, shape ``(..., Lq, D)``.
        k: keys, shape ``(..., Lk, D)`` with the same leading dims as ``q``.
        scale: the factor; ``1 / sqrt(D)`` when None.

    Shape:
        Output ``(..., Lq, Lk)``, the dtype of ``q``.

    Example::

        >>> q, k = torch.randn(2, 4, 7, 64), torch.randn(2, 4, 9, 64)
        >>> pyformer.functional.scaled_qk(q, k).shape
        torch.Size([2, 4, 7, 9])
    """
    if not _is_compiling() and not _has_torch_function(q, k):
        return _C.scaled_qk(q, k, _scale(scale))
    return _P.scaled_qk(q, k, _scale(scale))


def masked_softmax(
    scores: Tensor,
    mask: Optional[Tensor] = None,
    *,
    scale: float = 1.0,
    causal: Union[bool, str] = False,
    key_lengths: Optional[Tensor] = None,
) -> Tensor:
    r"""Softmax over the last dim of :math:`\text{scale} \cdot \text{scores} + M`, in one pass.

    :math:`M` is 0 or :math:`-\infty` per element, from the masks given (all combine):

    Args:
        scores: shape ``(..., Lq, Lk)`` (or ``(..., Lk)`` without ``causal``/``key_lengths``).
        mask: bool (True = may attend) or floating (added) tensor broadcastable to ``scores``,
            e.g. ``(B, 1, 1, Lk)`` padding or ``(1, 1, Lq, Lk)``; read through its broadcast
            strides, never expanded in memory. A floating mask may require grad.
        scale: multiplies the scores before the mask is added.
        causal: ``True`` or ``"top_left"``: query row ``i`` (dim -2) may attend key ``j`` only
            where ``j <= i``; ``"bottom_right"``: where ``j <= i + Lk - Lq`` (the last query
            sees every key: chunked prefill and decoding against a KV cache).
        key_lengths: int tensor ``(B,)`` with ``B = scores.shape[0]``; keys
            ``j >= key_lengths[b]`` are masked (right padding). Values must lie in ``[0, Lk]``.

    Returns:
        Probabilities of the shape and dtype of ``scores``; all zeros in fully masked rows.

    Example::

        >>> s = torch.randn(2, 8, 5, 5)
        >>> p = pyformer.functional.masked_softmax(s, causal=True, key_lengths=torch.tensor([5, 3]))
        >>> p[1, 0, 4]  # keys 3 and 4 are padding
        tensor([..., ..., ..., 0., 0.])
    """
    if not _is_compiling() and not _has_torch_function(scores, mask, key_lengths):
        return _C.masked_softmax(scores, mask, scale, causal, key_lengths)
    return _P.masked_softmax(scores, mask, float(scale), _causal(causal), key_lengths)


def layer_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer normalization, the function and signature of :func:`torch.nn.functional.layer_norm`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot w + b

    over the trailing ``normalized_shape`` dims (flattened to one row), biased variance,
    statistics in float32 (float64 for float64 input).

    Args:
        x: input ``(*, *normalized_shape)``.
        normalized_shape: the trailing dims to normalize over (an int or a sequence).
        weight, bias: optional, of shape ``normalized_shape`` and ``x``'s dtype.
        eps: added to the variance.

    Example::

        >>> x = torch.randn(4, 10, 768)
        >>> pyformer.functional.layer_norm(x, (768,)).shape
        torch.Size([4, 10, 768])
    """
    if not _is_compiling() and not _has_torch_function(x, weight, bias):
        return _C.layer_norm(x, normalized_shape, weight, bias, eps)
    y, _, _ = _P.layer_norm(x, _shape(normalized_shape), weight, bias, float(eps))
    return y


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor]:
    r"""A Transformer's "Add & Norm" in one pass: ``s = x + residual``, ``y = layer_norm(s)``.

    Args:
        x, residual: tensors of the same shape ``(*, *normalized_shape)``, dtype and device.
        normalized_shape, weight, bias, eps: as for :func:`layer_norm`.

    Returns:
        ``(y, s)``: the normalized sum and the sum itself (the next residual, for pre-norm
        stacks). Both are differentiable.
    """
    if not _is_compiling() and not _has_torch_function(x, residual, weight, bias):
        return _C.add_layer_norm(x, residual, normalized_shape, weight, bias, eps)
    y, s, _, _ = _P.add_layer_norm(x, residual, _shape(normalized_shape), weight, bias, float(eps))
    return y, s


def _eps(eps: Optional[float]) -> Optional[float]:
    # None reaches the op, which takes the machine epsilon of the computation type
    return None if eps is None else float(eps)


def rms_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    r"""RMS normalization, the function and signature of :func:`torch.nn.functional.rms_norm`.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot w

    over the trailing ``normalized_shape`` dims (flattened to one row), in float32 (float64 for
    float64 input), rounded once to ``x``'s dtype.

    Args:
        x: input ``(*, *normalized_shape)``.
        normalized_shape: the trailing dims to normalize over (an int or a sequence).
        weight: optional, of shape ``normalized_shape`` and ``x``'s dtype.
        eps: added to the mean square; None is the machine epsilon of the computation type
            (``torch.finfo(torch.float32).eps`` for float32, float16 and bfloat16 input, that of
            float64 for float64), what :func:`torch.nn.functional.rms_norm` uses.

    Example::

        >>> x = torch.randn(4, 10, 4096)
        >>> pyformer.functional.rms_norm(x, (4096,), torch.ones(4096)).shape
        torch.Size([4, 10, 4096])
    """
    if not _is_compiling() and not _has_torch_function(x, weight):
        return _C.rms_norm(x, normalized_shape, weight, eps)
    y, _ = _P.rms_norm(x, _shape(normalized_shape), weight, _eps(eps))
    return y


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The pre-norm residual step of a Llama-style block in one pass: ``s = x + residual``,
    ``y = rms_norm(s)``.

    Args:
        x, residual: tensors of the same shape ``(*, *normalized_shape)``, dtype and device.
        normalized_shape, weight, eps: as for :func:`rms_norm`.

    Returns:
        ``(y, s)``: the normalized sum and the sum itself (rounded to the dtype, the next
        residual). Both are differentiable.
    """
    if not _is_compiling() and not _has_torch_function(x, residual, weight):
        return _C.add_rms_norm(x, residual, normalized_shape, weight, eps)
    y, s, _ = _P.add_rms_norm(x, residual, _shape(normalized_shape), weight, _eps(eps))
    return y, s


def apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False
) -> Tuple[Tensor, Tensor]:
    r"""Rotary position embedding of queries and keys, in one kernel.

    ``x * cos + rotate(x) * sin`` on the first ``Dr = cos.shape[-1]`` dims of every head of ``q``
    and ``k``; the remaining ``D - Dr`` dims pass through. ``rotate`` is rotate-half
    (``(-x2, x1)`` with ``x1, x2`` the two halves: GPT-NeoX, Llama and Hugging Face's
    ``apply_rotary_pos_emb``) or, with ``interleaved=True``, the same on adjacent pairs
    ``(x[2i], x[2i+1])`` (GPT-J). Computed in float32 (float64 for float64), rounded once.

    Args:
        q: ``(B, H, L, D)``, any strides (the transposed view of a ``(B, L, H, D)`` projection is
            read and written in place of a copy).
        k: ``(B, H_kv, L, D)``, ``H_kv`` independent of ``H`` (grouped-query attention).
        cos, sin: ``(B or 1, L, Dr)`` or ``(L, Dr)``, ``Dr`` even and at most ``D``: what Hugging
            Face's rotary embedding modules return, broadcast over heads. Any floating dtype;
            they are differentiable too.
        interleaved: the GPT-J pair layout instead of rotate-half.

    Returns:
        ``(q_rot, k_rot)``: the shapes and dtypes of ``q`` and ``k``, with their strides (or
        contiguous where ``D`` is not unit-stride).

    Example::

        >>> q, k = torch.randn(2, 8, 16, 64), torch.randn(2, 2, 16, 64)
        >>> pos = torch.arange(16.0)[:, None] / 10000 ** (torch.arange(0, 64, 2) / 64)
        >>> cos, sin = torch.cat((pos, pos), -1).cos()[None], torch.cat((pos, pos), -1).sin()[None]
        >>> q_rot, k_rot = pyformer.functional.apply_rotary(q, k, cos, sin)
    """
    if not _is_compiling() and not _has_torch_function(q, k, cos, sin):
        return _C.apply_rotary(q, k, cos, sin, interleaved)
    return _P.apply_rotary(q, k, cos, sin, bool(interleaved))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    r"""``silu(gate) * up`` in one pass (the activation of a SwiGLU MLP: Llama, Mistral, Qwen).

    Args:
        gate, up: tensors of one shape, dtype and device (``gate_proj(x)`` and ``up_proj(x)``).

    Returns:
        ``silu(gate) * up``, contiguous, computed in float32 (float64 for float64) and rounded
        once. Differentiable in both inputs.
    """
    if not _is_compiling() and not _has_torch_function(gate, up):
        return _C.swiglu(gate, up)
    return _P.swiglu(gate, up)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    causal: Union[bool, str] = False,
    key_lengths: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    algorithm: str = "auto",
    return_lse: bool = False,
) -> Union[Tuple[Tensor, Optional[Tensor]], Tuple[Tensor, None, Tensor]]:
    r"""Multi-head scaled dot-product attention.

    ``probs = masked_softmax(scaled_qk(q, k, scale), mask, causal=causal, key_lengths=key_lengths)``,
    dropout on ``probs`` when ``dropout_p > 0``, then ``out = probs @ v``. Matches
    :func:`torch.nn.functional.scaled_dot_product_attention` with the equivalent bool mask (and
    ``enable_gqa=True``), except that a query row with every key masked gives a zero output row.

    Two algorithms, picked per call: on the CPU, without ``need_weights``, the flash algorithm
    (query and key blocks, an online softmax, never an ``Lq x Lk`` buffer: memory O(L) in
    inference and training, where the backward recomputes the probabilities from the saved
    log-sum-exp and regenerates the dropout mask from its key; a floating mask that requires grad
    gets its gradient from a ``(B, H, Lq, Lk)`` buffer that lives only during the backward);
    otherwise the bmm algorithm, which forms the probabilities (what ``need_weights`` returns and
    its backward reads). Both agree within ``docs/ops.md``'s bounds and drop the same elements.
    On CUDA the bmm algorithm runs. ``algorithm`` picks one: ``"auto"`` (the above),
    ``"flash"`` (an error where it cannot run: ``need_weights``, a device without a flash kernel;
    the edges its kernel does not take, ``D = 0``, no keys or ``scale = 0``, run the bmm
    algorithm) or ``"bmm"``.

    Args:
        q: ``(B, H, Lq, D)``; k: ``(B, H_kv, Lk, D)``; v: ``(B, H_kv, Lk, Dv)``, where
            ``H_kv`` divides ``H`` (grouped-query attention: query head ``h`` reads kv head
            ``h // (H // H_kv)``; k and v are read in place, never repeated).
        mask, causal, key_lengths: as for :func:`masked_softmax`, on scores ``(B, H, Lq, Lk)``.
        scale: ``1 / sqrt(D)`` when None.
        dropout_p: dropout probability on the attention probabilities (pass 0 in eval). The
            keep mask comes from a counter-based generator (Philox4x32-10,
            :func:`pyformer.reference.dropout_keep`) under a key drawn per call from torch's
            default CPU generator, whatever the device: seeded by ``torch.manual_seed``, the
            same elements for both algorithms, every dtype and every mask, the distribution of
            :func:`torch.nn.functional.dropout` but not its elements (``docs/ops.md``).
        need_weights: also return the probabilities (before dropout).
        algorithm: ``"auto"``, ``"flash"`` or ``"bmm"`` (above).
        return_lse: also return the log-sum-exp of each query row's logits
            ``scale * q @ k^T + M`` over its unmasked keys, ``(B, H, Lq)`` in float32 (float64
            for float64 inputs), ``-inf`` for a fully masked row: what merging the attention of
            key chunks needs. It is differentiable. The flash op computes it (with
            ``algorithm="auto"`` on a device without flash kernels, CUDA today, through the bmm
            composition), so it does not combine with ``need_weights``, ``algorithm="bmm"``,
            ``scale=0`` or ``D = 0``.

    Returns:
        ``(out, weights)``: ``out`` ``(B, H, Lq, Dv)`` and the probabilities
        ``(B, H, Lq, Lk)`` when ``need_weights``, else None. Both are differentiable. With
        ``return_lse``, ``(out, None, lse)``.

    Example::

        >>> q = k = v = torch.randn(2, 8, 16, 64)
        >>> out, _ = pyformer.functional.attention(q, k, v, key_lengths=torch.tensor([16, 9]))
    """
    if return_lse:
        return _attention_with_lse(
            algorithm, q, k, v, mask, scale, causal, key_lengths, dropout_p, need_weights
        )
    if algorithm != "auto":
        return _attention_algorithm(
            algorithm, q, k, v, mask, scale, causal, key_lengths, dropout_p, need_weights
        )
    if not _is_compiling() and not _has_torch_function(q, k, v, mask, key_lengths):
        return _C.attention(
            q, k, v, mask, _scale(scale), causal, key_lengths, dropout_p, need_weights
        )
    # The probabilities are asked for only when returned (need_weights): the op's autograd
    # kernel forms them where its backward needs them, and otherwise runs the flash algorithm.
    need_probs = bool(need_weights)
    out, probs, _ = _P.attention(
        q,
        k,
        v,
        mask,
        _scale(scale),
        _causal(causal),
        key_lengths,
        float(dropout_p),
        need_probs,
    )
    return out, (probs if need_weights else None)


def _check_algorithm(algorithm) -> None:
    if algorithm not in ("auto", "flash", "bmm"):
        raise ValueError(
            "pyformer.attention: argument 'algorithm': expected 'auto', 'flash' or 'bmm', "
            f"got {algorithm!r}"
        )


def _refuse_unless_flash(what: str, weights, also: Optional[str] = None, hint: str = "") -> None:
    """Raise where the flash op cannot run: need_weights, or ``also`` (a reason of the caller's).
    ``what`` begins the message."""
    why = "need_weights=True" if weights else also
    if why is not None:
        raise ValueError(f"pyformer.attention: {what}, so it cannot take {why}{hint}")


def _refuse_flash_off_cpu(q) -> None:
    """algorithm='flash' asks for the fused kernel, which the CPU alone has."""
    if torch.is_tensor(q) and q.device.type != "cpu":
        raise NotImplementedError(
            "pyformer.attention: algorithm='flash' has kernels on the CPU only, not on "
            f"{q.device.type}; use algorithm='auto' or 'bmm'"
        )


def _attention_with_lse(algorithm, q, k, v, mask, scale, causal, key_lengths, dropout_p, weights):
    """attention(..., return_lse=True): the flash op, whose (out, lse) are both differentiable."""
    _check_algorithm(algorithm)
    also = (
        "algorithm='bmm'"
        if algorithm == "bmm"
        else "scale=0"
        if scale is not None and float(scale) == 0
        else None
    )
    _refuse_unless_flash("return_lse comes from the flash algorithm", weights, also)
    if algorithm == "flash":
        _refuse_flash_off_cpu(q)
    out, lse, _ = _P.flash_attention(
        q, k, v, mask, _scale(scale), _causal(causal), key_lengths, float(dropout_p)
    )
    return out, None, lse


def _attention_algorithm(algorithm, q, k, v, mask, scale, causal, key_lengths, dropout_p, weights):
    """attention with ``algorithm`` "flash" or "bmm" asked for by name."""
    _check_algorithm(algorithm)
    kw = dict(scale=scale, causal=causal, key_lengths=key_lengths, dropout_p=dropout_p)
    if algorithm == "bmm":  # the probabilities formed (asked for), returned only if wanted
        out, probs = attention(q, k, v, mask, need_weights=True, **kw)
        return out, (probs if weights else None)
    _refuse_unless_flash(
        "algorithm='flash' forms no probabilities",
        weights,
        hint="; use algorithm='auto' or 'bmm'",
    )
    _refuse_flash_off_cpu(q)
    return attention(q, k, v, mask, **kw)
