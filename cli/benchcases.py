"""What ``pyformer bench`` times: one :class:`BenchConfig` per op and size, grouped in sweeps.

Every config builds a :class:`Problem`: the same inputs fed to up to three *providers*:

- ``pyformer``: ``pyformer.functional.<op>``;
- ``textbook``: ``pyformer.reference.<op>`` with ``zero_masked_rows=False``, the composition people
  write by hand (matmul, scale, ``masked_fill``, softmax, matmul; layer norm from mean and var),
  given the equivalent bool mask where pyformer gets ``key_lengths``;
- ``torch``: PyTorch's own fused op, where one exists:
  ``masked_softmax`` -> ``F.softmax`` alone, on scores already scaled and masked *outside* the
  timer (so it is a lower bound for any unfused composition);
  ``layer_norm`` -> ``F.layer_norm``; ``add_layer_norm`` -> ``x + residual`` then ``F.layer_norm``;
  ``rms_norm`` -> ``F.rms_norm``; ``add_rms_norm`` -> ``x + residual`` then ``F.rms_norm``;
  ``apply_rotary`` -> Hugging Face's ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) * sin``
  in the dtype, on q and k); ``swiglu`` -> ``F.silu(gate) * up``;
  ``attention`` -> ``F.scaled_dot_product_attention`` with the equivalent bool ``attn_mask``
  (``is_causal=True`` for the causal variant). ``scaled_qk`` has none.

Sizes (the x axis of a sweep) are the sequence length L (= Lq = Lk) for ``scaled_qk``,
``masked_softmax``, ``attention`` and ``apply_rotary``, and the hidden size N for the norms and
``swiglu``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import shape_str

OPS = (
    "scaled_qk",
    "masked_softmax",
    "layer_norm",
    "add_layer_norm",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "swiglu",
    "attention",
)
MODES = ("forward", "backward", "both")
SEQ_OPS = ("scaled_qk", "masked_softmax", "attention", "apply_rotary")
COMPUTE_OPS = ("scaled_qk", "attention")  # reported in TFLOP/s; the others in GB/s


@dataclass
class Provider:
    """One implementation of the op: ``fn()`` runs it on ``leaves`` (the inputs that get
    gradients in the backward modes)."""

    fn: Callable[[], object]
    leaves: List[Tensor]


@dataclass
class Problem:
    """A config's inputs made concrete: the providers and the work, per mode.

    ``reference()`` is ``pyformer.reference``'s op in float64 on the same inputs (bench's
    sanity check judges pyformer's forward against it, as the tests and ``pyformer check`` do).
    ``bytes`` (memory-bound ops) counts each input read once and each output written once;
    ``flops`` (matrix ops) counts the matrix products. Both are per mode.
    """

    providers: Dict[str, Provider]
    reference: Callable[[], object]
    bytes: Optional[Dict[str, int]] = None
    flops: Optional[Dict[str, int]] = None


@dataclass(frozen=True)
class BenchConfig:
    """One op at one size; ``make(dtype, device, generator)`` builds its :class:`Problem`."""

    op: str
    variant: str
    shape: str
    size: int
    torch_label: str
    make: Callable[[torch.dtype, str, torch.Generator], Problem] = field(compare=False)
    modes: Optional[Tuple[str, ...]] = None  # this config's modes when --mode is not given
    dtypes: Optional[Tuple[str, ...]] = None  # this config's dtypes when --dtype is not given

    @property
    def key(self) -> str:
        return f"{self.op}|{self.variant}|{self.shape}"


def nbytes(*tensors: Tensor) -> int:
    """Total size of the tensors in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _rand(g, shape, dtype, device, requires_grad=True):
    """Normal values drawn on ``device`` (``g`` is a generator of that device) in ``dtype``."""
    t = torch.randn(shape, generator=g, device=device).to(dtype)
    return t.requires_grad_(requires_grad)


