"""Seeded property test: every op and every gradient against the float64 reference, over random
draws of shapes (size-1, empty, odd and long dims), layouts (transposed, permuted, strided,
padded, offset and expanded views, with NaN filler between the elements), dtypes, scales and
every mask combination the ops take (bool with stray bytes, additive with -inf of any floating
dtype, requiring grad or not, broadcast or expanded with stride 0, causal, key_lengths of every
integer dtype), checked by pyformer.testing.verify: the bounds of docs/ops.md.

Each draw is one test, ``test_<op>[draw<i>]``. Its parameters come from ``random.Random(seed)``
and its tensors from ``torch.Generator().manual_seed(seed)``, where ``seed`` is
``crc32("<op>:<i>") ^ PYFORMER_TEST_SEED`` (0 when unset, as in conftest): a failure prints the
seed and every parameter, and reruns alone with
``PYFORMER_TEST_SEED=<base> python -m pytest 'tests/test_properties.py::test_<op>[draw<i>]'``.

Fully masked rows are drawn (pyformer and the reference both give zeros, and zero gradients).
The values are conditioned as the bounds assume ("random inputs, never zeros, never all equal"):
a fixed relative bound cannot hold where the answer is all cancellation, and there torch's own
composition misses it too. So the scaled scores have a standard deviation of at most 2.5 (1 in
half types) whatever the scale, nothing overflows float16 or lands among its subnormals,
layer-norm rows have a mean within a few deviations of 0 (0 for short rows), and a tensor
compared in float32 or a half type has at least MIN_GRAD elements: a smaller output draws a
wider dtype, a smaller input is not differentiated (see _check, _grads and the tests' comments
for the few degenerate gradients also left out).
"""

from __future__ import annotations

import math
import os
import random
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import pyformer.functional as F
import pyformer.reference as ref
from pyformer.testing import verify

BASE_SEED = int(os.environ.get("PYFORMER_TEST_SEED", "0"))
DRAWS = {
    "scaled_qk": 80,
    "masked_softmax": 80,
    "layer_norm": 80,
    "add_layer_norm": 60,
    "attention": 80,
}
DTYPES = ("float64", "float32", "bfloat16", "float16")
WIDTH = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
INT_MAX = {"int8": 127, "uint8": 255}
# how a tensor is laid out in memory (the values are the same): see _lay
LAYOUTS = ("contig", "contig", "T", "perm", "step", "pad", "offset")

# the fewest elements a compared tensor has in each dtype: a smaller output draws a wider dtype
# (_wide_enough), a smaller input is not differentiated (_check, _grads)
MIN_GRAD = {"float64": 1, "float32": 8, "bfloat16": 64, "float16": 64}

Params = Dict[str, Any]


def _seed(op: str, i: int) -> int:
    return zlib.crc32(f"{op}:{i}".encode()) ^ BASE_SEED


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


# ----------------------------------------------------------------------------- drawing params


def _wide_enough(r: random.Random, dtype: str, *sizes: int) -> str:
    """``dtype``, or a wider one when an output has fewer than MIN_GRAD[dtype] elements (but
    some): the relative error of a few elements is heavy-tailed (a short sum can cancel), in
    half types past twice torch's own in one draw of 25 at four elements (see _check)."""
    if any(0 < n < MIN_GRAD[dtype] for n in sizes):
        return "float64" if dtype == "float32" else r.choice(["float32", "float64"])
    return dtype


def _dim(r: random.Random, hi: int, empty: float = 0.03, one: float = 0.2) -> int:
    """A size: sometimes 0, often 1, else small or up to ``hi`` (odd ones included)."""
    u = r.random()
    if u < empty:
        return 0
    if u < empty + one or hi < 2:
        return 1
    return r.randint(2, min(9, hi)) if u < 0.65 or hi <= 9 else r.randint(10, hi)


def _fit(
    dims: List[int], budget: int, fixed: Sequence[int] = (), cost: Callable = math.prod
) -> List[int]:
    """``dims`` with the largest ones halved (those in ``fixed`` last) until ``cost(dims)``
    (default: their product) is within ``budget``."""
    dims = list(dims)
    while cost(dims) > budget:
        free = [i for i in range(len(dims)) if i not in fixed and dims[i] > 1]
        pool = free or [i for i in range(len(dims)) if dims[i] > 1]
        j = max(pool, key=lambda i: dims[i])
        dims[j] = (dims[j] + 1) // 2
    return dims


