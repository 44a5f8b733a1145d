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

``patch(model)`` goes further on a loaded model, in place, and returns what it replaced:

    >>> counts = pt.patch(model)   # {"rms_norm": 5, "rotary": 2, "swiglu": 2, "attention": 2, ...}

its RMSNorm modules (Llama, Mistral, Mixtral, Ministral, Qwen2, Qwen3 and their MoE variants,
Gemma 1-3) and every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` run
:func:`pyformer.functional.rms_norm` / ``layer_norm``, the rotary embedding inside their attention
modules :func:`pyformer.functional.apply_rotary`, their SiLU-gated MLPs
:func:`pyformer.functional.swiglu`, and the attention itself ``pyformer_attention_forward``.
Each replacement recognises the exact code it replaces (the source of transformers' function,
checked when patching) and falls back to that code for any input the kernels would not compute
the same way. See :func:`patch`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import re
import sys
import textwrap
import threading
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["NAME", "register", "pyformer_attention_forward", "patch"]

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


# ---- patch(model) -------------------------------------------------------------------------------
#
# Each replacement is tied to the exact code it replaces: the source of transformers' function (a
# norm's or an MLP's forward, apply_rotary_pos_emb and the rotate_half it calls) must parse to the
# same syntax tree as one of the forms below, read from transformers' modeling files and checked
# against pyformer's op by hand (annotations, decorators and docstrings aside). A function that
# differs in any way, in another transformers version or another family, is left as it was.

_LLAMA_NORM = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""

_GEMMA_NORM = """
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
"""

_GEMMA_NORM_HELPER = """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
"""

_GATED_MLP = """
def forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
"""

_APPLY_ROTARY = """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""

_ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""

# The families whose modeling files were read: their RMSNorm is the Llama form (weight times the
# normalized input rounded to its dtype) or the Gemma form (an offset weight, 1 + w, applied in
# float32), and their apply_rotary_pos_emb the rotate-half composition. The syntax-tree check
# still applies to each.
_LLAMA_NORM_FAMILIES = frozenset(
    {"llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
)
_GEMMA_NORM_FAMILIES = frozenset({"gemma", "gemma2", "gemma3"})
_ROTARY_FAMILIES = _LLAMA_NORM_FAMILIES | _GEMMA_NORM_FAMILIES

# HF's RMSNorm forwards above compute in float32 whatever the input dtype: pyformer's op computes
# float64 input in float64, so float64 runs transformers' own code
_FLOAT32_COMPUTE = (torch.float32, torch.float16, torch.bfloat16)

_MODELING = re.compile(r"transformers\.models\.(\w+)\.modeling_(\w+)")

# depth > 0 while the forward of an attention module patched for rotary runs in this thread: the
# wrapped apply_rotary_pos_emb, shared by every model of its family, runs pyformer's kernel only
# then, and transformers' own function for everything else. A thread-local counter rather than a
# context variable: torch.compile traces it (no graph break), and a forward never yields midway.
_ROTARY = threading.local()


def _tree(node: ast.AST) -> str:
    """A function's syntax tree without what does not change what it computes."""
    node.decorator_list = []
    node.returns = None
    a = node.args
    for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
        if arg is not None:
            arg.annotation = None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):  # the docstring
            body = body[1:]
    node.body = body
    return ast.dump(node)


_FORMS = {
    name: _tree(ast.parse(src).body[0])
    for name, src in (
        ("llama_norm", _LLAMA_NORM),
        ("gemma_norm", _GEMMA_NORM),
        ("gemma_norm_helper", _GEMMA_NORM_HELPER),
        ("gated_mlp", _GATED_MLP),
        ("apply_rotary", _APPLY_ROTARY),
        ("rotate_half", _ROTATE_HALF),
    )
}
_FORM_OF: Dict[object, Optional[str]] = {}  # code object -> syntax tree, or None if unreadable


def _form(fn) -> Optional[str]:
    """The syntax tree of ``fn``'s source, or None where unreadable.

    Only a plain function counts: a wrapper (``__wrapped__``, a decorator's work) runs code of its
    own around the source read here. A decorator that returned the function itself is harmless.
    """
    if type(fn) is not types.FunctionType or hasattr(fn, "__wrapped__"):
        return None
    code = fn.__code__
    if code not in _FORM_OF:
        try:
            node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
            _FORM_OF[code] = _tree(node) if isinstance(node, ast.FunctionDef) else None
        except (OSError, TypeError, SyntaxError, IndexError):
            _FORM_OF[code] = None
    return _FORM_OF[code]


def _is(fn, form: str, *, torch_global: bool = True) -> bool:
    """Whether ``fn`` is the verified ``form`` (and, where it reads ``torch``, the real one)."""
    if _form(fn) != _FORMS[form]:
        return False
    return not torch_global or fn.__globals__.get("torch") is torch


def _family(cls: type) -> Optional[str]:
    """``<family>`` of a class defined in ``transformers.models.<family>.modeling_<family>``."""
    found = _MODELING.fullmatch(getattr(cls, "__module__", "") or "")
    return found.group(1) if found is not None and found.group(1) == found.group(2) else None


def _code_names(fn) -> Tuple[str, ...]:
    """The global and attribute names the code of ``fn`` (decorators unwrapped) reads."""
    try:
        return getattr(inspect.unwrap(fn), "__code__").co_names
    except (AttributeError, ValueError):
        return ()


# ---- the replacement classes

_SUBCLASSES: Dict[Tuple[type, str], type] = {}


def _kernels_support(tensors) -> bool:
    from ..nn._backend import kernels_support

    return kernels_support(tensors)


def _norm_takes(x, w, eps) -> bool:
    """Whether pyformer's rms_norm computes what the verified forms do for ``x``: the same
    float32 computation and result dtype, rounded once (where the Llama form rounds twice)."""
    return (
        isinstance(x, torch.Tensor)
        and isinstance(w, torch.Tensor)
        and x.dtype in _FLOAT32_COMPUTE
        and w.dtype == x.dtype  # else transformers' code returns the promoted dtype
        and w.device == x.device
        and w.dim() == 1
        and x.dim() >= 1
        and x.shape[-1] == w.shape[0]
        and isinstance(eps, (float, int))
        and not isinstance(eps, bool)
        and 0.0 <= eps < math.inf
        and _kernels_support((x, w))
    )


def _llama_norm_forward(base: type) -> Callable:
    def forward(self, hidden_states):
        w, eps = self.weight, self.variance_epsilon
        if _norm_takes(hidden_states, w, eps):
            import pyformer.functional as PF

            return PF.rms_norm(hidden_states, (w.shape[0],), w, float(eps))
        return base.forward(self, hidden_states)

    return forward


def _gemma_norm_forward(base: type) -> Callable:
    def forward(self, x):
        w, eps = self.weight, self.eps
        if _norm_takes(x, w, eps):
            import pyformer.functional as PF

            # (1 + w) in float32 as transformers has it, rounded to x's dtype for the kernel
            return PF.rms_norm(x, (w.shape[0],), (1.0 + w.float()).to(x.dtype), float(eps))
        return base.forward(self, x)

    return forward


_SILU_TYPES: Tuple[type, ...] = ()


def _silu_types() -> Tuple[type, ...]:
    global _SILU_TYPES
    if not _SILU_TYPES:
        found: Tuple[type, ...] = (torch.nn.SiLU,)
        try:
            from transformers.activations import SiLUActivation

            found += (SiLUActivation,)
        except ImportError:
            pass
        _SILU_TYPES = found
    return _SILU_TYPES


def _is_silu(act) -> bool:
    # the exact classes, without a forward of the instance's own: their forward is F.silu
    return type(act) in _silu_types() and "forward" not in vars(act)


def _swiglu_forward(base: type) -> Callable:
    def forward(self, x):
        act = self.act_fn
        if not _is_silu(act):
            return base.forward(self, x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if (
            isinstance(gate, torch.Tensor)
            and isinstance(up, torch.Tensor)
            and gate.shape == up.shape
            and gate.dtype == up.dtype
            and gate.is_floating_point()
            and gate.device == up.device
            and _kernels_support((gate, up))
        ):
            import pyformer.functional as PF

            return self.down_proj(PF.swiglu(gate, up))
        return self.down_proj(act(gate) * up)  # the verified forward, on the same projections

    return forward


def _rotary_attention_forward(base: type) -> Callable:
    def forward(self, *args, **kwargs):
        _ROTARY.depth = getattr(_ROTARY, "depth", 0) + 1
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            _ROTARY.depth -= 1

    return forward


_FORWARDS = {
    "llama_norm": _llama_norm_forward,
    "gemma_norm": _gemma_norm_forward,
    "swiglu": _swiglu_forward,
    "rotary": _rotary_attention_forward,
}


def _reduce_ex(self, protocol):
    # pickled (torch.save, deepcopy) as the transformers class and the kind of replacement, so
    # that loading rebuilds it wherever pyformer is importable
    cls = type(self)
    return (_rebuild, (cls._pyformer_base, cls._pyformer_kind), self.__getstate__())


def _subclass(base: type, kind: str) -> type:
    """The one replacement class of ``base`` for ``kind``: a subclass with a new ``forward``."""
    cls = _SUBCLASSES.get((base, kind))
    if cls is None:
        ns = {
            "forward": _FORWARDS[kind](base),
            "__reduce_ex__": _reduce_ex,
            "_pyformer_base": base,
            "_pyformer_kind": kind,
            "__module__": __name__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        # the same __name__: transformers matches some modules by class name (weight init,
        # no-split modules for device maps)
        cls = type(base.__name__, (base,), ns)
        _SUBCLASSES[(base, kind)] = cls
    return cls


def _rebuild(base: type, kind: str):
    """An empty module of ``base``'s replacement for ``kind``, or of ``base`` itself where the
    code it replaces is no longer the verified one (another transformers version)."""
    if kind == "swiglu":
        ok = _is(base.forward, "gated_mlp", torch_global=False)
    elif kind == "rotary":
        ok = _rotary_reason(base) is None and _wrap_rotary(base)
    else:
        ok = _norm_kind(base)[0] == kind
    cls = _subclass(base, kind) if ok else base
    return cls.__new__(cls)


def _patched(module) -> bool:
    return "_pyformer_base" in vars(type(module))


# ---- what each kind recognises


def _norm_kind(cls: type) -> Tuple[Optional[str], str]:
    """``(kind, "")`` for a verified transformers RMSNorm class, else ``(None, reason)``."""
    fam = _family(cls)
    name = cls.__name__
    if fam in _GEMMA_NORM_FAMILIES:
        ok = _is(cls.forward, "gemma_norm") and _is(
            getattr(cls, "_norm", None), "gemma_norm_helper"
        )
        return ("gemma_norm", "") if ok else (None, f"{name}: not the verified Gemma form")
    if fam in _LLAMA_NORM_FAMILIES:
        ok = _is(cls.forward, "llama_norm")
        return ("llama_norm", "") if ok else (None, f"{name}: not the verified Llama form")
    where = f"transformers' {fam}" if fam else getattr(cls, "__module__", "?")
    return None, f"{name} of {where}: not a family whose RMSNorm pyformer verified"


def _rotary_fn(cls: type):
    """The apply_rotary_pos_emb that ``cls.forward`` calls, and transformers' original of it."""
    mod = sys.modules.get(cls.__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    return mod, fn, getattr(fn, "_pyformer_original", fn)


def _rotary_reason(cls: type) -> Optional[str]:
    """None where ``cls``'s rotary can run on pyformer, else why not."""
    fam = _family(cls)
    if fam not in _ROTARY_FAMILIES:
        return f"{cls.__name__} of transformers' {fam}: not a family whose rotary pyformer verified"
    original = _rotary_fn(cls)[2]
    if original is None or not _is(original, "apply_rotary"):
        return f"{cls.__name__}: apply_rotary_pos_emb of {cls.__module__} is not the verified form"
    helper = original.__globals__.get("rotate_half")
    if helper is None or not _is(helper, "rotate_half"):
        return f"{cls.__name__}: rotate_half of {cls.__module__} is not the verified form"
    return None


def _rotary_wrapper(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if getattr(_ROTARY, "depth", 0) > 0 and type(unsqueeze_dim) is int and unsqueeze_dim == 1:
            if _rotary_takes(q, k, cos, sin):
                import pyformer.functional as PF

                return PF.apply_rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._pyformer_original = original
    return apply_rotary_pos_emb


def _wrap_rotary(cls: type) -> bool:
    """Puts the wrapper in place of the apply_rotary_pos_emb ``cls`` calls (once per module)."""
    mod, fn, original = _rotary_fn(cls)
    if fn is original:
        mod.apply_rotary_pos_emb = _rotary_wrapper(original)
    return True


def _rotary_takes(q, k, cos, sin) -> bool:
    """Whether pyformer's apply_rotary computes what the verified apply_rotary_pos_emb does.

    That function unsqueezes cos and sin at dim 1 and broadcasts: ``(B or 1, L, D)`` becomes
    ``(B or 1, 1, L, D)``, the layout the kernel reads. A 2-dim ``(L, D)`` would become
    ``(L, 1, D)``, broadcast against heads and positions rather than positions and dims, and a
    last dim other than D would not broadcast (partial rotary is sliced by the caller): both run
    transformers' function. One dtype for all four (transformers' function promotes a mix).
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    b, _, l, d = q.shape
    if k.shape[0] != b or k.shape[2] != l or k.shape[3] != d or d % 2 != 0:
        return False
    if cos.shape[0] not in (1, b) or cos.shape[1] != l or cos.shape[2] != d:
        return False
    dtype, device = q.dtype, q.device
    if not dtype.is_floating_point or q.numel() == 0 or k.numel() == 0:
        return False
    if any(t.dtype != dtype or t.device != device for t in (k, cos, sin)):
        return False
    return _kernels_support((q, k, cos, sin))


def _calls_rotary(cls: type) -> bool:
    return _family(cls) is not None and "apply_rotary_pos_emb" in _code_names(
        getattr(cls, "forward", None)
    )


def _dispatches_attention(cls: type) -> bool:
    cls = vars(cls).get("_pyformer_base", cls)  # a rotary-patched attention: its own class
    return (getattr(cls, "__module__", "") or "").startswith("transformers.") and (
        "ALL_ATTENTION_FUNCTIONS" in _code_names(getattr(cls, "forward", None))
    )


def _attention_blocker(model: torch.nn.Module) -> Optional[str]:
    """Why the model's attention must stay as it is: what neither pyformer's attention nor its
    fallback (transformers' SDPA path) computes."""
    for name, m in model.named_modules():
        if getattr(m, "attn_logit_softcapping", None) is not None:
            return f"{name or type(m).__name__} caps its attention logits (softcap)"
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            return f"{name or type(m).__name__} has attention sinks"
    return None


def _switch_attention(model: torch.nn.Module, left: List[Tuple[str, str]]) -> int:
    """Sets the attention implementation to pyformer's; returns how many modules it switched."""
    from transformers import PreTrainedModel

    mods = [
        m
        for m in model.modules()
        if _dispatches_attention(type(m))
        and hasattr(getattr(m, "config", None), "_attn_implementation")
    ]
    if not mods:
        return 0
    before = {id(m) for m in mods if m.config._attn_implementation == NAME}
    if len(before) == len(mods):
        return 0
    why = _attention_blocker(model)
    if why is not None:
        left.append(("", f"attention: {why}"))
        return 0
    register()
    inside = set()  # the outermost transformers models: set_attn_implementation recurses
    for name, m in model.named_modules():
        if id(m) in inside or not isinstance(m, PreTrainedModel):
            continue
        inside.update(id(s) for s in m.modules())
        try:
            m.set_attn_implementation(NAME)
        except (ValueError, ImportError) as e:
            left.append((name, f"attention: {e}"))
    now = [m for m in mods if m.config._attn_implementation == NAME]
    if len(now) < len(mods) and not any(r.startswith("attention:") for _, r in left):
        left.append(("", "attention: the model does not set its attention implementation"))
    return sum(1 for m in now if id(m) not in before)


def patch(
    model: torch.nn.Module,
    *,
    attention: bool = True,
    norms: bool = True,
    rotary: bool = True,
    mlp: bool = True,
) -> dict:
    r"""Run a loaded Hugging Face model's norms, rotary embedding, SwiGLU and attention on pyformer.

    In place; every replacement keeps the module objects, their parameters (the same
    ``Parameter`` objects), buffers, ``state_dict`` keys, hooks, dtype and device, and
    ``isinstance`` checks: a replaced module's class becomes a subclass of its own class (one per
    class) that changes only ``forward``.

    - ``norms``: each RMSNorm of transformers' Llama, Mistral, Mixtral, Ministral, Qwen2, Qwen3
      (their MoE variants and Qwen3's ``q_norm``/``k_norm`` on the head dim included), Gemma,
      Gemma 2 and Gemma 3 runs :func:`pyformer.functional.rms_norm`, and each
      ``torch.nn.LayerNorm`` (GPT-2, BERT, ...) / ``torch.nn.RMSNorm`` becomes
      :class:`pyformer.nn.LayerNorm` / :class:`pyformer.nn.RMSNorm`. Llama's form is
      ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)``; pyformer computes it in float32
      and rounds once. Gemma's stores its weight as an offset (init zeros) and computes
      ``x.float() * rsqrt(mean(x^2) + eps) * (1 + weight.float())`` before rounding: pyformer
      runs it with the weight ``(1 + weight.float()).to(x.dtype)``, the same in float32, and in
      float16/bfloat16 with that factor rounded to the dtype once (within ``docs/ops.md``'s
      bounds). transformers' own forward runs for float64 input (both forms compute in float32,
      where the kernel would compute in float64), a weight of another dtype than the input (the
      Llama form then returns the promoted dtype) or device, and any input the kernels do not
      take.
    - ``rotary``: the attention modules of those families call their module's
      ``apply_rotary_pos_emb(q, k, cos, sin)``, the rotate-half composition
      ``q * cos + rotate_half(q) * sin``. That module function is replaced by a wrapper that runs
      :func:`pyformer.functional.apply_rotary` only while the forward of a patched attention
      module runs (a counter per thread, which ``torch.compile`` traces), so other models of the
      family in the process keep transformers' function. It also runs transformers' for
      ``unsqueeze_dim != 1``, cos and sin not ``(B or 1, L, D)`` with the head dim ``D`` of q
      and k, mixed dtypes or devices and inputs the kernels do not take.
    - ``mlp``: MLPs whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU
      ``act_fn`` (``torch.nn.SiLU`` or transformers' ``SiLUActivation``) compute
      ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with :func:`pyformer.functional.swiglu`.
      Another activation (Gemma's GELU) leaves the MLP as it was.
    - ``attention``: :func:`register`, then ``set_attn_implementation("pyformer")`` on the
      model (on each outermost transformers model inside it when ``model`` is not one), so
      every attention module that dispatches through transformers' ``AttentionInterface`` runs
      :func:`pyformer_attention_forward`. Left as it is where an attention caps its logits
      (``softcap``, Gemma 2) or has attention sinks, which neither pyformer nor its SDPA
      fallback computes.

    A replacement is made only where the code it replaces is, syntax tree for syntax tree, the
    form pyformer verified (the norm's and the MLP's ``forward``, ``apply_rotary_pos_emb`` and
    its ``rotate_half``): another transformers version or family that changed it is left as it
    was, and reported. Calling ``patch`` again is harmless: patched modules are recognised and
    neither wrapped again nor counted again. There is no undo: keep an unpatched copy (or reload
    the model) for that. A patched model pickles (``torch.save``, ``copy.deepcopy``) as its
    transformers classes plus the replacement of each, rebuilt on loading where the code is
    still the verified one.

    Args:
        model: a ``transformers`` model (or any module containing one), changed in place.
        attention, norms, rotary, mlp: which kinds to replace. Default: all.

    Returns:
        dict: what this call replaced, ``{"rms_norm": int, "layer_norm": int, "rotary": int,
        "swiglu": int, "attention": int, "left": [(name, reason), ...]}``. ``rotary`` and
        ``attention`` count attention modules; ``left`` lists the modules of those kinds that
        were recognised but left as they were, with why (``""`` names the model itself).

    Example::

        >>> model = AutoModelForCausalLM.from_pretrained(path)  # or from a config
        >>> pyformer.integrations.transformers.patch(model)      # a 2-layer Llama:
        {'rms_norm': 5, 'layer_norm': 0, 'rotary': 2, 'swiglu': 2, 'attention': 2, 'left': []}
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "pyformer.integrations.transformers.patch: argument 'model': expected a "
            f"torch.nn.Module, got {type(model).__name__}"
        )
    for flag, value in (
        ("attention", attention),
        ("norms", norms),
        ("rotary", rotary),
        ("mlp", mlp),
    ):
        if not isinstance(value, bool):
            raise TypeError(
                f"pyformer.integrations.transformers.patch: argument '{flag}': expected a bool, "
                f"got {type(value).__name__}"
            )
    from ..nn import LayerNorm, RMSNorm

    counts = {"rms_norm": 0, "layer_norm": 0, "rotary": 0, "swiglu": 0, "attention": 0}
    left: List[Tuple[str, str]] = []
    torch_twins = {
        torch.nn.LayerNorm: (LayerNorm, "layer_norm"),
        torch.nn.RMSNorm: (RMSNorm, "rms_norm"),
    }
    for name, m in model.named_modules():
        cls = type(m)
        if _patched(m) or cls in (LayerNorm, RMSNorm):
            continue
        own_forward = "forward" in vars(m)
        if norms and cls in torch_twins:
            twin, kind = torch_twins[cls]
            if own_forward:
                left.append((name, f"{kind}: the module has a forward of its own"))
            else:
                m.__class__ = twin
                counts[kind] += 1
        elif norms and isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            torch_cls = (
                torch.nn.LayerNorm if isinstance(m, torch.nn.LayerNorm) else torch.nn.RMSNorm
            )
            kind = torch_twins[torch_cls][1]
            why = f"{cls.__name__} subclasses torch.nn.{torch_cls.__name__}, a forward not verified"
            left.append((name, f"{kind}: {why}"))
        elif norms and cls.__name__.endswith("RMSNorm"):
            kind, why = _norm_kind(cls)
            if kind is not None and own_forward:
                kind, why = None, f"{cls.__name__}: the module has a forward of its own"
            if kind is None:
                left.append((name, f"rms_norm: {why}"))
            else:
                m.__class__ = _subclass(cls, kind)
                counts["rms_norm"] += 1
        elif mlp and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            if not _is(cls.forward, "gated_mlp", torch_global=False):
                left.append(
                    (name, "swiglu: forward is not down_proj(act_fn(gate_proj(x)) * up_proj(x))")
                )
            elif not _is_silu(m.act_fn):
                left.append((name, f"swiglu: act_fn is {type(m.act_fn).__name__}, not SiLU"))
            elif own_forward:
                left.append((name, "swiglu: the module has a forward of its own"))
            else:
                m.__class__ = _subclass(cls, "swiglu")
                counts["swiglu"] += 1
        elif rotary and _calls_rotary(cls):
            why = _rotary_reason(cls)
            if why is None and own_forward:
                why = "the module has a forward of its own"
            if why is not None:
                left.append((name, f"rotary: {why}"))
            else:
                _wrap_rotary(cls)
                m.__class__ = _subclass(cls, "rotary")
                counts["rotary"] += 1
    if attention:
        counts["attention"] = _switch_attention(model, left)
    return {**counts, "left": left}
