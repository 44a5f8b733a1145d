// masked_softmax on the CPU: the row kernels behind kernels::masked_softmax_fwd / _bwd.
//
//   x (rows, Lk) -> y (rows, Lk) = softmax(scale * x + M, dim=-1), M from the MaskLayout
//   (csrc/mask_layout.h): a bool or additive mask read through its broadcast strides, and the
//   per-row limit of causal / key_lengths (keys past it are not read and written as 0).
//
// Algorithm: rows are split across threads (at::parallel_for); each row is one call of
// masked_softmax_row (softmax_row.h): scale and mask into a per-thread float buffer, max, exp and
// sum, normalize. Backward: dx = scale * y * (dy - sum(dy * y)) per row, from the output alone.
// Napkin math: 4 bytes read + 4 written per float32 score, ~10 flops and one exp per score; at
// (8, 12, 512, 512) that is 100 MB each way, against the textbook composition's four passes
// (divide, masked_fill, softmax read+write, plus the mask) of ~500 MB.
#include <ATen/Parallel.h>

#include <vector>

#include "../kernels.h"
#include "softmax_row.h"

namespace pyformer::cpu {
namespace {

template <typename scalar_t>
void softmax_rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t lk, double scale,
                  const MaskLayout& m) {
  using acc_t = acc_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(lk, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end_row) {
    std::vector<acc_t> buf(lk);
    for (int64_t r = begin; r < end_row; ++r) {
      masked_softmax_row<scalar_t>(x + r * lk, y + r * lk, lk, m.limit(r, lk),
                                   static_cast<acc_t>(scale), row_mask<scalar_t>(m, r), buf.data());
    }
  });
}

void masked_softmax_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const MaskLayout& mask,
                            double scale) {
  const int64_t lk = x.size(-1), rows = x.numel() / lk;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "masked_softmax_cpu", [&] {
        softmax_rows<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows,
                               lk, scale, mask);
      });
}

void masked_softmax_bwd_cpu(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& dx,
                            double scale) {
  const int64_t lk = y.size(-1), rows = y.numel() / lk;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "masked_softmax_backward_cpu", [&] {
        using acc_t = acc_type<scalar_t>;
        const scalar_t* g = dy.const_data_ptr<scalar_t>();
        const scalar_t* p = y.const_data_ptr<scalar_t>();
        scalar_t* d = dx.mutable_data_ptr<scalar_t>();
        const int64_t grain = std::max<int64_t>(1, 32768 / lk);
        at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r)
            masked_softmax_backward_row<scalar_t>(g + r * lk, p + r * lk, d + r * lk, lk,
                                                  static_cast<acc_t>(scale));
        });
      });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(masked_softmax_fwd, CPU, &masked_softmax_fwd_cpu);
PYFORMER_REGISTER_KERNEL(masked_softmax_bwd, CPU, &masked_softmax_bwd_cpu);

}  // namespace pyformer::cpu