def _bcast(r: random.Random, shape: Sequence[int], p: float) -> Tuple[int, ...]:
    """Dims (of size > 1) stored as 1 and expanded with stride 0, each with probability p."""
    return tuple(d for d, n in enumerate(shape) if n > 1 and r.random() < p)


def _scale(r: random.Random, dtype: str, optional: bool) -> Optional[float]:
    """None (the default), 0, negative, small, ordinary or large; float16 stays in range."""
    large = 40.0 if dtype == "float16" else r.choice([1e3, 1e6])
    # in float16 a scale of 1e-3 puts the gradients among the subnormals, where even the exact
    # gradient rounded to float16 is off by more than the bound
    small = 0.05 if dtype == "float16" else 1e-3
    opts = [0.0, -0.7, -3.0, small, 0.37, 2.0, large, -large]
    if optional:
        opts += [None, None, None]
    else:
        opts += [1.0, 1.0]
    return r.choice(opts)


def _temp(r: random.Random, dtype: str) -> float:
    """The standard deviation of the scaled scores. Peaked rows (2.5 over a few hundred keys)
    put a half-type gradient's norm in a few top keys, whose ``y * (dy - sum(dy * y))`` from the
    rounded saved ``y`` is all cancellation: torch's composition misses the bound there too."""
    return r.choice([0.5, 1.0] if dtype in ("float16", "bfloat16") else [0.5, 1.0, 2.5])


def _masks(r: random.Random, shape: Sequence[int], dtype: str, causal_ok: bool) -> Params:
    """A mask combination for scores of ``shape``: none, bool or float (of some dtype, maybe
    requiring grad), its broadcast shape and whether it is expanded in memory, causal, and
    key_lengths (integer dtype, values, layout)."""
    p: Params = {}
    kind = r.choice(["none", "bool", "bool", "float", "float"])
    p["mask"] = kind
    if kind != "none":
        n = len(shape)
        rank = n if r.random() < 0.7 else r.randint(1, n)
        full = list(shape[n - rank :])
        # (B or 1, H or 1, Lq or 1, Lk or, rarely, 1)
        p["mask_shape"] = tuple(
            1 if (r.random() < (0.15 if d == rank - 1 else 0.4)) else s for d, s in enumerate(full)
        )
        p["mask_expand"] = r.random() < 0.35  # expand()ed to the scores' shape: stride 0
        p["mask_layout"] = r.choice(LAYOUTS)
        if kind == "bool":
            p["density"] = r.choice([0.1, 0.5, 0.8, 0.95, 1.0])
            p["odd_bytes"] = r.random() < 0.3  # bytes 2 and 255 are True too
        else:
            p["mask_grad"] = r.random() < 0.5
            if p["mask_grad"]:  # a mask constant along the keys has a gradient of exactly 0
                p["mask_shape"] = (*p["mask_shape"][:-1], full[-1])
            # a mask's gradient has the mask's dtype: one narrower than the scores' would be
            # held to the scores' bound, so a differentiated mask is at least as wide
            wider = [d for d in ("float32", "float64") if WIDTH[d] > WIDTH[dtype]]
            narrower = [] if p["mask_grad"] else [d for d in DTYPES if WIDTH[d] < WIDTH[dtype]]
            p["mask_dtype"] = r.choice(["same", "same"] + wider + narrower)
            p["p_inf"] = r.choice([0.0, 0.2, 0.5, 0.9])
            p["p_bigneg"] = r.choice([0.0, 0.0, 0.3])  # rows shifted by -40
    p["causal"] = causal_ok and r.random() < 0.4
    if causal_ok and r.random() < 0.45:
        p["kl_dtype"] = r.choice(INT_DTYPES)
        p["kl_values"] = r.choice(["random", "random", "edges", "full", "zero"])
        p["kl_layout"] = r.choice(["contig", "step", "offset"])
    return p


