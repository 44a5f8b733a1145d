// apply_rotary: host entry (both devices) and autograd.
//
//   (q_rot, k_rot) = (q cos + rotate(q) sin, k cos + rotate(k) sin) on the first Dr dims of each
//   head (the rest passes through), cos and sin (Bc, L, Dr) broadcast over heads (docs/ops.md);
//   rotate(x) = (-x2, x1) on the pairs: rotate-half (x[i], x[i + Dr/2]) or interleaved (x[2i],
//   x[2i + 1]).
//   backward (apply_rotary_backward): dx = g cos + rotate^T(g sin), the same kernel transposed;
//   cos and sin get gradients (from ATen ops here) only where they require them.
//
// The host checks, keeps q's and k's layout (a (B, L, H, D) projection seen as (B, H, L, D) stays
// as it is, read and written in place of a copy; only a D that is not unit-stride is copied), gives
// the outputs the inputs' strides, converts cos and sin to the accumulation type (they are small)
// and calls the device's kernel once for q and k.
#include "../kernels.h"
#include "../memory.h"
#include "autograd.h"

namespace pyformer::host {
namespace {

// x as the kernel takes it: unit stride along D.
at::Tensor unit_last(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// (B or 1, L, Dr) in the accumulation type, contiguous; a 2-dim (L, Dr) gains the leading 1.
at::Tensor coefficients(const at::Tensor& t, at::ScalarType acc) {
  const at::Tensor t3 = t.dim() == 2 ? t.unsqueeze(0) : t;
  return t3.to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor> rotate(const at::Tensor& q_, const at::Tensor& k_,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          bool interleaved, bool transpose) {
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q_.device());
  const at::Tensor q = unit_last(q_), k = unit_last(k_);
  // empty_like keeps the strides of a dense, non-overlapping input (contiguous otherwise)
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  advise_huge_pages(q_out);
  advise_huge_pages(k_out);
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  const at::ScalarType acc = stat_dtype(q.scalar_type());
  kernels::rotary.require(q.device())(q, k, q_out, k_out, coefficients(cos, acc),
                                      coefficients(sin, acc), interleaved, transpose);
  return {q_out, k_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rotary(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                bool interleaved) {
  check_rotary(q, k, cos, sin);
  return rotate(q, k, cos, sin, interleaved, /*transpose=*/false);
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_backward(const at::Tensor& grad_q,
                                                         const at::Tensor& grad_k,
                                                         const at::Tensor& cos,
                                                         const at::Tensor& sin, bool interleaved) {
  check_rotary(grad_q, grad_k, cos, sin, "apply_rotary_backward");
  return rotate(grad_q, grad_k, cos, sin, interleaved, /*transpose=*/true);
}

// ---- autograd -----------------------------------------------------------------------------------

using RotarySig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, bool);
PYFORMER_OP_HANDLE(apply_rotary, RotarySig)
PYFORMER_OP_HANDLE(apply_rotary_backward, RotarySig)

namespace {

// rotate(x) on the first Dr dims of x's last dim (x has exactly Dr there): (-x2, x1) per pair.
at::Tensor rotate_pairs(const at::Tensor& x, bool interleaved) {
  if (interleaved) {
    const at::Tensor p = x.unflatten(-1, {-1, 2});
    return at::stack({-p.select(-1, 1), p.select(-1, 0)}, -1).flatten(-2);
  }
  const auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// The (B or 1, L, Dr) coefficients broadcast over heads: (Bc, 1, L, Dr).
at::Tensor per_head(const at::Tensor& c) {
  return (c.dim() == 2 ? c.unsqueeze(0) : c).unsqueeze(1);
}

// x's gradient in differentiable ATen ops (creating_graph): g cos + rotate^T(g sin), with
// rotate^T = -rotate, on the first Dr dims; the rest passes g through.
at::Tensor differentiable_rotary_backward(const at::Tensor& g, const at::Tensor& cos,
                                          const at::Tensor& sin, bool interleaved) {
  const int64_t dr = cos.size(-1);
  const at::ScalarType acc = stat_dtype(g.scalar_type());
  const at::Tensor gr = g.narrow(-1, 0, dr).to(acc);
  const at::Tensor c = per_head(cos).to(acc), s = per_head(sin).to(acc);
  const at::Tensor d = gr * c - rotate_pairs(gr * s, interleaved);
  const at::Tensor out =
      dr == g.size(-1) ? d : at::cat({d, g.narrow(-1, dr, g.size(-1) - dr).to(acc)}, -1);
  return out.to(g.scalar_type());
}

// The gradient of cos (sin: with rotate(x) in place of x) from both outputs: sum over heads (and
// over the batch where cos is broadcast along it) of g * x on the first Dr dims, in cos's shape.
at::Tensor coefficient_grad(const at::Tensor& cos, const at::Tensor& gq, const at::Tensor& q,
                            const at::Tensor& gk, const at::Tensor& k, bool rotated,
                            bool interleaved) {
  const int64_t dr = cos.size(-1);
  const at::ScalarType acc = stat_dtype(q.scalar_type());
  auto term = [&](const at::Tensor& g, const at::Tensor& x) {
    at::Tensor xr = x.narrow(-1, 0, dr).to(acc);
    if (rotated) xr = rotate_pairs(xr, interleaved);
    return (g.narrow(-1, 0, dr).to(acc) * xr).sum(1);  // over heads: (B, L, Dr)
  };
  at::Tensor d = term(gq, q) + term(gk, k);
  if (cos.dim() == 2) return d.sum(0).to(cos.scalar_type());
  if (cos.size(0) == 1 && d.size(0) != 1) d = d.sum(0, /*keepdim=*/true);
  return d.to(cos.scalar_type());
}

}  // namespace

struct RotaryFunction : torch::autograd::Function<RotaryFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
    at::Tensor q_rot, k_rot;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(q_rot, k_rot) = apply_rotary_op().call(q, k, cos, sin, interleaved);
    }
    ctx->saved_data["interleaved"] = interleaved;
    // q and k are kept only when cos or sin need a gradient (the usual buffers do not)
    const bool coeff_grad = cos.requires_grad() || sin.requires_grad();
    ctx->save_for_backward(
        {cos, sin, coeff_grad ? q : at::Tensor(), coeff_grad ? k : at::Tensor()});
    return {q_rot, k_rot};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &cos = saved[0], &sin = saved[1];
    const bool interleaved = ctx->saved_data["interleaved"].toBool();
    at::Tensor dq, dk, dcos, dsin;
    if (creating_graph()) {
      dq = differentiable_rotary_backward(grads[0], cos, sin, interleaved);
      dk = differentiable_rotary_backward(grads[1], cos, sin, interleaved);
    } else {
      std::tie(dq, dk) = apply_rotary_backward_op().call(grads[0], grads[1], cos, sin, interleaved);
    }
    if (saved[2].defined()) {
      if (cos.requires_grad())
        dcos = coefficient_grad(cos, grads[0], saved[2], grads[1], saved[3], false, interleaved);
      if (sin.requires_grad())
        dsin = coefficient_grad(sin, grads[0], saved[2], grads[1], saved[3], true, interleaved);
    }
    return {dq, dk, dcos, dsin, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> apply_rotary_autograd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos,
                                                         const at::Tensor& sin, bool interleaved) {
  if (!recording(q, k, cos, sin)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return apply_rotary_op().call(q, k, cos, sin, interleaved);
  }
  const variable_list r = RotaryFunction::apply(q, k, cos, sin, interleaved);
  return {r[0], r[1]};
}

static void register_host(torch::Library& m) {
  m.impl("apply_rotary", &apply_rotary);
  m.impl("apply_rotary_backward", &apply_rotary_backward);
}
TORCH_LIBRARY_IMPL(pyformer, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, CUDA, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, Autograd, m) {
  m.impl("apply_rotary", &apply_rotary_autograd);
  register_no_double_backward(m, "apply_rotary_backward");
}

}  // namespace pyformer::host

namespace pyformer::kernels {
PYFORMER_DEFINE_SLOT(Rotary, rotary, "apply_rotary");
}  // namespace pyformer::kernels
