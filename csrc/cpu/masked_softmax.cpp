// masked_softmax on the CPU: forward and backward.
//
//   scores (..., Lq, Lk) -> probs (..., Lq, Lk) = softmax(scale * scores + M, dim=-1)
//   M from: mask (bool, True = may attend, or additive float), broadcastable to scores and read
//   through its broadcast strides; causal (key j <= query i); key_lengths (B,) (key j < len[b]).
//
// Algorithm: rows are split across threads (at::parallel_for); each row is one call of
// masked_softmax_row (softmax_row.h): scale and mask into a per-thread float buffer, max, exp and
// sum, normalize. Keys past min(Lk, i + 1 if causal, len[b]) are not read and written as 0.
// Napkin math: 4 bytes read + 4 written per float32 score, ~10 flops and one exp per score; at
// (8, 12, 512, 512) that is 100 MB each way, against the textbook composition's four passes
// (divide, masked_fill, softmax read+write, plus the mask) of ~500 MB.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../pyformer.h"
#include "memory.h"
#include "softmax_row.h"

namespace pyformer::cpu {

// Runs the fused row kernel over every row of `scores` into `out` (both contiguous (..., Lk)).
template <typename scalar_t>
void masked_softmax_rows(const at::Tensor& scores, const at::Tensor& out, const at::Tensor* mask,
                         double scale, bool causal, const at::Tensor* key_lengths) {
  using acc_t = acc_type<scalar_t>;
  const int64_t lk = scores.size(-1);
  const int64_t rows = lk == 0 ? 0 : scores.numel() / lk;
  if (rows == 0) return;
  at::Tensor m;  // the mask as a stride-0 broadcast view: no copy
  if (mask) m = mask_for_kernel(*mask, scores).expand(scores.sizes());
  const RowIndex idx(scores, mask ? &m : nullptr);
  const bool* mb = (mask && m.scalar_type() == at::kBool) ? m.data_ptr<bool>() : nullptr;
  const scalar_t* mf = (mask && !mb) ? m.data_ptr<scalar_t>() : nullptr;
  const int64_t mstride = mask ? m.stride(-1) : 1;
  at::Tensor kl;
  if (key_lengths) kl = key_lengths->to(at::kLong).contiguous();
  const int64_t* lens = key_lengths ? kl.data_ptr<int64_t>() : nullptr;
  const scalar_t* x = scores.data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(lk, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end_row) {
    std::vector<acc_t> buf(lk);
    for (int64_t r = begin; r < end_row; ++r) {
      int64_t end = lk;
      if (causal) end = std::min(end, idx.query(r) + 1);
      if (lens) end = std::min(end, lens[idx.batch(r)]);
      RowMask<scalar_t> rm;
      if (mask) {
        const int64_t off = idx.mask_offset(r);
        rm.b = mb ? mb + off : nullptr;
        rm.f = mf ? mf + off : nullptr;
        rm.stride = mstride;
      }
      masked_softmax_row<scalar_t>(x + r * lk, y + r * lk, lk, end, static_cast<acc_t>(scale), rm,
                                   buf.data());
    }
  });
}

template void masked_softmax_rows<float>(const at::Tensor&, const at::Tensor&, const at::Tensor*, double, bool, const at::Tensor*);
template void masked_softmax_rows<double>(const at::Tensor&, const at::Tensor&, const at::Tensor*, double, bool, const at::Tensor*);
template void masked_softmax_rows<at::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor*, double, bool, const at::Tensor*);
template void masked_softmax_rows<at::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor*, double, bool, const at::Tensor*);

at::Tensor masked_softmax_cpu(const at::Tensor& scores_, const std::optional<at::Tensor>& mask,
                              double scale, bool causal,
                              const std::optional<at::Tensor>& key_lengths) {
  check_masked_softmax(scores_, mask, scale, causal, key_lengths);
  const BelowAutograd below_autograd;
  const at::Tensor scores = scores_.contiguous();
  at::Tensor out = empty_output_like(scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax_cpu", [&] {
    masked_softmax_rows<scalar_t>(scores, out, mask ? &*mask : nullptr, scale, causal,
                                  key_lengths ? &*key_lengths : nullptr);
  });
  return out;
}

// dscores = scale * y * (dy - sum(dy * y, -1)), one row per task, from the saved output alone.
at::Tensor masked_softmax_backward_cpu(const at::Tensor& grad_, const at::Tensor& out_, double scale) {
  check_masked_softmax_backward(grad_, out_);
  const BelowAutograd below_autograd;
  const at::Tensor grad = grad_.contiguous(), out = out_.contiguous();
  at::Tensor dx = empty_output_like(out);
  const int64_t lk = out.dim() == 0 ? 1 : out.size(-1);
  const int64_t rows = lk == 0 ? 0 : out.numel() / lk;
  if (rows == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "masked_softmax_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* y = out.data_ptr<scalar_t>();
    scalar_t* d = dx.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / lk);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        masked_softmax_backward_row<scalar_t>(g + r * lk, y + r * lk, d + r * lk, lk, static_cast<acc_t>(scale));
    });
  });
  return dx;
}

TORCH_LIBRARY_IMPL(pyformer, CPU, m) {
  m.impl("masked_softmax", &masked_softmax_cpu);
  m.impl("masked_softmax_backward", &masked_softmax_backward_cpu);
}

}  // namespace pyformer::cpu
