"""Pure-PyTorch reference implementations of every pyformer op: the textbook compositions.

This one module is the truth for the tests, ``pyformer check`` and ``pyformer bench``: it uses
nothing but plain PyTorch ops (matmul, divide by sqrt(d), masked_fill, softmax, matmul; layer norm
from mean and var), runs in any dtype including float64 and on any device, and follows
``docs/ops.md`` to the letter, fully masked rows included.

For benchmarks, ``zero_masked_rows=False`` gives the plain textbook composition (no extra pass for
fully masked rows), which is what people write by hand and what pyformer is timed against.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "allowed",
    "scaled_qk",
    "masked_softmax",
    "layer_norm",
    "add_layer_norm",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "rotate_half",
    "swiglu",
    "attention",
    "attention_lse",
    "dropout_keep",
    "philox4x32_10",
    "upcast",
]


def upcast(*tensors, dtype=torch.float64):
    """Floating tensors converted to ``dtype`` (detached, requires_grad kept); others unchanged."""
    out = []
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            u = t.detach().to(dtype)
            u.requires_grad_(t.requires_grad)
            out.append(u)
        else:
            out.append(t)
    return out if len(out) != 1 else out[0]


def allowed(
    scores: Union[Tensor, Sequence[int]],
    mask: Optional[Tensor] = None,
    causal: Union[bool, str] = False,
    key_lengths: Optional[Tensor] = None,
    device=None,
    expand: bool = True,
) -> Optional[Tensor]:
    """Bool tensor of the positions that may be attended (True = may attend), or None if all may.

    ``scores`` is the scores tensor or its shape (..., Lq, Lk). Combines a bool mask (True = may
    attend), a float mask (-inf = masked), ``causal`` (key j <= query i; "bottom_right": j <= i + Lk - Lq) and ``key_lengths`` (B,)
    (key j < key_lengths[b], b indexing dim 0). With ``expand=False`` the result keeps the
    broadcast shape of its parts (what masked_fill needs, without a full-size mask in memory).
    """
    if isinstance(scores, Tensor):
        shape, device = tuple(scores.shape), scores.device
    else:
        shape = tuple(scores)
    lq, lk = (shape[-2] if len(shape) >= 2 else 1), shape[-1]
    ok = None

    def both(a, b):
        return b if a is None else a & b

    if mask is not None:
        m = mask if mask.dtype == torch.bool else mask != float("-inf")
        ok = both(ok, m.to(device))
    if causal:
        i = torch.arange(lq, device=device).unsqueeze(-1)
        j = torch.arange(lk, device=device)
        ok = both(ok, j <= i + (lk - lq if causal == "bottom_right" else 0))
    if key_lengths is not None:
        j = torch.arange(lk, device=device)
        lens = key_lengths.to(device).reshape((-1,) + (1,) * (len(shape) - 1))
        ok = both(ok, j < lens)
    if ok is not None and expand:
        ok = ok.expand(shape)
    return ok


def scaled_qk(q: Tensor, k: Tensor, scale: Optional[float] = None) -> Tensor:
    """``q @ k^T`` then scaled: divided by sqrt(D) by default, else multiplied by ``scale``."""
    s = torch.matmul(q, k.transpose(-2, -1))
    if scale is None:
        return s / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else s
    return s * scale


def _masked_logits(scores, mask, scale, causal, key_lengths):
    """(scale * scores + M with -inf at every masked position, the allowed positions or None)."""
    x = scores * scale if scale != 1.0 else scores
    if mask is not None and mask.dtype != torch.bool:
        x = x + torch.where(
            mask == float("-inf"), torch.zeros((), dtype=x.dtype, device=x.device), mask.to(x.dtype)
        )
    ok = allowed(scores, mask, causal, key_lengths, expand=False)
    if ok is not None:
        x = x.masked_fill(~ok, float("-inf"))
    return x, ok


def masked_softmax(
    scores: Tensor,
    mask: Optional[Tensor] = None,
    *,
    scale: float = 1.0,
    causal: Union[bool, str] = False,
    key_lengths: Optional[Tensor] = None,
    zero_masked_rows: bool = True,
) -> Tensor:
    """softmax(scale * scores + M, -1): masked_fill(-inf) then softmax; fully masked rows -> 0."""
    x, ok = _masked_logits(scores, mask, scale, causal, key_lengths)
    p = torch.softmax(x, dim=-1)
    if ok is not None and zero_masked_rows:
        # a masked key is exactly 0 (so a fully masked row is zeros), also in a row whose
        # unmasked scores hold NaN or +-inf (torch.softmax gives NaN everywhere there); its
        # gradient is 0 too
        p = p.masked_fill(~ok, 0.0)
    return p


def layer_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing dims (biased variance)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    mean = xf.mean(dim=dims, keepdim=True)
    var = xf.var(dim=dims, keepdim=True, unbiased=False)
    y = (xf - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor]:
    """(layer_norm(x + residual), x + residual): a Transformer's Add & Norm."""
    s = x + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def default_rms_eps(dtype: torch.dtype) -> float:
    """The ``eps`` of ``rms_norm(..., eps=None)``: the machine epsilon of the computation type,
    float32 for float32, float16 and bfloat16 (what ``torch.nn.functional.rms_norm`` uses),
    float64 for float64."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the trailing dims, in float32 (float64)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = default_rms_eps(x.dtype) if eps is None else eps
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm residual stream of a Llama block."""
    s = x + residual
    return rms_norm(s, normalized_shape, weight, eps), s


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """(-x2, x1) on the pairs of the last dim: halves (x1, x2) = (x[:D/2], x[D/2:]), or with
    ``interleaved`` the adjacent pairs (x[2i], x[2i+1])."""
    if interleaved:
        p = x.unflatten(-1, (-1, 2))
        return torch.stack((-p[..., 1], p[..., 0]), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False
) -> Tuple[Tensor, Tensor]:
    """(x * cos + rotate_half(x) * sin) on the first ``Dr = cos.shape[-1]`` dims of each head of
    q (B, H, L, D) and k (B, H_kv, L, D), the rest passed through; cos, sin (B or 1, L, Dr) or
    (L, Dr), broadcast over heads; computed in float32 (float64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = (cos.unsqueeze(0) if cos.dim() == 2 else cos).unsqueeze(1).to(acc)
    s = (sin.unsqueeze(0) if sin.dim() == 2 else sin).unsqueeze(1).to(acc)
    dr = cos.shape[-1]

    def one(x):
        xf = x.to(acc)
        xr = xf[..., :dr]
        out = torch.cat((xr * c + rotate_half(xr, interleaved) * s, xf[..., dr:]), -1)
        return out.to(x.dtype)

    return one(q), one(k)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the activation of a SwiGLU MLP (Llama's), in float32 (float64)."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


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
    zero_masked_rows: bool = True,
    dropout_seed: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """softmax(q k^T / sqrt(d) + M) @ v, the textbook way; returns (out, probs or None).

    Shapes: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> out (B, H, Lq, Dv),
    probs (B, H, Lq, Lk). Dropout (when ``dropout_p > 0``): with ``dropout_seed``, pyformer's
    keep mask :func:`dropout_keep` of that seed (``probs * keep / (1 - p)``, the elements
    pyformer's attention drops); without it, torch's dropout (same distribution, other elements).
    """
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves a group
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scaled_qk(q, k, scale)
    p = masked_softmax(
        s, mask, causal=causal, key_lengths=key_lengths, zero_masked_rows=zero_masked_rows
    )
    if dropout_p > 0 and dropout_seed is not None:
        keep = dropout_keep(dropout_seed, p.shape, dropout_p, device=p.device)
        pd = p * keep / (1 - dropout_p) if dropout_p < 1 else p * 0
    else:
        pd = torch.nn.functional.dropout(p, dropout_p) if dropout_p > 0 else p
    out = torch.matmul(pd, v)
    return out, (p if need_weights else None)


def attention_lse(
    q: Tensor,
    k: Tensor,
    mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    causal: Union[bool, str] = False,
    key_lengths: Optional[Tensor] = None,
) -> Tensor:
    """The log-sum-exp of each query row's logits ``scale * q k^T + M`` over its unmasked keys,
    (B, H, Lq): ``-inf`` for a fully masked row (what ``attention(..., return_lse=True)``
    returns)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    x, ok = _masked_logits(scaled_qk(q, k, scale), mask, 1.0, causal, key_lengths)
    if ok is None:
        return torch.logsumexp(x, dim=-1)
    # a fully masked row: -inf, with gradient 0 (logsumexp's own would be NaN there)
    some = ok.expand(x.shape).any(-1)
    lse = torch.logsumexp(x.masked_fill(~some.unsqueeze(-1), 0.0), dim=-1)
    return lse.masked_fill(~some, float("-inf"))


# Philox4x32-10 (Salmon et al., SC'11), written in int64 torch ops with every product split so
# that it stays below 2^63: the definition csrc/philox.h implements, checked against the published
# known-answer vectors in tests/test_dropout_draw.py.
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, c: Tensor) -> Tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a * c, for a and c below 2^32."""
    lo = a * (c & 0xFFFF)  # < 2^48
    hi = a * (c >> 16)  # < 2^48
    low = lo + ((hi & 0xFFFF) << 16)  # < 2^49
    return (hi >> 16) + (low >> 32), low & _U32


def philox4x32_10(counter: Tensor, key: Tensor, counter_hi: Optional[Tensor] = None) -> Tensor:
    """Philox4x32-10 of each 128-bit counter under a 64-bit key: ``counter`` (int64, the low two
    words as one 64-bit number, ``>= 0``), ``counter_hi`` (the high two, 0 when None) and ``key``
    (int64 of the same shape or broadcastable; the key's bits as a two's-complement int64) ->
    int64 ``(..., 4)`` of the four 32-bit output words."""
    zero = torch.zeros_like(counter)
    hi = zero if counter_hi is None else counter_hi
    c = [counter & _U32, (counter >> 32) & _U32, hi & _U32, (hi >> 32) & _U32]
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
    return torch.stack(c, -1)


def dropout_keep(seed: int, shape: Sequence[int], p: float, device=None) -> Tensor:
    """pyformer's attention dropout mask (bool, ``shape``, True = kept): element ``n`` (its index
    in ``shape``'s row-major order) is kept when word ``n % 4`` of Philox4x32-10 of counter
    ``(n // 4, 0)`` under key ``seed`` is at least ``floor(p * 2^32)``: probability ``1 - p``.
    ``seed`` is the 64-bit key (a Python int, either sign)."""
    numel = math.prod(shape)
    key = torch.tensor(_signed64(seed), dtype=torch.int64)
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64)
    words = philox4x32_10(groups, key).reshape(-1)[:numel]
    keep = words >= (int(p * 2**32) if p < 1 else 2**32)
    return keep.reshape(tuple(shape)).to(device)


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x
