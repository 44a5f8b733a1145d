// scaled_qk: host entry (both devices) and autograd.
//
//   scores = scale * q @ k^T: q (..., Lq, D), k (..., Lk, D) -> (..., Lq, Lk) (docs/ops.md)
//   backward (scaled_qk_backward): dq = scale * grad @ k, dk = scale * grad^T @ q
//
// The leading dims are flattened to one batch dim N. Forward: the device's own kernel where it has
// one (CUDA: tiled tensor-core WMMA for half types, SIMT otherwise), else one batched BLAS GEMM
// with the scale as alpha (scaled_bmm_out in gemm.h: no second pass over the scores). Napkin
// math: 2 * N * Lq * Lk * D flops; the scores are written once. Backward: two more GEMMs with
// alpha = scale, on every device.
#include "../kernels.h"
#include "../memory.h"
#include "autograd.h"
#include "gemm.h"

namespace pyformer::host {
namespace {

// (..., L, D) -> (N, L, D), a view where possible; sizes spelled out (reshape cannot infer a -1
// from an empty tensor).
at::Tensor as_3d(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d < t.dim() - 2; ++d) n *= t.size(d);
  return t.reshape({n, t.size(-2), t.size(-1)});
}

// alpha * a @ b, batched over dim 0, into a fresh output.
at::Tensor scaled_bmm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::Tensor out = empty_output({a.size(0), a.size(1), b.size(2)}, a.options());
  scaled_bmm_out(out, a, b, alpha);
  return out;
}

}  // namespace

at::Tensor scaled_qk(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale_) {
  check_scaled_qk(q, k, scale_.value_or(1.0));
  const double scale = resolve_scale(q, scale_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q.device());
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = k.size(-2);
  const at::Tensor q3 = as_3d(q), k3 = as_3d(k);
  if (const auto kernel = kernels::scaled_qk_fwd(q.device())) {
    at::Tensor out = empty_output({q3.size(0), q3.size(1), k3.size(1)}, q.options());
    if (out.numel() > 0) {
      if (q3.size(2) == 0)
        out.zero_();
      else
        kernel(q3.contiguous(), k3.contiguous(), out, scale);
    }
    return out.view(shape);
  }
  return scaled_bmm(q3, k3.transpose(1, 2), scale).view(shape);
}

std::tuple<at::Tensor, at::Tensor> scaled_qk_backward(const at::Tensor& grad, const at::Tensor& q,
                                                      const at::Tensor& k, double scale) {
  check_scaled_qk_backward(grad, q, k);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q.device());
  const at::Tensor g = as_3d(grad);
  at::Tensor dq = scaled_bmm(g, as_3d(k), scale).view(q.sizes());
  at::Tensor dk = scaled_bmm(g.transpose(1, 2), as_3d(q), scale).view(k.sizes());
  return {dq, dk};
}

// ---- autograd -----------------------------------------------------------------------------------

using ScaledQkSig = at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<double>);
using ScaledQkBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, double);
PYFORMER_OP_HANDLE(scaled_qk, ScaledQkSig)
PYFORMER_OP_HANDLE(scaled_qk_backward, ScaledQkBwdSig)

struct ScaledQkFunction : torch::autograd::Function<ScaledQkFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            std::optional<double> scale) {
    at::Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      out = scaled_qk_op().call(q, k, scale);
    }
    ctx->saved_data["scale"] = save_scale(scale);
    ctx->save_for_backward({q, k});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const double scale = saved_scale(ctx->saved_data["scale"], saved[0]);
    if (creating_graph()) {  // differentiable: the same two products in ATen ops
      const at::Tensor& g = grads[0];
      return {at::matmul(g, saved[1]).mul(scale),
              at::matmul(g.transpose(-2, -1), saved[0]).mul(scale), at::Tensor()};
    }
    auto [dq, dk] = scaled_qk_backward_op().call(grads[0], saved[0], saved[1], scale);
    return {dq, dk, at::Tensor()};
  }
};

at::Tensor scaled_qk_autograd(const at::Tensor& q, const at::Tensor& k,
                              std::optional<double> scale) {
  if (!recording(q, k)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return scaled_qk_op().call(q, k, scale);
  }
  return ScaledQkFunction::apply(q, k, scale);
}

static void register_host(torch::Library& m) {
  m.impl("scaled_qk", &scaled_qk);
  m.impl("scaled_qk_backward", &scaled_qk_backward);
}
TORCH_LIBRARY_IMPL(pyformer, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, CUDA, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, Autograd, m) {
  m.impl("scaled_qk", &scaled_qk_autograd);
  register_no_double_backward(m, "scaled_qk_backward");
}

}  // namespace pyformer::host

namespace pyformer::kernels {
PYFORMER_DEFINE_SLOT(ScaledQkFwd, scaled_qk_fwd, "scaled_qk forward");
}  // namespace pyformer::kernels
