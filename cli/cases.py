"""The cases of ``pyformer check``: which op, on which shape, with which mask.

A :class:`CheckCase` is dtype- and device-free: it draws its inputs in float64 on the CPU and names
two callables, the implementation under test and the pure-PyTorch reference, that take those
inputs as keyword arguments. ``pyformer check`` casts the inputs to each dtype and device, runs
both, differentiates both, and compares (see :mod:`pyformer.cli.check`).

Cases come from *builders* registered per op with :func:`register`. To add an op or an nn layer::

    from pyformer.cli.cases import CheckCase, register

    @register("my_layer")
    def _my_layer_cases(quick: bool):
        yield CheckCase(
            op="my_layer", shape="(2,7,64)", mask="-",
            make_inputs=lambda g: {"x": torch.randn(2, 7, 64, generator=g, dtype=torch.float64)},
            impl=lambda x: my_layer_under_test(x),
            ref=lambda x: my_layer_reference(x))

The op then shows up in ``pyformer check --op`` and in the default run. Built-in ops call
``pyformer.functional.<op>`` and ``pyformer.reference.<op>`` looked up at call time, so a test
may monkeypatch either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyformer.testing import make_mask

from .common import shape_str

F64 = torch.float64
Inputs = Dict[str, Tensor]


@dataclass(frozen=True)
class CheckCase:
    """One op on one shape with one mask kind; ``pyformer check`` runs it in every dtype/device.

    Args:
        op: the name shown in the table and accepted by ``--op``.
        shape: a short label for the shapes, e.g. ``"(2,3,7,97)"``.
        mask: a short label for the mask kind or variant (``"-"`` when there is none).
        make_inputs: draws the inputs from a seeded :class:`torch.Generator`, as float64 (floating
            tensors) or int64/bool tensors on the CPU.
        impl: the implementation under test, called with the inputs as keyword arguments;
            returns a tensor or a tuple of tensors (``None`` entries are ignored).
        ref: the reference, same calling convention; run in float64 as the truth and, for half
            types, in the dtype under test as "the pure-PyTorch composition".
        outputs: names of the returned tensors, for messages and the JSON.
        constants: input names that are not differentiated (masks, lengths). All other floating
            inputs get a gradient, which is checked.
        quick: whether ``--quick`` runs this case.
    """

    op: str
    shape: str
    mask: str
    make_inputs: Callable[[torch.Generator], Inputs]
    impl: Callable[..., object]
    ref: Callable[..., object]
    outputs: Tuple[str, ...] = ("out",)
    constants: Tuple[str, ...] = ("mask", "key_lengths")
    quick: bool = False

    @property
    def key(self) -> str:
        """A stable identifier, also used to seed the case's random inputs."""
        return f"{self.op}|{self.shape}|{self.mask}"


Builder = Callable[[bool], Iterator[CheckCase]]
_BUILDERS: Dict[str, List[Builder]] = {}