def _draw_scaled_qk(r: random.Random) -> Params:
    dtype = r.choice(DTYPES)
    lead = [_dim(r, 4) for _ in range(r.choice([0, 1, 2, 2, 3]))]
    Lq, Lk = _dim(r, 300), _dim(r, 300)
    if r.random() < 0.15:
        Lk = r.randint(1000, 3000)
    D = r.choice([1, 2, 3, 5, 8, 16, 31, 64, 80, 128, 255]) if r.random() > 0.04 else 0
    n = len(lead)

    def cost(d):  # elements of q, k and the scores
        return math.prod(d[:n]) * (d[n] * d[n + 1] + (d[n] + d[n + 1]) * D)

    *lead, Lq, Lk = _fit(lead + [Lq, Lk], 100_000, fixed=(n + 1,), cost=cost)
    dtype = _wide_enough(r, dtype, math.prod(lead) * Lq * Lk)
    p: Params = dict(dtype=dtype, lead=tuple(lead), Lq=Lq, Lk=Lk, D=D)
    p["scale"] = _scale(r, dtype, optional=True)
    for t, shape in (("q", (*lead, Lq, D)), ("k", (*lead, Lk, D))):
        p[f"{t}_layout"] = r.choice(LAYOUTS)
        p[f"{t}_bcast"] = _bcast(r, shape, 0.15)
    return p


def _draw_masked_softmax(r: random.Random) -> Params:
    dtype = r.choice(DTYPES)
    rank = r.choice([1, 2, 3, 4, 4, 4, 4, 5])
    dims = [_dim(r, 5) for _ in range(rank - 2)]
    Lq = _dim(r, 64) if rank >= 2 else None
    Lk = r.randint(1000, 4100) if r.random() < 0.15 else _dim(r, 300)
    shape = [*dims, *([Lq] if Lq is not None else []), Lk]
    shape = _fit(shape, 60_000, fixed=(rank - 1,))
    dtype = _wide_enough(r, dtype, math.prod(shape))
    p: Params = dict(dtype=dtype, shape=tuple(shape))
    p["scale"] = _scale(r, dtype, optional=False)
    p["temp"] = _temp(r, dtype)
    p["scores_layout"] = r.choice(LAYOUTS)
    p["scores_bcast"] = _bcast(r, shape[:-1], 0.1)  # scores repeated along a leading dim
    p.update(_masks(r, shape, dtype, causal_ok=rank >= 2))
    return p


