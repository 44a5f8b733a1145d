"""The one verification harness: what "correct" means for the tests, ``pyformer check``, the
CUDA-only tests and ``pyformer bench``'s sanity check.

The rule of ``docs/ops.md``: compare against the reference computed in float64 from the
same inputs by the relative error ``||out - ref|| / ||ref||``, within a bound per dtype and, for
half types, within twice the error of the pure-PyTorch composition run in the same dtype, plus
1e-5. NaN (or inf) where the reference has none always fails.

Layers, each built on the one below:

- :func:`rel_err`, :func:`bound`, :func:`mismatch_report`: the criteria;
- :func:`judge` / :func:`expect_close`: one tensor against its expected value;
- :func:`compare`: named results (outputs, gradients) against the reference's;
- :func:`verify`: a whole run. The inputs are rounded to the tested dtype; the reference runs on
  those values in float64 (on the CPU by default); cotangents are drawn and rounded to the tested
  dtype, so every side differentiates the same values; gradients are pulled back; for half types
  the composition runs in the tested dtype on the tested device; the op under test runs last, on
  memory poisoned by :func:`poison`; every output and gradient is compared.

Inputs for attention-shaped ops come from one mask generator, :func:`make_mask`, whose kinds are
:data:`MASK_KINDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "BOUNDS",
    "HALF",
    "rel_err",
    "bound",
    "mismatch_report",
    "Judgement",
    "judge",
    "expect_close",
    "compare",
    "Verification",
    "verify",
    "poison",
    "nbytes",
    "Mask",
    "MASK_KINDS",
    "make_mask",
]

BOUNDS = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the criteria


def rel_err(out: Optional[Tensor], ref: Optional[Tensor], chunk: int = 1 << 24) -> float:
    """``||out - ref|| / ||ref||`` in float64 over the entries where ``ref`` is finite.

    Returns ``inf`` when shapes differ, when ``out`` is NaN/inf where ``ref`` is finite, when
    ``ref`` is non-finite where ``out`` is not (NaN must propagate where the reference has it), or
    when their NaN / +inf / -inf entries differ.
    An all-zero reference gives the absolute error ``||out||``.

    Computed ``chunk`` elements at a time, on the tensors' device when they share one (a
    (8,16,2048,2048) comparison on a GPU stays there, in temporaries of ~0.5 GiB), else on the CPU.
    """
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else math.inf
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    dev = ref.device if out.device == ref.device else torch.device("cpu")
    o_all, r_all = out.detach().reshape(-1), ref.detach().reshape(-1)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    num2 = den2 = zero
    for i in range(0, o_all.numel(), chunk):
        o = o_all[i : i + chunk].to(dev, torch.float64)
        r = r_all[i : i + chunk].to(dev, torch.float64)
        rf = torch.isfinite(r)
        if not (
            torch.equal(torch.isfinite(o), rf)
            and torch.equal(torch.isnan(o), torch.isnan(r))
            and torch.equal(torch.isposinf(o), torch.isposinf(r))
        ):
            return math.inf
        d = torch.where(rf, o - r, zero)
        rr = torch.where(rf, r, zero)
        num2 = num2 + (d * d).sum()
        den2 = den2 + (rr * rr).sum()
    num, den = math.sqrt(num2.item()), math.sqrt(den2.item())
    return num / den if den > 0 else num


def bound(dtype: torch.dtype, composed_err: Optional[float] = None) -> float:
    """The accuracy bound for ``dtype``; for half types also ``<= 2 * composed_err + 1e-5``."""
    b = BOUNDS[dtype]
    if dtype in HALF and composed_err is not None:
        b = min(b, 2.0 * composed_err + 1e-5)
    return b


def mismatch_report(out: Tensor, ref: Tensor, tol: float, first: int = 3) -> str:
    """Where ``out`` and ``ref`` disagree: mismatch count, first indices, NaN/inf counts."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if o.shape != r.shape:
        return f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"
    scale = r[torch.isfinite(r)].abs().max().item() if torch.isfinite(r).any() else 1.0
    bad = ~torch.isclose(o, r, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True)
    idx = [tuple(i) for i in bad.nonzero()[:first].tolist()]
    return (
        f"{int(bad.sum())} of {o.numel()} mismatch (first at {idx}); "
        f"NaN {int(torch.isnan(o).sum())} (ref {int(torch.isnan(r).sum())}), "
        f"inf {int(torch.isinf(o).sum())} (ref {int(torch.isinf(r).sum())})"
    )


