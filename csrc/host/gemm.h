// The host's batched GEMM with a scale, shared by the compositions of scaled_qk and attention.
#pragma once

#include <ATen/ATen.h>

namespace pyformer::host {

// out = alpha * a @ b, batched over dim 0 (out preallocated, any contents). One GEMM with alpha
// (at::baddbmm_out, beta = 0: no second pass over out), except at alpha == 0: GEMMs skip the
// product there and some leave out unwritten when beta is 0 too (garbage in bfloat16 on the
// CPU), while the contract's value is alpha times the product (0, or NaN where the product is
// inf or NaN), so that case is the product, then a multiply.
inline void scaled_bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                           double alpha) {
  if (alpha == 0) {
    at::bmm_out(out, a, b);
    out.mul_(alpha);
    return;
  }
  at::baddbmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
}

}  // namespace pyformer::host