def _draw_layer_norm(r: random.Random, add: bool = False) -> Params:
    dtype = r.choice(DTYPES)
    lead = [_dim(r, 9) for _ in range(r.choice([0, 1, 1, 2, 3]))]
    nd = r.choice([1, 1, 1, 2, 3])
    if r.random() < 0.15:
        ns = [r.randint(1000, 4100)] + [1] * (nd - 1)
        r.shuffle(ns)
    else:
        ns = [_dim(r, 200 if nd == 1 else 12, empty=0.02, one=0.15) for _ in range(nd)]
    lead = _fit(lead, max(1, 40_000 // max(1, math.prod(ns))))
    N = math.prod(ns)
    dtype = _wide_enough(r, dtype, math.prod(lead) * N)
    half = dtype in ("float16", "bfloat16")
    if add and half and 0 < N < 16:
        # s = x + residual is rounded to the dtype before it is normalized (as in torch's
        # composition; the reference adds exactly): the error is the rounding times
        # |s| / std(row), and the sample std of a few elements can be far below the spread
        dtype = r.choice(["float32", "float64"])
        half = False
    p: Params = dict(dtype=dtype, lead=tuple(lead), ns=tuple(ns))
    p["affine"] = r.choice(["both", "both", "weight", "bias", "none"])
    p["eps"] = r.choice([1e-5, 1e-5, 1e-6, 1e-3, 0.5] + ([0.0] if N >= 8 else []))
    p["amp"] = r.choice([1e-2, 1.0, 30.0])
    if N == 2:  # y = +-sqrt(var / (var + eps)): dx ~ eps / var is all cancellation unless
        p["eps"], p["amp"] = 0.5, 1.0  # eps is comparable to var
    if N == 1 and dtype == "float64":  # constant rows, where the float64 reference is off by
        p["eps"] = max(p["eps"], 1e-3)  # ~eps(float64) * rstd: rstd = 1 / sqrt(eps) <= 32
    # the rows' mean, times amp: within a few deviations of 0, and 0 for short rows, whose
    # sample std can be far below amp; for add_layer_norm in half types see above
    p["offset"] = r.choice([0.0] if N < 16 else [0.0, 0.5] if add and half else [0.0, 0.5, -3.0])
    names = ["x", "residual"] if add else ["x"]
    for t in names:
        p[f"{t}_layout"] = r.choice(LAYOUTS)
        p[f"{t}_bcast"] = _bcast(r, lead, 0.2)  # never along the normalized dims
    for t in ("weight", "bias"):
        p[f"{t}_layout"] = r.choice(LAYOUTS)
        p[f"{t}_bcast"] = _bcast(r, ns, 0.15)
    return p


def _draw_attention(r: random.Random) -> Params:
    dtype = r.choice(DTYPES)
    B, H = _dim(r, 3), _dim(r, 4)
    Lq, Lk = _dim(r, 70), _dim(r, 150)
    if r.random() < 0.12:
        Lk = r.randint(1000, 2100)
    D = r.choice([1, 3, 8, 16, 33, 64, 80, 128]) if r.random() > 0.04 else 0
    Dv = r.choice([1, 5, 16, 64, D, D]) if r.random() > 0.04 else 0

    def cost(d):  # elements of q, k, v, the scores and out
        b, h, lq, lk = d
        return b * h * (lq * lk + (lq + lk) * D + (lq + lk) * Dv)

    B, H, Lq, Lk = _fit([B, H, Lq, Lk], 80_000, fixed=(3,), cost=cost)
    shape = (B, H, Lq, Lk)
    need_weights = r.random() < 0.6
    dtype = _wide_enough(r, dtype, B * H * Lq * Dv, B * H * Lq * Lk if need_weights else 0)
    p: Params = dict(dtype=dtype, B=B, H=H, Lq=Lq, Lk=Lk, D=D, Dv=Dv)
    p["scale"] = _scale(r, dtype, optional=True)
    p["temp"] = _temp(r, dtype)
    p["need_weights"] = need_weights
    for t, s in (("q", (B, H, Lq, D)), ("k", (B, H, Lk, D)), ("v", (B, H, Lk, Dv))):
        p[f"{t}_layout"] = r.choice(LAYOUTS)
        p[f"{t}_bcast"] = _bcast(r, s[:2], 0.15)  # a batch or head dim shared (stride 0)
    p.update(_masks(r, shape, dtype, causal_ok=True))
    return p


DRAW: Dict[str, Callable[[random.Random], Params]] = {
    "scaled_qk": _draw_scaled_qk,
    "masked_softmax": _draw_masked_softmax,
    "layer_norm": _draw_layer_norm,
    "add_layer_norm": lambda r: _draw_layer_norm(r, add=True),
    "attention": _draw_attention,
}


def draw_params(op: str, i: int) -> Params:
    return DRAW[op](random.Random(_seed(op, i)))


# Draws on which pyformer and the reference disagree by a known bug: (op, predicate, reason).
# Matching draws are xfail(strict=True), so a fix shows up as XPASS.
KNOWN: List[Tuple[str, Callable[[Params], bool], str]] = []


def _cases(op: str):
    out = []
    for i in range(DRAWS[op]):
        p = draw_params(op, i)
        marks = [
            pytest.mark.xfail(strict=True, reason=why)
            for o, hit, why in KNOWN
            if o == op and hit(p)
        ]
        out.append(pytest.param(i, id=f"draw{i}", marks=marks))
    return out


# ----------------------------------------------------------------------------- drawing tensors


def _junk(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Filler that must never be read: NaN, or for integers (bool masks as bytes,
    key_lengths) a value that changes the answer."""
    if x.is_floating_point():
        return torch.full(shape, math.nan, dtype=x.dtype, device=x.device)
    return torch.full(shape, 77, dtype=x.dtype, device=x.device)


def _lay(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x``'s values in another memory layout, differentiably: ``T`` the last two dims swapped
    in memory, ``perm`` every dim reversed, ``step`` a stride of 2 in the last dim, ``pad``
    rows padded by one element, ``offset`` contiguous at an odd storage offset; the elements
    between are filler that must not be read."""
    if how == "contig" or x.dim() == 0:
        return x
    if how == "T":
        return x.mT.contiguous().mT if x.dim() >= 2 else x
    if how == "perm":
        d = list(range(x.dim()))[::-1]
        return x.permute(d).contiguous().permute(d)
    if how == "step":
        return torch.stack([x, _junk(x, x.shape)], -1)[..., 0]
    if how == "pad":
        n = x.shape[-1]
        return torch.cat([x, _junk(x, (*x.shape[:-1], 1))], -1)[..., :n]
    if how == "offset":
        flat = torch.cat([_junk(x, (3,)), x.reshape(-1)])
        return flat[3:].view(x.shape)
    raise ValueError(how)


def _stored(shape: Sequence[int], bcast: Sequence[int]) -> Tuple[int, ...]:
    return tuple(1 if d in bcast else n for d, n in enumerate(shape))


def _view(x: Optional[torch.Tensor], how: str, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """The stored tensor ``x`` laid out as ``how``, then expanded to ``shape``."""
    if x is None:
        return None
    return _lay(x, how).expand(*shape)


def _randn(g: torch.Generator, shape: Sequence[int], amp: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * amp


def _mask_tensors(p: Params, g: torch.Generator, shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The stored mask (uint8 bytes for a bool mask, float64 for a float mask, rounded to its
    dtype) and key_lengths, as named inputs."""
    out: Dict[str, torch.Tensor] = {}
    if p["mask"] == "bool":
        ms = p["mask_shape"]
        ok = torch.rand(*ms, generator=g) < p["density"]
        raw = ok.to(torch.uint8)
        if p["odd_bytes"]:
            pick = torch.randint(0, 3, ms, generator=g, dtype=torch.uint8)
            raw = raw * torch.tensor([1, 2, 255], dtype=torch.uint8)[pick.long()]
        out["mask"] = raw
    elif p["mask"] == "float":
        ms = p["mask_shape"]
        m = _randn(g, ms)
        # whole rows shifted by -40 (finite: allowed keys of probability ~e^-40 beside other
        # rows'); shifted single entries would make near-one-hot rows, whose gradient is all
        # cancellation
        m = m - 40.0 * (torch.rand(*ms[:-1], 1, generator=g) < p["p_bigneg"])
        m = m.masked_fill(torch.rand(*ms, generator=g) < p["p_inf"], -math.inf)
        if p["mask_dtype"] != "same":
            m = m.to(_dt(p["mask_dtype"])).to(torch.float64)
        out["mask"] = m
    if "kl_dtype" in p:
        b, lk = shape[0], shape[-1]
        hi = min(lk, INT_MAX.get(p["kl_dtype"], lk))
        how = p["kl_values"]
        if how == "random":
            vals = torch.randint(0, hi + 1, (b,), generator=g).tolist()
        elif how == "edges":
            vals = [[0, hi, max(0, hi - 1), min(1, hi)][j % 4] for j in range(b)]
        else:
            vals = [hi if how == "full" else 0] * b
        out["key_lengths"] = torch.tensor(vals, dtype=_dt(p["kl_dtype"]))
    return out


def _mask_args(p: Params, t: Dict[str, Any], shape: Sequence[int], *, reference: bool):
    """``(mask, key_lengths)`` as the op (or, ``reference=True``, the reference) is called."""
    mask = t.get("mask")
    if mask is not None:
        full = shape if p["mask_expand"] else p["mask_shape"]
        if p["mask"] == "bool":
            if reference:
                mask = (mask != 0).expand(*full)
            else:
                mask = _lay(mask, p["mask_layout"]).view(torch.bool).expand(*full)
        else:
            mask = _view(mask, p["mask_layout"], full)
            if not reference and p["mask_dtype"] != "same":
                mask = mask.to(_dt(p["mask_dtype"]))
    kl = t.get("key_lengths")
    if kl is not None:
        kl = kl.to(torch.int64) if reference else _lay(kl, p["kl_layout"])
    return mask, kl


def _grads(p: Params, names: Sequence[str], t: Dict[str, Any], shape: Sequence[int]) -> List[str]:
    """The inputs differentiated: ``names``, and a float mask drawn with ``mask_grad``; none
    when some but fewer than MIN_GRAD scores lie in rows with two allowed keys or more
    (elsewhere the gradient is exactly 0): then the gradients are a short random sum (see
    _check). With none, every gradient must be exactly 0, and is checked."""
    out = list(names)
    if p.get("mask") == "float" and p["mask_grad"]:
        out.append("mask")
    m, kl = _mask_args(p, t, shape, reference=True)
    ok = ref.allowed(shape, m, p["causal"], kl, device="cpu")
    n = ok.sum(-1) if ok is not None else torch.full(shape[:-1], shape[-1])
    if 0 < int(n[n >= 2].sum()) < MIN_GRAD[p["dtype"]]:
        return []
    return out


def _check(op: str, i: int, p: Params, impl, refn, inputs, grad, outputs, g) -> None:
    seed = _seed(op, i)
    # a gradient of a few elements (in half types often a sum over a broadcast dim of terms
    # each rounded to the dtype) has the relative error of a short random sum or difference:
    # heavy-tailed, at times past the dtype's bound in torch's own composition too
    grad = [n for n in grad if inputs[n].numel() >= MIN_GRAD[p["dtype"]]]
    head = (
        f"{op} draw{i} (seed {seed}; rerun: PYFORMER_TEST_SEED={BASE_SEED} python -m pytest "
        f"'tests/test_properties.py::test_{op}[draw{i}]') params={p}"
    )
    try:
        verify(
            impl,
            refn,
            inputs,
            dtype=_dt(p["dtype"]),
            device="cpu",
            grad=grad,
            outputs=outputs,
            generator=g,
        ).assert_ok()
    except Exception as exc:
        raise AssertionError(f"{head}\n{type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("i", _cases("scaled_qk"))
def test_scaled_qk(i):
    p = draw_params("scaled_qk", i)
    g = torch.Generator().manual_seed(_seed("scaled_qk", i))
    lead, Lq, Lk, D = p["lead"], p["Lq"], p["Lk"], p["D"]
    qs, ks = (*lead, Lq, D), (*lead, Lk, D)
    inputs = {
        "q": _randn(g, _stored(qs, p["q_bcast"])),
        "k": _randn(g, _stored(ks, p["k_bcast"])),
    }
    kw = {} if p["scale"] is None else {"scale": p["scale"]}

    def impl(q, k):
        return F.scaled_qk(_view(q, p["q_layout"], qs), _view(k, p["k_layout"], ks), **kw)

    def refn(q, k):
        return ref.scaled_qk(_view(q, p["q_layout"], qs), _view(k, p["k_layout"], ks), **kw)

    # q expanded along Lq or D, or k along Lk or D, makes one cancellation shared by every
    # element of a gradient: k's rows all equal make dq = scale * (row sums of the cotangent)
    # times k, and an expanded input's gradient is the op's gradient of the view (rounded to
    # the dtype) summed over the expanded dims, along D the other input's row sums. Below
    # float64 the error is then past the bound at times, torch's composition's too, so only
    # float64 differentiates those draws (expanded leading dims are differentiated always).
    lq_d = {len(lead), len(lead) + 1}
    degenerate = bool(lq_d & (set(p["q_bcast"]) | set(p["k_bcast"])))
    grad = [] if degenerate and p["dtype"] != "float64" else ["q", "k"]
    _check("scaled_qk", i, p, impl, refn, inputs, grad, ["scores"], g)


@pytest.mark.parametrize("i", _cases("masked_softmax"))
def test_masked_softmax(i):
    p = draw_params("masked_softmax", i)
    g = torch.Generator().manual_seed(_seed("masked_softmax", i))
    shape, scale = p["shape"], p["scale"]
    amp = p["temp"] / (abs(scale) if scale else 1.0)
    inputs = {"scores": _randn(g, _stored(shape, p["scores_bcast"]), amp)}
    inputs.update(_mask_tensors(p, g, shape))
    kw = dict(scale=scale, causal=p["causal"])

    def impl(scores, **t):
        m, kl = _mask_args(p, t, shape, reference=False)
        return F.masked_softmax(_view(scores, p["scores_layout"], shape), m, key_lengths=kl, **kw)

    def refn(scores, **t):
        m, kl = _mask_args(p, t, shape, reference=True)
        return ref.masked_softmax(_view(scores, p["scores_layout"], shape), m, key_lengths=kl, **kw)

    grad = _grads(p, ["scores"], inputs, shape)
    _check("masked_softmax", i, p, impl, refn, inputs, grad, ["probs"], g)


def _ln_inputs(p: Params, g: torch.Generator, names: Sequence[str]):
    lead, ns = p["lead"], p["ns"]
    shape = (*lead, *ns)
    inputs = {}
    for t in names:
        amp = p["amp"]
        x = _randn(g, _stored(lead, p[f"{t}_bcast"]) + tuple(ns), amp) + p["offset"] * amp
        inputs[t] = x
    if p["affine"] in ("both", "weight"):
        inputs["weight"] = _randn(g, _stored(ns, p["weight_bcast"])) + 1.0
    if p["affine"] in ("both", "bias"):
        inputs["bias"] = _randn(g, _stored(ns, p["bias_bcast"]))
    return shape, inputs


# the reference's var() of an empty row (N = 0) warns
EMPTY_ROWS = pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")


@EMPTY_ROWS
@pytest.mark.parametrize("i", _cases("layer_norm"))
def test_layer_norm(i):
    p = draw_params("layer_norm", i)
    g = torch.Generator().manual_seed(_seed("layer_norm", i))
    shape, inputs = _ln_inputs(p, g, ["x"])
    ns, eps = p["ns"], p["eps"]

    def args(x, weight=None, bias=None):
        return (
            _view(x, p["x_layout"], shape),
            _view(weight, p["weight_layout"], ns),
            _view(bias, p["bias_layout"], ns),
        )

    def impl(**t):
        x, w, b = args(**t)
        return F.layer_norm(x, ns, w, b, eps)

    def refn(**t):
        x, w, b = args(**t)
        return ref.layer_norm(x, ns, w, b, eps)

    _check("layer_norm", i, p, impl, refn, inputs, list(inputs), ["y"], g)


@EMPTY_ROWS
@pytest.mark.parametrize("i", _cases("add_layer_norm"))
def test_add_layer_norm(i):
    p = draw_params("add_layer_norm", i)
    g = torch.Generator().manual_seed(_seed("add_layer_norm", i))
    shape, inputs = _ln_inputs(p, g, ["x", "residual"])
    ns, eps = p["ns"], p["eps"]

    def args(x, residual, weight=None, bias=None):
        return (
            _view(x, p["x_layout"], shape),
            _view(residual, p["residual_layout"], shape),
            _view(weight, p["weight_layout"], ns),
            _view(bias, p["bias_layout"], ns),
        )

    def impl(**t):
        x, r, w, b = args(**t)
        return F.add_layer_norm(x, r, ns, w, b, eps)

    def refn(**t):
        x, r, w, b = args(**t)
        return ref.add_layer_norm(x, r, ns, w, b, eps)

    _check("add_layer_norm", i, p, impl, refn, inputs, list(inputs), ["y", "s"], g)


@pytest.mark.parametrize("i", _cases("attention"))
def test_attention(i):
    p = draw_params("attention", i)
    g = torch.Generator().manual_seed(_seed("attention", i))
    B, H, Lq, Lk, D, Dv = (p[n] for n in ("B", "H", "Lq", "Lk", "D", "Dv"))
    shapes = {"q": (B, H, Lq, D), "k": (B, H, Lk, D), "v": (B, H, Lk, Dv)}
    scale = p["scale"]
    eff = scale if scale is not None else (1 / math.sqrt(D) if D else 1.0)
    # q k^T * scale has a standard deviation of about temp (q alone for scale 0)
    q_amp = p["temp"] / (abs(eff) * math.sqrt(max(D, 1))) if eff else 1.0
    amps = {"q": q_amp, "k": 1.0, "v": 1.0}
    inputs = {t: _randn(g, _stored(s, p[f"{t}_bcast"]), amps[t]) for t, s in shapes.items()}
    scores = (B, H, Lq, Lk)
    inputs.update(_mask_tensors(p, g, scores))
    kw = dict(causal=p["causal"], need_weights=p["need_weights"])
    if scale is not None:
        kw["scale"] = scale

    def qkv(q, k, v):
        return (_view(x, p[f"{n}_layout"], shapes[n]) for n, x in (("q", q), ("k", k), ("v", v)))

    def impl(q, k, v, **t):
        m, kl = _mask_args(p, t, scores, reference=False)
        return F.attention(*qkv(q, k, v), m, key_lengths=kl, **kw)

    def refn(q, k, v, **t):
        m, kl = _mask_args(p, t, scores, reference=True)
        return ref.attention(*qkv(q, k, v), m, key_lengths=kl, **kw)

    # D = 1 in half types: dq and dk are 1-d dot products of the scores' gradient (rounded
    # through the saved half probabilities) with a head's few k (q) values, whose spread, shared
    # by the head's rows, can be small: past the bound for torch's composition in 2% of draws
    half_1d = D == 1 and p["dtype"] in ("float16", "bfloat16")
    grad = _grads(p, ["v"] if half_1d else ["q", "k", "v"], inputs, scores)
    _check("attention", i, p, impl, refn, inputs, grad, ["out", "weights"], g)
