// pyformer: the one host-side description of a mask that every masked-softmax kernel reads, on
// the CPU and on CUDA (passed by value to CUDA kernels).
//
// A row is one query's scores: rows are the scores (..., Lq, Lk) flattened to (rows, Lk). What is
// masked in row r, key j (docs/ops.md): the bool mask (True = may attend) or the additive float
// mask (a -inf entry counts as masked), read through its broadcast strides and never expanded;
// `causal` (key j allowed only where j <= i + causal_offset, i = r % lq: offset 0 is top-left
// alignment, Lk - Lq bottom-right, which may be negative); `key_lengths` (keys
// j >= klen[b] masked, b = r / rows_per_batch). Causal and key_lengths fold into one per-row
// `limit`: keys at or past it are masked and never read.
//
// make_mask_layout (csrc/host/mask_layout.cpp) merges the scores' leading dims where the mask's
// offset is linear across neighbours (a (B,1,1,Lk) padding mask over (B,H,Lq,Lk) scores becomes
// 2 dims, a dense mask 1), so a row's mask offset costs a few divisions at any rank. A mask whose
// strides leave more than kMaxMaskDims dims is made contiguous first (then it merges to one).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYF_HD __host__ __device__ __forceinline__
#else
#define PYF_HD inline
#endif

namespace pyformer {

constexpr int kMaxMaskDims = 8;

struct MaskLayout {
  const void* data = nullptr;          // bool mask (bytes, nonzero = may attend), or additive
                                       // mask in the scores' accumulation type (float; double)
  int kind = 0;                        // 0 none, 1 bool, 2 additive
  int nlead = 0;                       // merged leading dims of the scores (mask kinds 1, 2)
  int64_t size[kMaxMaskDims] = {};     // their sizes, outermost first
  int64_t mstride[kMaxMaskDims] = {};  // the mask's strides over them (0 where broadcast)
  int64_t mlast = 0;                   // the mask's stride over keys (0 when broadcast)
  bool causal = false;
  int64_t causal_offset = 0;      // key j <= i + causal_offset: 0 top-left, Lk - Lq bottom-right
  int64_t lq = 1;                 // scores.size(-2): row -> query index
  const int64_t* klen = nullptr;  // key_lengths as int64 (on the scores' device), or null
  int64_t rows_per_batch = 1;     // rows / scores.size(0): row -> batch index

  PYF_HD int64_t query(int64_t row) const { return row % lq; }
  PYF_HD int64_t batch(int64_t row) const { return row / rows_per_batch; }

  // Keys at or past the limit are masked by causal / key_lengths (not read); at most L.
  PYF_HD int64_t limit(int64_t row, int64_t L) const {
    int64_t lim = L;
    if (causal && query(row) + 1 + causal_offset < lim) lim = query(row) + 1 + causal_offset;
    if (klen != nullptr && klen[batch(row)] < lim) lim = klen[batch(row)];
    return lim < 0 ? 0 : lim;
  }

  // The offset of row `row`'s first key in the mask (0 without a mask tensor).
  PYF_HD int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int d = nlead - 1; d >= 0; --d) {
      off += (row % size[d]) * mstride[d];
      row /= size[d];
    }
    return off;
  }
};

}  // namespace pyformer
