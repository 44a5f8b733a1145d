// scaled_qk on the CPU: scores = scale * q @ k^T, forward and backward.
//
//   q (..., Lq, D), k (..., Lk, D) -> scores (..., Lq, Lk); leading dims flattened to N.
// Algorithm: one batched GEMM, at::baddbmm with beta = 0 and alpha = scale, so the scale is
// applied inside the GEMM's epilogue rather than as a second pass over the scores.
// Napkin math: 2 * N * Lq * Lk * D flops; the scores (N * Lq * Lk elements) are written once.
// Backward: dq = scale * dS @ k and dk = scale * dS^T @ q, two more GEMMs with alpha = scale.
#include <torch/library.h>

#include "../pyformer.h"
#include "memory.h"

namespace pyformer::cpu {

namespace {
// (..., L, D) -> (N, L, D), a view where possible.
at::Tensor as_3d(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d < t.dim() - 2; ++d) n *= t.size(d);
  return t.reshape({n, t.size(-2), t.size(-1)});
}

// alpha * a @ b, batched over dim 0, without a separate scaling pass.
at::Tensor scaled_bmm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::Tensor out = empty_output({a.size(0), a.size(1), b.size(2)}, a.options());
  return at::baddbmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
}
}  // namespace

at::Tensor scaled_qk_cpu(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_scaled_qk(q, k, scale);
  const BelowAutograd below_autograd;
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = k.size(-2);
  return scaled_bmm(as_3d(q), as_3d(k).transpose(1, 2), scale).view(shape);
}

std::tuple<at::Tensor, at::Tensor> scaled_qk_backward_cpu(const at::Tensor& grad,
                                                          const at::Tensor& q,
                                                          const at::Tensor& k, double scale) {
  check_scaled_qk_backward(grad, q, k);
  const BelowAutograd below_autograd;
  const at::Tensor g = as_3d(grad);
  at::Tensor dq = scaled_bmm(g, as_3d(k), scale).view(q.sizes());
  at::Tensor dk = scaled_bmm(g.transpose(1, 2), as_3d(q), scale).view(k.sizes());
  return {dq, dk};
}

TORCH_LIBRARY_IMPL(pyformer, CPU, m) {
  m.impl("scaled_qk", &scaled_qk_cpu);
  m.impl("scaled_qk_backward", &scaled_qk_backward_cpu);
}

}  // namespace pyformer::cpu