# ----------------------------------------------------------------------------- one tensor


@dataclass(frozen=True)
class Judgement:
    """One tensor against its expected value: the error, the bound it had to meet, the
    composition's own error (half types, when given) and, outside the bound, where it is off."""

    err: float
    bound: float
    composed_err: Optional[float] = None
    failure: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def judge(
    out: Tensor,
    expect: Tensor,
    dtype: Optional[torch.dtype] = None,
    composed: Optional[Tensor] = None,
) -> Judgement:
    """``out`` against ``expect`` by the rule above, with the bound of ``dtype`` (default:
    ``out``'s dtype); ``composed`` is the pure-PyTorch composition's result in that dtype."""
    dtype = out.dtype if dtype is None else dtype
    c_err = rel_err(composed, expect) if composed is not None else None
    tol = bound(dtype, c_err)
    err = rel_err(out, expect)
    failure = None
    if not err <= tol:  # also catches NaN
        failure = f"rel err {err:.2e} > {tol:.1e}; {mismatch_report(out, expect, tol)}"
    return Judgement(err, tol, c_err, failure)


def expect_close(
    out: Tensor,
    expect: Tensor,
    composed: Optional[Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    what: str = "",
) -> Judgement:
    """:func:`judge`, raising ``AssertionError`` (prefixed by ``what``) when out of bounds."""
    j = judge(out, expect, dtype, composed)
    if not j.ok:
        raise AssertionError(f"{what}: {j.failure} ({dtype or out.dtype})")
    return j


# ----------------------------------------------------------------------------- named results


def compare(
    outs: Mapping[str, Optional[Tensor]],
    refs: Mapping[str, Optional[Tensor]],
    comps: Optional[Mapping[str, Optional[Tensor]]],
    dtype: torch.dtype,
) -> Tuple[Optional[float], Dict[str, float], Dict[str, float], List[str]]:
    """Compare named results with the reference.

    Args:
        outs: results under test, by name (``"y"``, ``"dq"``...).
        refs: the float64 reference results, same names. A name missing from ``outs`` fails; a
            name whose reference is ``None`` (no gradient) passes when the result is ``None`` or
            all zeros.
        comps: for half types, the pure-PyTorch composition run in the same dtype (else None),
            whose own error tightens the bound (:func:`bound`).
        dtype: the dtype under test, which picks the bound.

    Returns:
        ``(max_err, errors, torch_errors, failures)``: the largest relative error (``None`` when
        there is nothing to compare), each tensor's error, each tensor's composition error (half
        types only) and one line per tensor outside its bound, saying where it is off.
    """
    errors, torch_errors, failures = {}, {}, []
    for name, ref in refs.items():
        out = outs.get(name)
        if ref is None:
            if out is not None and out.abs().sum().item():
                failures.append(f"{name}: nonzero, where the reference has no gradient")
            continue
        if out is None:
            errors[name] = math.inf
            failures.append(f"{name}: missing (the op returned no value or gradient for it)")
            continue
        j = judge(out, ref, dtype, comps.get(name) if comps is not None else None)
        errors[name] = j.err
        if j.composed_err is not None:
            torch_errors[name] = j.composed_err
        if not j.ok:
            failures.append(f"{name}: {j.failure}")
    for name in outs:
        if name not in refs and outs[name] is not None:
            failures.append(f"{name}: returned, where the reference returns none")
    max_err = max(errors.values()) if errors else None
    return max_err, errors, torch_errors, failures


# ----------------------------------------------------------------------------- poisoning


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """The size in bytes of a tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def poison(device: Union[str, torch.device], *sizes: int) -> None:
    """Fill freed GPU memory with NaN so the next allocations of these sizes start out as NaN.

    pyformer's ops allocate their own outputs; the caching allocator hands back a block of the
    same size that was just freed, so allocating NaN-filled blocks of each size (in bytes) and
    freeing them makes an element that a kernel never writes read back as NaN. The op's
    allocations must come next, in this order (intermediates included): call this right before
    the op, after any copy of its inputs, or the copy takes the NaN block.

    The bytes are all 0xFF: NaN in every floating dtype. (A float32 NaN, 0x7FC00000, would read
    as bfloat16/float16 (NaN, +0.0) pairs, and an unwritten +0.0 passes for a masked probability.)
    A no-op off CUDA: the CPU allocator recycles nothing predictably.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    keep = [torch.full((max(1, int(n)),), 0xFF, dtype=torch.uint8, device=device) for n in sizes]
    torch.cuda.synchronize(device)
    del keep


# ----------------------------------------------------------------------------- a whole run


@dataclass
class Verification:
    """The outcome of :func:`verify`.

    ``outputs``/``gradients`` are the op's (detached), ``reference``/``reference_gradients`` the
    float64 reference's, ``inputs`` what the op was called with (in the tested dtype, on the
    tested device). ``errors`` and ``torch_errors`` hold each compared tensor's error and, for
    half types, the composition's; ``fwd_err``/``grad_err`` the largest of each group.
    ``failures`` has one line per disagreement; ``raised`` is what the op under test raised (then
    nothing was compared).
    """

    inputs: Dict[str, Any] = field(default_factory=dict)
    outputs: Dict[str, Tensor] = field(default_factory=dict)
    gradients: Dict[str, Optional[Tensor]] = field(default_factory=dict)
    reference: Dict[str, Tensor] = field(default_factory=dict)
    reference_gradients: Dict[str, Optional[Tensor]] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)
    torch_errors: Dict[str, float] = field(default_factory=dict)
    fwd_err: Optional[float] = None
    grad_err: Optional[float] = None
    failures: List[str] = field(default_factory=list)
    raised: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.raised is None

    def assert_ok(self, what: str = "") -> "Verification":
        """Re-raises what the op raised; raises ``AssertionError`` listing every failure."""
        if self.raised is not None:
            raise self.raised
        if self.failures:
            raise AssertionError("\n".join(f"{what}: {f}" if what else f for f in self.failures))
        return self


