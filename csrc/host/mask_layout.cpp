// The host side of every mask: from the user's mask / causal / key_lengths to the MaskLayout
// (csrc/mask_layout.h) that the CPU and CUDA masked-softmax kernels read.
#include "../pyformer.h"

namespace pyformer {
namespace {

// The float mask in `dtype`, the scores' accumulation type: the mask is added in float32 for
// half scores, as the reference adds it (a float32 -7e4 stays finite; rounded to float16 it
// would be -inf and mask the key). Only its distinct values are converted (a dim broadcast by
// stride 0, an expand(), is narrowed to size 1 first; the layout broadcasts it again by index).
// A bool mask, or one already in `dtype`, is returned as is.
at::Tensor mask_in_dtype(const at::Tensor& mask, at::ScalarType dtype) {
  if (mask.scalar_type() == at::kBool || mask.scalar_type() == dtype) return mask;
  at::Tensor m = mask;
  for (int64_t d = 0; d < m.dim(); ++d) {
    if (m.stride(d) == 0 && m.size(d) > 1) m = m.narrow(d, 0, 1);
  }
  return m.to(dtype);
}

// The mask's strides over the scores' leading dims, merged where linear; false when more than
// kMaxMaskDims dims remain.
bool merge_dims(MaskLayout& p, at::IntArrayRef sizes, const at::Tensor& m) {
  const int64_t sdim = static_cast<int64_t>(sizes.size()), mdim = m.dim();
  // dims aligned from the right; size-1 mask dims broadcast (stride 0)
  auto mstride = [&](int64_t sd) -> int64_t {
    const int64_t md = sd - (sdim - mdim);
    return md < 0 || m.size(md) == 1 ? 0 : m.stride(md);
  };
  p.nlead = 0;
  p.mlast = mstride(sdim - 1);
  for (int64_t sd = 0; sd + 1 < sdim; ++sd) {
    const int64_t n = sizes[sd], st = mstride(sd);
    if (n == 1) continue;
    if (p.nlead > 0 && p.mstride[p.nlead - 1] == st * n) {  // linear across both: one dim
      p.size[p.nlead - 1] *= n;
      p.mstride[p.nlead - 1] = st;
      continue;
    }
    if (p.nlead == kMaxMaskDims) return false;
    p.size[p.nlead] = n;
    p.mstride[p.nlead] = st;
    ++p.nlead;
  }
  return true;
}

}  // namespace

MaskArgs make_mask_args(at::IntArrayRef sizes, at::ScalarType dtype,
                        const std::optional<at::Tensor>& mask, int64_t causal,
                        const std::optional<at::Tensor>& key_lengths) {
  MaskArgs a;
  MaskLayout& p = a.layout;
  const int64_t sdim = static_cast<int64_t>(sizes.size());
  if (mask.has_value() && mask->defined()) {
    a.mask = mask_in_dtype(*mask, stat_dtype(dtype));
    if (!merge_dims(p, sizes, a.mask)) {
      // strides that do not merge: a contiguous copy of the unexpanded mask merges its
      // broadcast and dense runs; failing that, the expanded copy is one dim
      a.mask = a.mask.contiguous();
      if (!merge_dims(p, sizes, a.mask)) {
        a.mask = a.mask.expand(sizes).contiguous();
        merge_dims(p, sizes, a.mask);
      }
    }
    p.data = a.mask.const_data_ptr();
    p.kind = a.mask.scalar_type() == at::kBool ? 1 : 2;
  }
  p.causal = causal != 0;
  p.lq = sdim >= 2 && sizes[sdim - 2] > 0 ? sizes[sdim - 2] : 1;
  if (causal == 2 && sdim >= 2) p.causal_offset = sizes[sdim - 1] - sizes[sdim - 2];
  if (key_lengths.has_value() && key_lengths->defined()) {
    a.key_lengths = key_lengths->to(at::kLong).contiguous();
    p.klen = a.key_lengths.const_data_ptr<int64_t>();
    int64_t rows_per_batch = 1;
    for (int64_t d = 1; d + 1 < sdim; ++d) rows_per_batch *= sizes[d];
    p.rows_per_batch = rows_per_batch > 0 ? rows_per_batch : 1;
  }
  return a;
}

}  // namespace pyformer