def _padding(g, b, lk, device):
    """Key lengths drawn uniformly in [Lk/2, Lk] and the equivalent (B,1,1,Lk) bool mask."""
    lens = torch.randint(lk // 2, lk + 1, (b,), generator=g, device=device)
    mask = (torch.arange(lk, device=device) < lens.view(b, 1)).view(b, 1, 1, lk)
    return lens, mask


def _f64(fn, *args, **kwargs) -> Callable[[], object]:
    """``fn(*args, **kwargs)`` with every floating tensor argument as a float64 copy."""

    def up(a):
        return a.detach().double() if torch.is_tensor(a) and a.is_floating_point() else a

    return lambda: fn(*(up(a) for a in args), **{k: up(a) for k, a in kwargs.items()})


def _modes(fwd: int, bwd: int) -> Dict[str, int]:
    return {"forward": fwd, "backward": bwd, "both": fwd + bwd}


# ----------------------------------------------------------------------------- configs


def scaled_qk_config(b: int, h: int, l: int, d: int) -> BenchConfig:
    """``scaled_qk`` on q, k of shape (B,H,L,D), default scale 1/sqrt(D)."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        q, k = (_rand(g, (b, h, l, d), dtype, device) for _ in range(2))
        flops = 2 * b * h * l * l * d
        return Problem(
            {
                "pyformer": Provider(lambda: pf.scaled_qk(q, k), [q, k]),
                "textbook": Provider(lambda: ref.scaled_qk(q, k), [q, k]),
            },
            _f64(ref.scaled_qk, q, k),
            flops=_modes(flops, 2 * flops),
        )

    return BenchConfig(
        "scaled_qk", "scale 1/sqrt(D)", f"q,k{shape_str((b, h, l, d))}", l, "-", make
    )


def masked_softmax_config(b: int, h: int, l: int, scale: float = 0.125) -> BenchConfig:
    """``masked_softmax`` on scores (B,H,L,L) with a (B,1,1,L) bool padding mask, scale fused."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        scores = _rand(g, (b, h, l, l), dtype, device)
        _, mask = _padding(g, b, l, device)
        pre = (scores.detach() * scale).masked_fill(~mask, -math.inf).requires_grad_()
        n = nbytes(scores)
        return Problem(
            {
                "pyformer": Provider(
                    lambda: pf.masked_softmax(scores, mask, scale=scale), [scores]
                ),
                "textbook": Provider(
                    lambda: ref.masked_softmax(scores, mask, scale=scale, zero_masked_rows=False),
                    [scores],
                ),
                "torch": Provider(lambda: F.softmax(pre, dim=-1), [pre]),
            },
            _f64(ref.masked_softmax, scores, mask, scale=scale),
            bytes=_modes(2 * n + nbytes(mask), 3 * n),
        )

    return BenchConfig(
        "masked_softmax",
        f"bool (B,1,1,Lk), scale {scale:.4g}",
        shape_str((b, h, l, l)),
        l,
        "F.softmax",
        make,
    )


def _norm_bytes(x, w, extra_in=(), extra_out=()):
    """Fewest bytes of a (add_)layer_norm: forward reads x, w, b (+residual), writes y (+s);
    backward reads dy (+ds), x, w, writes dx (+dresidual), dw, db. Saved mean/rstd excluded."""
    fwd = nbytes(x, w, w, x, *extra_in, *extra_out)
    bwd = nbytes(x, x, w, x, w, w, *extra_in, *extra_out)
    return _modes(fwd, bwd)


def layer_norm_config(m: int, n: int) -> BenchConfig:
    """``layer_norm`` on x (M,N) with weight and bias."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        x = _rand(g, (m, n), dtype, device)
        w, bias = _rand(g, (n,), dtype, device), _rand(g, (n,), dtype, device)
        leaves = [x, w, bias]
        return Problem(
            {
                "pyformer": Provider(lambda: pf.layer_norm(x, (n,), w, bias), leaves),
                "textbook": Provider(lambda: ref.layer_norm(x, (n,), w, bias), leaves),
                "torch": Provider(lambda: F.layer_norm(x, (n,), w, bias), leaves),
            },
            _f64(ref.layer_norm, x, (n,), w, bias),
            bytes=_norm_bytes(x, w),
        )

    return BenchConfig("layer_norm", "weight+bias", shape_str((m, n)), n, "F.layer_norm", make)


def add_layer_norm_config(m: int, n: int) -> BenchConfig:
    """``add_layer_norm`` on x, residual (M,N) with weight and bias."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        x, r = _rand(g, (m, n), dtype, device), _rand(g, (m, n), dtype, device)
        w, bias = _rand(g, (n,), dtype, device), _rand(g, (n,), dtype, device)
        leaves = [x, r, w, bias]

        def fused():
            s = x + r
            return F.layer_norm(s, (n,), w, bias), s

        return Problem(
            {
                "pyformer": Provider(lambda: pf.add_layer_norm(x, r, (n,), w, bias), leaves),
                "textbook": Provider(lambda: ref.add_layer_norm(x, r, (n,), w, bias), leaves),
                "torch": Provider(fused, leaves),
            },
            _f64(ref.add_layer_norm, x, r, (n,), w, bias),
            bytes=_norm_bytes(x, w, extra_in=(r,), extra_out=(x,)),
        )

    return BenchConfig(
        "add_layer_norm", "weight+bias", shape_str((m, n)), n, "add+F.layer_norm", make
    )


def rms_norm_config(m: int, n: int) -> BenchConfig:
    """``rms_norm`` on x (M,N) with weight, eps=None."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        x, w = _rand(g, (m, n), dtype, device), _rand(g, (n,), dtype, device)
        return Problem(
            {
                "pyformer": Provider(lambda: pf.rms_norm(x, (n,), w), [x, w]),
                "textbook": Provider(lambda: ref.rms_norm(x, (n,), w), [x, w]),
                "torch": Provider(lambda: F.rms_norm(x, (n,), w), [x, w]),
            },
            _f64(ref.rms_norm, x, (n,), w, ref.default_rms_eps(dtype)),
            bytes=_modes(nbytes(x, w, x), nbytes(x, x, w, x, w)),
        )

    return BenchConfig("rms_norm", "weight", shape_str((m, n)), n, "F.rms_norm", make)


def add_rms_norm_config(m: int, n: int) -> BenchConfig:
    """``add_rms_norm`` on x, residual (M,N) with weight."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        x, r = _rand(g, (m, n), dtype, device), _rand(g, (m, n), dtype, device)
        w = _rand(g, (n,), dtype, device)

        def fused():
            s = x + r
            return F.rms_norm(s, (n,), w), s

        return Problem(
            {
                "pyformer": Provider(lambda: pf.add_rms_norm(x, r, (n,), w), [x, r, w]),
                "textbook": Provider(lambda: ref.add_rms_norm(x, r, (n,), w), [x, r, w]),
                "torch": Provider(fused, [x, r, w]),
            },
            _f64(ref.add_rms_norm, x, r, (n,), w, ref.default_rms_eps(dtype)),
            # forward reads x, r, w, writes y, s; backward reads dy, ds, s, w, writes dx, dw
            bytes=_modes(nbytes(x, r, w, x, x), nbytes(x, x, x, w, x, w)),
        )

    return BenchConfig("add_rms_norm", "weight", shape_str((m, n)), n, "add+F.rms_norm", make)


def hf_apply_rotary_pos_emb(q, k, cos, sin):
    """Hugging Face's ``apply_rotary_pos_emb`` (Llama's), the composition users run: the bench's
    baseline and the tests' comparison."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_config(b: int, hq: int, hk: int, l: int, d: int) -> BenchConfig:
    """``apply_rotary`` on q (B,Hq,L,D) and k (B,Hk,L,D), the transposed views of (B,L,H,D)
    projections as in a Hugging Face attention, cos and sin (B,L,D) of the dtype."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        q = _rand(g, (b, l, hq, d), dtype, device, False).transpose(1, 2).requires_grad_()
        k = _rand(g, (b, l, hk, d), dtype, device, False).transpose(1, 2).requires_grad_()
        f = torch.arange(l, device=device, dtype=torch.float32)[:, None] / 10000 ** (
            torch.arange(0, d, 2, device=device, dtype=torch.float32) / d
        )
        emb = torch.cat((f, f), -1)[None].expand(b, l, d)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return Problem(
            {
                "pyformer": Provider(lambda: pf.apply_rotary(q, k, cos, sin), [q, k]),
                "textbook": Provider(lambda: ref.apply_rotary(q, k, cos, sin), [q, k]),
                "torch": Provider(lambda: hf_apply_rotary_pos_emb(q, k, cos, sin), [q, k]),
            },
            _f64(ref.apply_rotary, q, k, cos, sin),
            bytes=_modes(2 * nbytes(q, k) + nbytes(cos, sin), 2 * nbytes(q, k) + nbytes(cos, sin)),
        )

    return BenchConfig(
        "apply_rotary",
        "rotate-half",
        f"q{shape_str((b, hq, l, d))} k{shape_str((b, hk, l, d))}",
        l,
        "HF rotary",
        make,
    )


def swiglu_config(m: int, n: int) -> BenchConfig:
    """``swiglu`` on gate, up (M,N)."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        gate, up = _rand(g, (m, n), dtype, device), _rand(g, (m, n), dtype, device)
        return Problem(
            {
                "pyformer": Provider(lambda: pf.swiglu(gate, up), [gate, up]),
                "textbook": Provider(lambda: ref.swiglu(gate, up), [gate, up]),
                "torch": Provider(lambda: F.silu(gate) * up, [gate, up]),
            },
            _f64(ref.swiglu, gate, up),
            bytes=_modes(3 * nbytes(gate), 5 * nbytes(gate)),
        )

    return BenchConfig("swiglu", "-", shape_str((m, n)), n, "F.silu*up", make)


def attention_config(
    b: int, h: int, l: int, d: int, causal: bool = False, bool_mask: bool = False
) -> BenchConfig:
    """``attention`` on q, k, v (B,H,L,D): with ``key_lengths`` drawn in [L/2, L] (the
    baselines get the equivalent (B,1,1,L) bool mask), with that bool mask for pyformer too
    (``bool_mask``), or causal."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        q, k, v = (_rand(g, (b, h, l, d), dtype, device) for _ in range(3))
        lens, mask = _padding(g, b, l, device)
        flops = 4 * b * h * l * l * d // (2 if causal else 1)
        if causal:
            reference = _f64(ref.attention, q, k, v, causal=True)
            providers = {
                "pyformer": lambda: pf.attention(q, k, v, causal=True),
                "textbook": lambda: ref.attention(q, k, v, causal=True, zero_masked_rows=False),
                "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            }
        else:
            reference = _f64(ref.attention, q, k, v, mask)
            providers = {
                "pyformer": (lambda: pf.attention(q, k, v, mask))
                if bool_mask
                else (lambda: pf.attention(q, k, v, key_lengths=lens)),
                "textbook": lambda: ref.attention(q, k, v, mask, zero_masked_rows=False),
                "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            }
        return Problem(
            {name: Provider(fn, [q, k, v]) for name, fn in providers.items()},
            reference,
            flops=_modes(flops, 2 * flops),
        )

    variant = (
        "causal"
        if causal
        else "bool (B,1,1,Lk) in [L/2,L]"
        if bool_mask
        else "key_lengths in [L/2,L]"
    )
    return BenchConfig("attention", variant, f"q,k,v{shape_str((b, h, l, d))}", l, "F.sdpa", make)


def attention_decode_config(
    b: int, h: int, lq: int, lk: int, d: int, padded: bool = False
) -> BenchConfig:
    """``attention`` of a few queries against a longer cache: q (B,H,Lq,D), k, v (B,H,Lk,D),
    no mask (decode-sized calls, where the per-call cost is most of the time), or with
    ``padded``, cache lengths drawn in [Lk/2, Lk] as ``key_lengths`` (the baselines get the
    equivalent (B,1,1,Lk) bool mask)."""

    def make(dtype, device, g):
        import pyformer.functional as pf
        import pyformer.reference as ref

        q = _rand(g, (b, h, lq, d), dtype, device)
        k, v = (_rand(g, (b, h, lk, d), dtype, device) for _ in range(2))
        lens, mask = _padding(g, b, lk, device) if padded else (None, None)
        flops = 4 * b * h * lq * lk * d
        providers = {
            "pyformer": lambda: pf.attention(q, k, v, key_lengths=lens),
            "textbook": lambda: ref.attention(q, k, v, mask, zero_masked_rows=False),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        }
        return Problem(
            {name: Provider(fn, [q, k, v]) for name, fn in providers.items()},
            _f64(ref.attention, q, k, v, mask),
            flops=_modes(flops, 2 * flops),
            bytes=_modes(nbytes(k, v), 2 * nbytes(k, v)),
        )

    variant = f"decode, {lk} keys" + (", cache lengths in [L/2,L]" if padded else "")
    return BenchConfig("attention", variant, f"q{shape_str((b, h, lq, d))}", lk, "F.sdpa", make)


# ----------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Sweep:
    """A named set of sizes, with how to shape each op at a size on each device."""

    name: str
    seq: Tuple[int, ...]
    hidden: Tuple[int, ...]
    modes: Tuple[str, ...] = MODES
    causal: bool = False  # also time causal attention
    dtypes: Optional[Tuple[str, ...]] = None  # default dtypes (None: the device's default)
    targets: Tuple["Target", ...] = ()  # speed targets checked after the run

    def configs(self, device: str, ops: Sequence[str]) -> List[BenchConfig]:
        shape = _QUICK_SHAPE if self.name == "quick" else _SHAPES[device]
        out = []
        for op in ops:
            for size in self.seq if op in SEQ_OPS else self.hidden:
                out.extend(_config(op, size, shape, self.causal))
        return out


@dataclass(frozen=True)
class _Shape:
    """How a device shapes the sweeps: heads, head dim, batch cap, layer-norm rows."""

    heads: int
    head_dim: int
    max_batch: int
    max_scores: int  # B*H*L*L at most (the batch shrinks for long sequences)
    rows: int  # M of the (M, N) layer norms

    def batch(self, l: int) -> int:
        return max(1, min(self.max_batch, self.max_scores // (self.heads * l * l)))


_SHAPES = {
    "cpu": _Shape(heads=12, head_dim=64, max_batch=8, max_scores=2**25, rows=8192),
    "cuda": _Shape(heads=16, head_dim=64, max_batch=16, max_scores=2**28, rows=16384),
}
_QUICK_SHAPE = _Shape(heads=4, head_dim=32, max_batch=2, max_scores=2**20, rows=512)


def _attention_configs(size: int, s: _Shape, causal: bool) -> List[BenchConfig]:
    b, h, d = s.batch(size), s.heads, s.head_dim
    return [attention_config(b, h, size, d)] + (
        [attention_config(b, h, size, d, causal=True)] if causal else []
    )


# How each op is shaped at one size of a sweep: op name -> (size, device shape, causal) -> configs.
# Every op in OPS has an entry (tests/test_cli.py checks it); an op without one is an error.
SWEEP_CONFIGS: Dict[str, Callable[[int, _Shape, bool], List[BenchConfig]]] = {
    "scaled_qk": lambda size, s, causal: [
        scaled_qk_config(s.batch(size), s.heads, size, s.head_dim)
    ],
    "masked_softmax": lambda size, s, causal: [
        masked_softmax_config(s.batch(size), s.heads, size, scale=1 / math.sqrt(s.head_dim))
    ],
    "layer_norm": lambda size, s, causal: [layer_norm_config(s.rows, size)],
    "add_layer_norm": lambda size, s, causal: [add_layer_norm_config(s.rows, size)],
    "rms_norm": lambda size, s, causal: [rms_norm_config(s.rows, size)],
    "add_rms_norm": lambda size, s, causal: [add_rms_norm_config(s.rows, size)],
    "apply_rotary": lambda size, s, causal: [
        rotary_config(s.batch(size), s.heads, max(1, s.heads // 4), size, s.head_dim)
    ],
    "swiglu": lambda size, s, causal: [swiglu_config(s.rows, size)],
    "attention": _attention_configs,
}


def _config(op: str, size: int, s: _Shape, causal: bool) -> List[BenchConfig]:
    try:
        make = SWEEP_CONFIGS[op]
    except KeyError:
        raise ValueError(
            f"pyformer bench has no configs for op {op!r}; known: {', '.join(SWEEP_CONFIGS)}"
        ) from None
    return make(size, s, causal)


@dataclass(frozen=True)
class Target:
    """A speed target: in the rows of ``op`` whose variant contains ``variant`` (every row of
    the op when empty) and whose mode is ``mode``, pyformer must reach ``at_least`` of
    ``metric``: ``"textbook"`` or ``"torch"`` (speedup over that baseline, x) or ``"copy"``
    (achieved bandwidth, % of the copy bandwidth measured in the same run)."""

    op: str
    mode: str
    metric: str
    at_least: float
    variant: str = ""
    dtype: str = ""  # every dtype when empty

    def label(self) -> str:
        what = {"textbook": "x textbook", "torch": "x torch op", "copy": "% copy"}[self.metric]
        var = f" [{self.variant}]" if self.variant else ""
        return f"{self.op}{var} {self.mode}: >= {self.at_least:g}{what}"

    def matches(self, row) -> bool:
        return (
            row.op == self.op
            and row.mode == self.mode
            and self.variant in row.variant
            and self.dtype in ("", row.dtype)
        )

    def measure(self, row) -> Optional[float]:
        """The row's value of the metric (None when it was not measured)."""
        if self.metric == "copy":
            rate = row.gbps.get("pyformer")
            return 100 * rate / row.copy_gbps if rate and row.copy_gbps else None
        return row.speedup.get(self.metric)


def check_targets(targets: Sequence[Target], rows) -> List[dict]:
    """One verdict per (target, matching row): the measured value and whether it is met.
    A target that no row matches (its op or mode was not run) gives no verdict."""
    out = []
    for t in targets:
        for r in rows:
            if not t.matches(r):
                continue
            v = t.measure(r)
            out.append(
                {
                    "target": t.label(),
                    "shape": r.shape,
                    "dtype": r.dtype,
                    "value": v,
                    "met": v is not None and v >= t.at_least,
                }
            )
    return out


@dataclass(frozen=True)
class FixedSweep(Sweep):
    """A sweep of fixed configs (a set of speed targets, exactly), each with its own modes."""

    make_configs: Callable[[], List[BenchConfig]] = list

    def configs(self, device: str, ops: Sequence[str]) -> List[BenchConfig]:
        return [c for c in self.make_configs() if c.op in ops]


def _with_modes(cfg: BenchConfig, *modes: str) -> BenchConfig:
    return dataclasses.replace(cfg, modes=modes)


def _cpu_target_configs() -> List[BenchConfig]:
    """The three CPU speed targets, exactly: float32, forward."""
    return [
        masked_softmax_config(8, 12, 512, scale=1 / 8),
        layer_norm_config(8192, 1024),
        attention_config(8, 12, 512, 64),
    ]


def _cpu_flash_configs() -> List[BenchConfig]:
    """Flash attention on the CPU against torch's SDPA (its fused CPU kernel) at growing
    lengths, float32: causal prefill (B=1, H=8, D=64) forward and forward+backward, padding as
    key_lengths, and decode (one query against a long cache)."""
    out = []
    for l in (512, 1024, 2048, 4096):
        out.append(attention_config(1, 8, l, 64, causal=True))
    out.append(_with_modes(attention_config(2, 8, 2048, 64), "forward", "both"))
    for lk in (4096, 16384):
        out.append(_with_modes(attention_decode_config(1, 8, 1, lk, 64), "forward"))
    return out


def _flash_target_configs() -> List[BenchConfig]:
    """The speed targets of flash attention on the CPU against torch's SDPA, exactly: causal
    (1,8,4096,64) forward and forward+backward in float32 and bfloat16 (bfloat16's target is the
    forward's); (8,12,512,64) with key_lengths in [L/2, L] forward and forward+backward; decode,
    q (8,32,1,128) against a (8,32,4096,128) cache whose lengths are key_lengths."""
    return [
        dataclasses.replace(
            attention_config(1, 8, 4096, 64, causal=True),
            modes=("forward", "both"),
            dtypes=("float32", "bfloat16"),
        ),
        _with_modes(attention_config(8, 12, 512, 64), "forward", "both"),
        _with_modes(attention_decode_config(8, 32, 1, 4096, 128, padded=True), "forward"),
    ]


def _block_target_configs() -> List[BenchConfig]:
    """The speed targets of the block ops, exactly (float32): rms_norm (8192,4096) forward and
    backward, add_rms_norm forward, apply_rotary on Llama-7B-like q (4,32,2048,128) and k
    (4,8,2048,128) forward and backward, swiglu (8192,11008) forward and backward."""
    return [
        _with_modes(rms_norm_config(8192, 4096), "forward", "backward"),
        _with_modes(add_rms_norm_config(8192, 4096), "forward"),
        _with_modes(rotary_config(4, 32, 8, 2048, 128), "forward", "backward"),
        _with_modes(swiglu_config(8192, 11008), "forward", "backward"),
    ]


def _gpu_target_configs() -> List[BenchConfig]:
    """The GPU speed targets, exactly (bf16 and fp16): masked_softmax forward on scores
    (8,16,2048,2048) with a padding mask; layer_norm (32768,4096) forward and backward;
    attention (8,16,1024,64) with a padding mask, forward+backward, as key_lengths and as the
    (B,1,1,Lk) bool mask (F.sdpa gets the same bool mask)."""
    return [
        _with_modes(masked_softmax_config(8, 16, 2048, scale=1 / 8), "forward"),
        _with_modes(layer_norm_config(32768, 4096), "forward", "backward"),
        _with_modes(attention_config(8, 16, 1024, 64), "both"),
        _with_modes(attention_config(8, 16, 1024, 64, bool_mask=True), "both"),
    ]


def _per_call_configs() -> List[BenchConfig]:
    """Tiny shapes, where a call's fixed cost (Python, dispatch, allocation) is the time: the
    forward without autograd and forward+backward with it."""
    return [
        layer_norm_config(4, 128),
        add_layer_norm_config(4, 128),
        rms_norm_config(4, 128),
        add_rms_norm_config(4, 128),
        rotary_config(4, 4, 2, 1, 32),
        swiglu_config(4, 128),
        masked_softmax_config(4, 4, 16),
        scaled_qk_config(4, 4, 16, 32),
        attention_decode_config(4, 4, 1, 16, 32),
    ]


SWEEPS = {
    "quick": Sweep("quick", seq=(64, 128), hidden=(256, 1024)),
    "cpu": Sweep("cpu", seq=(128, 256, 512, 1024), hidden=(768, 1024, 2048, 4096)),
    "gpu": Sweep(
        "gpu",
        seq=(128, 256, 512, 1024, 2048, 4096, 8192),
        hidden=(768, 1024, 2048, 4096, 8192),
        causal=True,
    ),
    "cpu-targets": FixedSweep(
        "cpu-targets",
        (),
        (),
        make_configs=_cpu_target_configs,
        modes=("forward",),
        dtypes=("float32",),
        targets=(
            Target("masked_softmax", "forward", "textbook", 2.0),
            Target("layer_norm", "forward", "torch", 1.0),
            Target("attention", "forward", "textbook", 2.0),
        ),
    ),
    "per-call": FixedSweep(
        "per-call",
        (),
        (),
        make_configs=_per_call_configs,
        modes=("forward", "both"),
        dtypes=("float32",),
        targets=tuple(
            Target(op, mode, "torch", 1 / 1.5)
            for op in (
                "layer_norm",
                "add_layer_norm",
                "rms_norm",
                "add_rms_norm",
                "apply_rotary",
                "swiglu",
                "masked_softmax",
                "attention",
            )
            for mode in ("forward", "both")
        ),
    ),
    "cpu-flash": FixedSweep(
        "cpu-flash",
        (),
        (),
        make_configs=_cpu_flash_configs,
        modes=("forward", "both"),
        dtypes=("float32",),
        targets=(
            Target("attention", "forward", "torch", 1.0),
            Target("attention", "both", "torch", 1.0),
        ),
    ),
    "flash-targets": FixedSweep(
        "flash-targets",
        (),
        (),
        make_configs=_flash_target_configs,
        dtypes=("float32",),
        targets=(
            Target("attention", "forward", "torch", 1.1, "causal", "float32"),
            Target("attention", "both", "torch", 1.0, "causal", "float32"),
            Target("attention", "forward", "torch", 1.0, "causal", "bfloat16"),
            Target("attention", "forward", "torch", 1.2, "key_lengths in [L/2,L]", "float32"),
            Target("attention", "both", "torch", 1.2, "key_lengths in [L/2,L]", "float32"),
            Target("attention", "forward", "torch", 1.2, "decode", "float32"),
        ),
    ),
    "block-targets": FixedSweep(
        "block-targets",
        (),
        (),
        make_configs=_block_target_configs,
        dtypes=("float32",),
        targets=(
            Target("rms_norm", "forward", "torch", 2.0),
            Target("rms_norm", "forward", "copy", 85.0),
            Target("rms_norm", "backward", "torch", 2.0),
            Target("add_rms_norm", "forward", "torch", 2.5),
            Target("apply_rotary", "forward", "torch", 3.0),
            Target("apply_rotary", "backward", "torch", 3.0),
            Target("swiglu", "forward", "torch", 1.5),
            Target("swiglu", "backward", "torch", 1.5),
        ),
    ),
    "gpu-targets": FixedSweep(
        "gpu-targets",
        (),
        (),
        make_configs=_gpu_target_configs,
        dtypes=("bfloat16", "float16"),
        targets=(
            Target("masked_softmax", "forward", "copy", 85.0),
            Target("masked_softmax", "forward", "textbook", 2.5),
            Target("layer_norm", "forward", "copy", 85.0),
            Target("layer_norm", "forward", "torch", 1.2),
            Target("layer_norm", "backward", "torch", 1.0),
            Target("attention", "both", "textbook", 2.0),
        ),
    ),
}


def parse_sizes(value: Optional[str], quick: bool, device: str) -> Sweep:
    """The sweep for ``--sizes``: a name in :data:`SWEEPS`, ``default`` (``gpu`` on CUDA,
    ``cpu`` on the CPU, ``quick`` with ``--quick``), or a comma-separated list of sizes used as
    both the sequence lengths and the hidden sizes (shaped like the device's sweep, or like the
    quick sweep with ``--quick``)."""
    if value in (None, "default"):
        return SWEEPS["quick" if quick else ("gpu" if device == "cuda" else "cpu")]
    if value in SWEEPS:
        return SWEEPS[value]
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(
            f"expected one of {', '.join(['default', *SWEEPS])} or positive integers "
            f"separated by commas, got {value!r}",
            param_hint="--sizes",
        )
    return Sweep("quick" if quick else "custom", seq=sizes, hidden=sizes)