Inputs = Union[Sequence[Any], Mapping[str, Any]]


def _names(inputs: Inputs) -> Tuple[Dict[str, Any], bool]:
    if isinstance(inputs, Mapping):
        return dict(inputs), False
    return {f"arg{i}": a for i, a in enumerate(inputs)}, True


def _prepare(values: Dict[str, Any], dtype, device, grad: Sequence[str]) -> Dict[str, Any]:
    """Floating tensors -> ``dtype`` on ``device``, fresh leaves (requiring grad if in
    ``grad``); other tensors -> ``device``; anything else as it is. Layouts are kept where
    ``Tensor.to`` keeps them (a float64 CPU input tested in float64 on the CPU is the input)."""
    out = {}
    for name, a in values.items():
        if isinstance(a, Tensor):
            if a.is_floating_point():
                t = a.detach().to(device=device, dtype=dtype)
                t.requires_grad_(name in grad)
            else:
                t = a.detach().to(device)
            out[name] = t
        else:
            out[name] = a
    return out


def _call(
    fn: Callable, inputs: Dict[str, Any], positional: bool, names: Optional[Sequence[str]]
) -> Dict[str, Tensor]:
    """``fn`` on the inputs; its results (a tensor or a tuple; ``None`` left out) by name:
    ``names`` in order, else ``out0``, ``out1``..."""
    result = fn(*inputs.values()) if positional else fn(**inputs)
    if isinstance(result, Tensor) or result is None:
        result = (result,)
    named = {}
    for i, t in enumerate(result):
        if isinstance(t, Tensor):
            named[names[i] if names is not None and i < len(names) else f"out{i}"] = t
    return named