def register(op: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder ``fn(quick) -> iterable of CheckCase`` for ``op``."""

    def deco(fn: Builder) -> Builder:
        _BUILDERS.setdefault(op, []).append(fn)
        return fn

    return deco


def op_names() -> List[str]:
    """The ops that have check cases, in registration order."""
    return list(_BUILDERS)


def cases(ops: Optional[Sequence[str]] = None, quick: bool = False) -> List[CheckCase]:
    """Every registered case of ``ops`` (default: all ops); with ``quick``, the small matrix."""
    out = []
    for op in ops or op_names():
        for build in _BUILDERS[op]:
            out.extend(c for c in build(quick) if c.quick or not quick)
    return out


def op_pair(op: str, **static) -> Tuple[Callable[..., object], Callable[..., object]]:
    """``(impl, ref)`` calling ``pyformer.functional.<op>`` / ``pyformer.reference.<op>``.

    The functions are looked up at each call, so monkeypatching either module takes effect.
    ``static`` holds the non-tensor arguments (``scale``, ``causal``, ``normalized_shape``...).
    """
    import pyformer.functional as functional
    import pyformer.reference as reference

    def impl(**inputs):
        return getattr(functional, op)(**inputs, **static)

    def ref(**inputs):
        return getattr(reference, op)(**inputs, **static)

    return impl, ref


# ----------------------------------------------------------------------------- random inputs


def randn(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """Standard normal float64 values (times ``scale``, plus ``shift``) on the CPU."""
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


def lengths(g: torch.Generator, batch: int, lk: int, low: int = 1) -> Tensor:
    """Random valid-key counts in ``[low, lk]``, int64, shape (batch,)."""
    return torch.randint(low, lk + 1, (batch,), generator=g, dtype=torch.int64)


# The mask kinds check runs, from the one generator of pyformer.testing (the tests run them all).
MASK_KINDS: Tuple[str, ...] = (
    "none",
    "bool (B,1,1,Lk)",
    "bool (B,H,Lq,Lk)",
    "float (B,1,Lq,Lk)",
    "causal",
    "key_lengths",
    "bool+causal+lengths",
    "fully masked rows",
)


def _mask_tensors(g: torch.Generator, kind: str, b: int, h: int, lq: int, lk: int) -> Inputs:
    """The tensor inputs (``mask``, ``key_lengths``) of one draw of a mask kind."""
    return make_mask(kind, b, h, lq, lk, generator=g).tensors()


# ----------------------------------------------------------------------------- built-in ops

# (B, H, Lq, Lk, D): awkward lengths on purpose (7, 97, 1025 keys; head dims 1, 16, 64, 80, 128).
QUICK_ATTN_SHAPE = (2, 3, 7, 97, 16)
ATTN_SHAPES = [
    (2, 3, 7, 97, 16),
    (2, 2, 97, 97, 64),
    (1, 4, 33, 130, 80),
    (1, 2, 16, 1025, 128),
    (3, 1, 5, 7, 1),
]


@register("scaled_qk")
def _scaled_qk_cases(quick: bool):
    # (q shape, k shape, scale); q (..., Lq, D), k (..., Lk, D).
    shapes = [
        ((2, 3, 7, 16), (2, 3, 97, 16), None, True),
        ((2, 2, 97, 64), (2, 2, 33, 64), 0.3, False),
        ((5, 33, 80), (5, 130, 80), None, False),
        ((1, 1, 1, 1), (1, 1, 1, 1), None, False),
        ((1, 2, 16, 128), (1, 2, 1025, 128), None, False),
    ]
    for qs, ks, scale, q in shapes:
        impl, ref = op_pair("scaled_qk", scale=scale)
        label = "-" if scale is None else f"scale={scale}"
        yield CheckCase(
            "scaled_qk",
            f"q{shape_str(qs)} k{shape_str(ks)}",
            label,
            lambda g, qs=qs, ks=ks: {"q": randn(g, *qs), "k": randn(g, *ks)},
            impl,
            ref,
            outputs=("scores",),
            quick=q,
        )


def _softmax_inputs(b, h, lq, lk, kind):
    def make(g):
        return {"scores": randn(g, b, h, lq, lk, scale=3.0), **_mask_tensors(g, kind, b, h, lq, lk)}

    return make


def _static(kind: str) -> dict:
    """The non-tensor kwargs of a mask kind (``causal``); independent of the random draw."""
    return {"causal": True} if make_mask(kind, 1, 1, 1, 1, torch.Generator()).causal else {}


@register("masked_softmax")
def _masked_softmax_cases(quick: bool):
    for shape in ATTN_SHAPES:
        b, h, lq, lk, _ = shape
        for kind in MASK_KINDS:
            impl, ref = op_pair("masked_softmax", scale=0.125, **_static(kind))
            yield CheckCase(
                "masked_softmax",
                shape_str((b, h, lq, lk)),
                kind,
                _softmax_inputs(b, h, lq, lk, kind),
                impl,
                ref,
                outputs=("probs",),
                quick=shape == QUICK_ATTN_SHAPE,
            )


def _attention_inputs(b, h, lq, lk, d, kind):
    def make(g):
        return {
            "q": randn(g, b, h, lq, d),
            "k": randn(g, b, h, lk, d),
            "v": randn(g, b, h, lk, d),
            **_mask_tensors(g, kind, b, h, lq, lk),
        }

    return make


@register("attention")
def _attention_cases(quick: bool):
    for shape in ATTN_SHAPES:
        b, h, lq, lk, d = shape
        for kind in MASK_KINDS:
            impl, ref = op_pair("attention", **_static(kind))
            yield CheckCase(
                "attention",
                f"q{shape_str((b, h, lq, d))} Lk={lk}",
                kind,
                _attention_inputs(b, h, lq, lk, d, kind),
                impl,
                ref,
                outputs=("out", "weights"),
                quick=shape == QUICK_ATTN_SHAPE,
            )
    # need_weights: the probabilities are an output too, and their gradient flows back.
    b, h, lq, lk, d = QUICK_ATTN_SHAPE
    for kind in ("bool (B,1,1,Lk)", "fully masked rows"):
        impl, ref = op_pair("attention", need_weights=True, **_static(kind))
        yield CheckCase(
            "attention",
            f"q{shape_str((b, h, lq, d))} Lk={lk}",
            f"{kind} +weights",
            _attention_inputs(b, h, lq, lk, d, kind),
            impl,
            ref,
            outputs=("out", "weights"),
            quick=True,
        )


# (x shape, normalized_shape, affine, quick). N = 1 or 2 is left out: there dx is zero in exact
# arithmetic, so a relative error of the gradient measures only rounding noise.
NORM_SHAPES = [
    ((4, 7, 97), (97,), True, True),
    ((3, 1024), (1024,), False, True),
    ((2, 5, 7), (7,), True, False),
    ((64, 768), (768,), True, False),
    ((2, 3, 4, 5), (4, 5), True, False),
    ((3, 4097), (4097,), True, False),
    ((6, 3), (3,), True, False),
]


def _norm_inputs(xs, ns, affine, residual):
    def make(g):
        out = {"x": randn(g, *xs, scale=2.0, shift=0.5)}
        if residual:
            out["residual"] = randn(g, *xs)
        if affine:
            out["weight"] = randn(g, *ns, scale=0.5, shift=1.0)
            out["bias"] = randn(g, *ns, scale=0.5)
        return out

    return make


def _norm_cases(op: str, residual: bool, outputs: Tuple[str, ...], quick_affine_only: bool):
    """The builder of ``op`` (``layer_norm`` or ``add_layer_norm``) over NORM_SHAPES."""

    def build(quick: bool):
        for xs, ns, affine, q in NORM_SHAPES:
            impl, ref = op_pair(op, normalized_shape=ns)
            yield CheckCase(
                op,
                f"{shape_str(xs)} N={math.prod(ns)}",
                "weight+bias" if affine else "no affine",
                _norm_inputs(xs, ns, affine, residual),
                impl,
                ref,
                outputs=outputs,
                quick=q and (affine or not quick_affine_only),
            )

    return build


register("layer_norm")(_norm_cases("layer_norm", False, ("y",), quick_affine_only=False))
register("add_layer_norm")(_norm_cases("add_layer_norm", True, ("y", "s"), quick_affine_only=True))


def _rms_cases(op: str, residual: bool, outputs: Tuple[str, ...]):
    """The builder of ``op`` (``rms_norm`` or ``add_rms_norm``) over NORM_SHAPES, eps=None."""

    def build(quick: bool):
        for xs, ns, affine, q in NORM_SHAPES:
            impl, ref = op_pair(op, normalized_shape=ns)

            def make(g, xs=xs, ns=ns, affine=affine):
                out = {"x": randn(g, *xs, scale=2.0, shift=0.5)}
                if residual:
                    out["residual"] = randn(g, *xs)
                if affine:
                    out["weight"] = randn(g, *ns, scale=0.5, shift=1.0)
                return out

            yield CheckCase(
                op,
                f"{shape_str(xs)} N={math.prod(ns)}",
                "weight" if affine else "no weight",
                make,
                impl,
                ref,
                outputs=outputs,
                quick=q and (affine or not residual),
            )

    return build


register("rms_norm")(_rms_cases("rms_norm", False, ("y",)))
register("add_rms_norm")(_rms_cases("add_rms_norm", True, ("y", "s")))

# (B, Hq, Hk, L, D, Dr, cos batch, quick): GQA, partial rotary, decoding, per-sequence positions
ROTARY_SHAPES = [
    (2, 4, 2, 7, 64, 64, 1, True),
    (2, 8, 2, 33, 128, 128, 2, False),
    (1, 3, 1, 9, 80, 32, 1, True),
    (4, 4, 4, 1, 64, 64, 4, False),
]


def _rotary_inputs(b, hq, hk, length, d, dr, bc, interleaved):
    def make(g):
        inv = 1.0 / 10000.0 ** (torch.arange(0, dr, 2, dtype=F64) / dr)
        pos = torch.randint(0, 4096, (bc, length), generator=g).to(F64)
        f = pos[..., None] * inv
        emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
        return {
            "q": randn(g, b, hq, length, d),
            "k": randn(g, b, hk, length, d),
            "cos": emb.cos(),
            "sin": emb.sin(),
        }

    return make


@register("apply_rotary")
def _rotary_cases(quick: bool):
    for b, hq, hk, length, d, dr, bc, q in ROTARY_SHAPES:
        for interleaved in (False, True):
            impl, ref = op_pair("apply_rotary", interleaved=interleaved)
            yield CheckCase(
                "apply_rotary",
                f"q{shape_str((b, hq, length, d))} k{shape_str((b, hk, length, d))} Dr={dr}",
                "interleaved" if interleaved else "rotate-half",
                _rotary_inputs(b, hq, hk, length, d, dr, bc, interleaved),
                impl,
                ref,
                outputs=("q_rot", "k_rot"),
                constants=("cos", "sin"),
                quick=q,
            )


@register("swiglu")
def _swiglu_cases(quick: bool):
    for shape, q in (((4, 7, 1408), True), ((3, 11008), False), ((5, 33), True)):
        impl, ref = op_pair("swiglu")
        yield CheckCase(
            "swiglu",
            shape_str(shape),
            "-",
            lambda g, shape=shape: {"gate": randn(g, *shape, scale=3.0), "up": randn(g, *shape)},
            impl,
            ref,
            quick=q,
        )


# ----------------------------------------------------------------------------- nn layers
# The drop-in modules against PyTorch's own with the same weights (the textbook Transformer's two
# backends are compared in tests/test_nn.py). Weights are drawn once in float64 and loaded into a
# module of the dtype and device under test; the input is differentiated.


def _module_case(
    op, shape, mask, make_inputs, build_impl, build_ref, call, outputs, constants, quick
):
    """A CheckCase whose impl/ref build a module (fixed float64 weights) in the inputs' dtype."""
    state = {}

    def runner(build):
        def run(**inputs):
            x = next(t for t in inputs.values() if t.is_floating_point())
            m = build()
            if "sd" not in state:  # the one set of weights, float64
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    state["sd"] = {k: v.to(F64) for k, v in build_impl().state_dict().items()}
            m.load_state_dict(state["sd"])
            return call(m.to(device=x.device, dtype=x.dtype), **inputs)

        return run

    return CheckCase(
        op,
        shape,
        mask,
        make_inputs,
        runner(build_impl),
        runner(build_ref),
        outputs=outputs,
        constants=constants,
        quick=quick,
    )


@register("nn.MultiheadAttention")
def _nn_mha_cases(quick: bool):
    import pyformer.nn as pnn

    b, l, e, h = 2, 9, 32, 4

    def make(g):
        pad = torch.arange(l) >= lengths(g, b, l).view(b, 1)  # torch's convention: True = padding
        return {"x": randn(g, b, l, e), "pad": pad}

    def call(m, x, pad):
        return m(x, x, x, key_padding_mask=pad, need_weights=True)

    yield _module_case(
        "nn.MultiheadAttention",
        f"({b},{l},{e}) H={h}",
        "key_padding_mask",
        make,
        lambda: pnn.MultiheadAttention(e, h, batch_first=True),
        lambda: torch.nn.MultiheadAttention(e, h, batch_first=True),
        call,
        ("out", "weights"),
        ("pad",),
        True,
    )


@register("nn.LayerNorm")
def _nn_layer_norm_cases(quick: bool):
    import pyformer.nn as pnn

    xs, n = (3, 5, 64), 64
    yield _module_case(
        "nn.LayerNorm",
        shape_str(xs),
        "weight+bias",
        lambda g: {"x": randn(g, *xs, scale=2.0)},
        lambda: pnn.LayerNorm(n),
        lambda: torch.nn.LayerNorm(n),
        lambda m, x: m(x),
        ("y",),
        (),
        True,
    )