def _pull_back(
    outs: Dict[str, Tensor],
    inputs: Dict[str, Any],
    grad: Sequence[str],
    cotangents: Dict[str, Tensor],
) -> Dict[str, Optional[Tensor]]:
    """``d`` + name -> gradient of ``sum(out * cotangent)`` for each input in ``grad`` (``None``
    where the outputs do not depend on it)."""
    leaves = [inputs[n] for n in grad]
    pairs = [(o, cotangents[n]) for n, o in outs.items() if o.requires_grad and n in cotangents]
    if not leaves or not pairs:
        return {"d" + n: None for n in grad}
    gs = torch.autograd.grad(
        [o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True
    )
    return {"d" + n: g for n, g in zip(grad, gs)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify(
    impl: Callable,
    ref: Callable,
    inputs: Inputs,
    *,
    dtype: torch.dtype,
    device: Union[str, torch.device],
    grad: Sequence[Union[int, str]] = (),
    outputs: Optional[Sequence[str]] = None,
    composed: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
    poison_bytes: Optional[Tuple[Sequence[int], Sequence[int]]] = None,
    ref_device: Union[str, torch.device] = "cpu",
) -> Verification:
    """Run ``impl`` (the op under test) in ``dtype`` on ``device`` and check every output and
    every gradient against ``ref`` run in float64 from the same values.

    Args:
        impl, ref: callables taking the inputs (positionally when ``inputs`` is a sequence, as
            keyword arguments when it is a mapping) and returning a tensor or a tuple of tensors.
        inputs: tensors (floating ones in any dtype, on any device: they are rounded to
            ``dtype`` first, and those values are what every side sees) and other arguments.
        grad: the inputs (indices or names) differentiated; their gradients are named ``"d"`` +
            the input's name (a positional input ``i`` is named ``"arg<i>"``).
        outputs: names of the results, in order (default ``out0``, ``out1``...).
        composed: the pure-PyTorch composition run in ``dtype`` for half types (default ``ref``);
            an output it does not return is held to the dtype's bound alone.
        generator: draws the cotangents (default: torch's global generator), one per output, in
            float64 rounded to ``dtype``.
        poison_bytes: the sizes :func:`poison` fills right before the op's forward and right
            before its backward (default: the outputs' sizes, then the gradients', in ``dtype``).
        ref_device: where the float64 reference runs (the CPU unless every tensor ``ref`` uses
            is among ``inputs``: then the tested device is faster for large inputs).

    Reference and composition errors propagate; what ``impl`` raises is kept in
    :attr:`Verification.raised` (:meth:`Verification.assert_ok` raises it again).
    """
    device = torch.device(device)
    values, positional = _names(inputs)
    keys = list(values)
    grad = [keys[g] if isinstance(g, int) else g for g in grad]
    composed = ref if composed is None else composed
    # the same values in every run: round the inputs to the tested dtype first
    values = {
        n: a.detach().to(dtype).to(torch.float64)
        if isinstance(a, Tensor) and a.is_floating_point()
        else a
        for n, a in values.items()
    }

    r_in = _prepare(values, torch.float64, ref_device, grad)
    r_outs = _call(ref, r_in, positional, outputs)
    # cotangents in the tested dtype, so every side differentiates the same values
    gen_dev = generator.device if generator is not None else "cpu"
    cot = {
        n: torch.randn(o.shape, generator=generator, dtype=torch.float64, device=gen_dev)
        .to(dtype)
        .to(ref_device, torch.float64)
        for n, o in r_outs.items()
    }
    r_grads = _pull_back(r_outs, r_in, grad, cot)
    res = Verification(
        reference={n: o.detach() for n, o in r_outs.items()}, reference_gradients=r_grads
    )

    c_outs = c_grads = None
    if dtype in HALF:
        c_in = _prepare(values, dtype, device, grad)
        c_outs = _call(composed, c_in, positional, outputs)
        c_grads = _pull_back(
            c_outs,
            c_in,
            grad,
            {n: c.to(device, o.dtype) for n, o in c_outs.items() if (c := cot.get(n)) is not None},
        )
        c_outs = {n: o.detach() for n, o in c_outs.items()}

    if poison_bytes is None:
        poison_bytes = (
            [nbytes(o.shape, dtype) for o in r_outs.values()],
            [nbytes(g.shape, dtype) for g in r_grads.values() if g is not None],
        )
    res.inputs = f_in = _prepare(values, dtype, device, grad)
    try:
        poison(device, *poison_bytes[0])
        f_outs = _call(impl, f_in, positional, outputs)
        _sync(device)  # an asynchronous kernel error is this run's, reported here
        f_cot = {
            n: c.to(o.device, o.dtype) for n, o in f_outs.items() if (c := cot.get(n)) is not None
        }
        poison(device, *poison_bytes[1])
        f_grads = _pull_back(f_outs, f_in, grad, f_cot)
        _sync(device)
    except Exception as exc:  # the op's error is a result, for the caller to report or raise
        res.raised = exc
        first = (str(exc).strip().splitlines() or [""])[0]
        res.failures.append(f"raised {type(exc).__name__}: {first}")
        return res

    res.outputs = {n: o.detach() for n, o in f_outs.items()}
    res.gradients = {n: g for n, g in f_grads.items() if g is not None}
    for n, o in res.outputs.items():
        if o.dtype != dtype or o.device.type != device.type:
            res.failures.append(f"{n}: {o.dtype} on {o.device}, expected {dtype} on {device.type}")
    res.fwd_err, e1, t1, f1 = compare(res.outputs, res.reference, c_outs, dtype)
    res.grad_err, e2, t2, f2 = compare(res.gradients, r_grads, c_grads, dtype)
    res.errors, res.torch_errors = {**e1, **e2}, {**t1, **t2}
    res.failures += f1 + f2
    return res


# ----------------------------------------------------------------------------- masks


class Mask(NamedTuple):
    """One draw of a mask kind: ``(mask, causal, key_lengths)``, on the CPU; a bool mask is
    True where a key may be attended, a float mask is added to the scores (float64)."""

    mask: Optional[Tensor]
    causal: Union[bool, str]  # False, True (top-left) or "bottom_right"
    key_lengths: Optional[Tensor]

    def tensors(self) -> Dict[str, Tensor]:
        """The tensor arguments by their op names (``mask``, ``key_lengths``), where present."""
        return {
            n: t
            for n, t in (("mask", self.mask), ("key_lengths", self.key_lengths))
            if t is not None
        }


def _rand(g, *shape):
    return torch.rand(*shape, generator=g)


def _at_least_one(ok: Tensor, g) -> Tensor:
    """``ok`` with one random position per row set True, so no row is fully masked."""
    col = torch.randint(0, ok.shape[-1], ok.shape[:-1] + (1,), generator=g)
    return ok.scatter(-1, col, True)


def _lengths(g, b, lk):
    """Valid-key counts in [1, Lk], int64, shape (B,)."""
    return torch.randint(1, lk + 1, (b,), generator=g, dtype=torch.int64)


def _padding(g, b, lk):
    return (torch.arange(lk) < _lengths(g, b, lk).view(b, 1)).view(b, 1, 1, lk)


def _float(g, shape):
    """Additive: normal values, about a fifth -inf, at least one finite entry per row."""
    ok = _at_least_one(_rand(g, *shape) < 0.8, g)
    return torch.randn(*shape, generator=g, dtype=torch.float64).masked_fill(~ok, -math.inf)


def _edge_lengths(b, lk):
    """Key lengths 0, Lk, Lk/3 and Lk-1, cycled over the batch."""
    lens = [0, lk, max(1, lk // 3), max(0, lk - 1)]
    return torch.tensor([lens[i % 4] for i in range(b)], dtype=torch.int64)


def _fully_masked(g, b, h, lq, lk):
    # every other query row masked out by the bool mask and, with more than one batch element,
    # batch element 0 without any valid key: those rows must come out as zeros, not NaN
    ok = _at_least_one(_rand(g, b, h, lq, lk) < 0.7, g)
    ok[:, :, ::2, :] = False
    lens = _lengths(g, b, lk)
    if b > 1:
        lens[0] = 0
    return Mask(ok, False, lens)


def _keys1(g, b, h, lq, lk):
    m = _rand(g, b, 1, lq, 1) > 0.3
    m[:, :, 0] = True
    return Mask(m, False, None)


# Each kind draws a Mask for scores of shape (B, H, Lq, Lk); the name says what it is. Unless the
# name says otherwise, every row keeps at least one allowed key.
_KINDS: Dict[str, Callable[..., Mask]] = {
    "none": lambda g, b, h, lq, lk: Mask(None, False, None),
    # padding: the first key_lengths keys of each batch element
    "bool (B,1,1,Lk)": lambda g, b, h, lq, lk: Mask(_padding(g, b, lk), False, None),
    # random, per head and query
    "bool (B,H,Lq,Lk)": lambda g, b, h, lq, lk: Mask(
        _at_least_one(_rand(g, b, h, lq, lk) < 0.7, g), False, None
    ),
    # random holes broadcast over the heads (a stride-0 dim); a row may be fully masked
    "bool (B,1,Lq,Lk)": lambda g, b, h, lq, lk: Mask(_rand(g, b, 1, lq, lk) > 0.2, False, None),
    # broadcast along the keys: whole query rows masked (query 0 never)
    "bool (B,1,Lq,1)": _keys1,
    "float (1,H,Lq,Lk)": lambda g, b, h, lq, lk: Mask(_float(g, (1, h, lq, lk)), False, None),
    "float (B,1,Lq,Lk)": lambda g, b, h, lq, lk: Mask(_float(g, (b, 1, lq, lk)), False, None),
    "float (1,H,1,Lk)": lambda g, b, h, lq, lk: Mask(_float(g, (1, h, 1, lk)), False, None),
    "causal": lambda g, b, h, lq, lk: Mask(None, True, None),
    # a KV cache's alignment (key j <= i + Lk - Lq): with Lq > Lk the first rows are fully masked
    "causal bottom_right": lambda g, b, h, lq, lk: Mask(None, "bottom_right", None),
    "bottom_right+lengths": lambda g, b, h, lq, lk: Mask(None, "bottom_right", _lengths(g, b, lk)),
    "key_lengths": lambda g, b, h, lq, lk: Mask(None, False, _lengths(g, b, lk)),
    # padding + causal + key_lengths: key 0 passes all three, so no row is fully masked
    "bool+causal+lengths": lambda g, b, h, lq, lk: Mask(
        _padding(g, b, lk), True, _lengths(g, b, lk)
    ),
    # random holes + causal + key lengths 0, Lk, Lk/3, Lk-1: fully masked rows and batches
    "holes+causal+edge lengths": lambda g, b, h, lq, lk: Mask(
        _rand(g, b, 1, lq, lk) > 0.2, True, _edge_lengths(b, lk)
    ),
    "fully masked rows": _fully_masked,
}

MASK_KINDS: Tuple[str, ...] = tuple(_KINDS)


def make_mask(
    kind: str, b: int, h: int, lq: int, lk: int, generator: Optional[torch.Generator] = None
) -> Mask:
    """A random mask of ``kind`` (one of :data:`MASK_KINDS`) for scores (B, H, Lq, Lk), drawn on
    the CPU from ``generator`` (default: torch's global generator)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_KINDS)}")
    return _KINDS[kind](generator, b, h, lq, lk)
