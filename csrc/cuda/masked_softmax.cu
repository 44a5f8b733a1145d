// pyformer CUDA: masked_softmax forward and backward (fused scale + mask + causal + key_lengths).
//
// What it computes (docs/ops.md):
//   probs = softmax(scale * scores + M, dim=-1)                                      forward
//   dscores = scale * probs * (grad - sum(grad * probs, -1))                         backward
// where M is 0 or -inf per element, from (all combined):
//   mask         bool (True = may attend) or additive float, broadcast to scores by strides (a
//                stride-0 expand() view and a last dim of 1 are fine; never materialized);
//                a -inf entry of an additive mask counts as masked;
//   causal       key j allowed only where j <= i, i = index in the second-to-last dim;
//   key_lengths  (B,) int, B = scores.size(0): keys j >= key_lengths[b] masked.
// A row with no allowed position is all zeros. NaN/inf among allowed scores propagate as
// torch.softmax's would (the whole row becomes NaN).
//
// Shapes: scores (..., Lq, Lk) of any rank >= 1, viewed as (rows, L) with L = Lk; the mask has
// scores' rank or less; key_lengths (B,). Output: scores' shape and dtype, contiguous.
//
// Algorithm: each row is reduced by one warp (L <= 512) or by one block of at most 512 threads
// (L <= 8192) that holds the row in registers: one read of the scores, max-reduce, exp and
// sum-reduce on registers, one write. Longer rows (no cap) go to an online-softmax kernel, one
// 1024-thread block per row: pass 1 reads the row once, keeping a running (max, sum) and a copy
// of the raw row in shared memory when it fits (2-byte types up to ~110K keys on sm_90, ~80K on
// sm_80; float32 half that), pass 2 writes from that copy (or re-reads the row, normally an L2
// hit, when it does not fit). Each thread touches only its own slots of the copy, so the copy
// needs no barrier. Loads and stores are 16 bytes wide when the row length and the pointers
// allow, scalar otherwise. Causal and key_lengths shorten a row to `limit = min(i + 1,
// key_lengths[b])` keys: elements at or past `limit` are not read (at the granularity of one
// vector) and zeros are written there.
//
// Special values: e_j = allowed_j ? exp(x_j - max) : 0, sum = sum(e_j), y_j = e_j * inv with
// inv = (sum == 0 ? 0 : 1 / sum). sum == 0 exactly when nothing is allowed (otherwise the max
// contributes exp(0) = 1, or NaN when the max is +-inf or a score is NaN), so fully masked rows
// give zeros, and a NaN row is NaN everywhere (0 * NaN), as torch's is. The long path's online
// sums reach the same outputs (see rel_exp / finalize_inv).
//
// Napkin math (the gpu-targets benchmark, scores (8,16,2048,2048) bf16 with a padding mask):
// 2^29 elements * 2 bytes read + 2 bytes written = 2 GiB of traffic; the padding mask is
// (8,1,1,2048) bool = 16 KiB, L1/L2-resident. At ~3 TB/s of H100 copy bandwidth that is ~0.7 ms
// per call if the kernel streams at copy speed; the textbook composition (div, masked_fill,
// softmax) moves >= 3x the bytes. Each thread of the 128-thread block owning a 2048-key row
// issues two 16-byte loads, all before the first reduction: 4 KiB per block, and with ~8 blocks
// resident per SM ~32 KiB in flight, above the ~25 KiB per SM that Little's law asks for (3 TB/s
// x ~1 us latency / 132 SMs).
//
// Register/spill report: .ci/compile_cuda.sh prints it. The register kernels hold 16 row values
// per thread (2 x 16 in the backward); their __launch_bounds__ carry an explicit minimum of blocks
// per SM (common.cuh, row_min_blocks) because without it ptxas 13 for sm_90 squeezed them to 32-80
// registers and spilled a few bytes. With it no kernel spills on sm_80 or sm_90.
//
// Sections: device helpers, forward kernels, backward kernels, launchers, kernel entries.
#include "common.cuh"

namespace pyformer {
namespace cuda {
namespace {

// The row kernels' sizes (kRowItems, kWarpRowsPerBlock, kMaxRowThreads, kLongThreads), RowMap,
// store_row, load_vec / store_vec, can_vectorize and launch_rows are in common.cuh, shared with
// layer_norm.cu.
// ---- device helpers -----------------------------------------------------------------------------

// Which keys of a row are allowed: the MaskLayout of csrc/mask_layout.h (built by the host),
// passed by value to the kernels.
struct RowInfo {
  int64_t moff;   // offset of this row in the mask
  int64_t limit;  // keys >= limit are masked by causal / key_lengths and never read
};

__device__ __forceinline__ RowInfo row_info(const MaskLayout& p, int64_t row, int64_t L) {
  return RowInfo{p.kind != 0 ? p.offset(row) : 0, p.limit(row, L)};
}

// scale * score + additive mask; `ok` is false where the mask forbids key j.
template <typename T, typename A>
__device__ __forceinline__ A masked_value(T score, A scale, const MaskLayout& p, int64_t moff,
                                          int64_t j, bool& ok) {
  A x = scale * static_cast<A>(score);
  ok = true;
  if (p.kind == 1) {
    ok = static_cast<const uint8_t*>(p.data)[moff + j * p.mlast] != 0;  // any nonzero byte
  } else if (p.kind == 2) {
    const A m = static_cast<const A*>(p.data)[moff + j * p.mlast];  // in A (make_mask_args)
    ok = !(m == neg_inf<A>());
    x += m;
  }
  return x;
}

// exp(a - m), but 1 where a == m: keeps a running sum finite while the max is still -inf (an
// allowed -inf score); the +-inf maxima that this hides are caught by `finalize_inv`.
template <typename A>
__device__ __forceinline__ A rel_exp(A a, A m) {
  return a == m ? A(1) : acc_exp(a - m);
}

// For the online (max, sum) of the long path: 0 when nothing was allowed, NaN when the max is not
// finite (torch's exp(x - max) would be NaN there), else 1 / sum (NaN if a score was NaN).
template <typename A>
__device__ __forceinline__ A finalize_inv(A m, A s) {
  if (s == A(0)) return A(0);
  if (!isfinite(m)) return quiet_nan<A>();
  return A(1) / s;
}

// Combine two online-softmax partials (m, s) into (m, s).
template <typename A>
__device__ __forceinline__ void online_combine(A& m, A& s, A m2, A s2) {
  const A mn = acc_max(m, m2);
  const A f1 = (m == mn) ? A(1) : acc_exp(m - mn);
  const A f2 = (m2 == mn) ? A(1) : acc_exp(m2 - mn);
  s = s * f1 + s2 * f2;
  m = mn;
}

// ---- forward kernels ----------------------------------------------------------------------------

// Register-resident row: thread t holds keys (c * nthreads + t) * VEC + e, c < CHUNKS, e < VEC.
// Requires L <= nthreads * VEC * CHUNKS and, for VEC > 1, L % VEC == 0 and aligned rows.
// Rows loop grid-stride; in the block variant all threads of a block share a row, so the loop
// condition is uniform and the reductions' __syncthreads() are safe.
template <typename T, int VEC, int CHUNKS, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxRowThreads,
                                  row_min_blocks<T, WARP, VEC>())
    softmax_fwd_regs_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t L,
                            acc_t<T> scale, MaskLayout p) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  static_assert(CHUNKS * VEC <= 32, "one bit per item");
  __shared__ A smem[33];
  const int tid = RowMap<WARP>::tid();
  const int nt = RowMap<WARP>::nthreads();
  for (int64_t row = RowMap<WARP>::first_row(); row < rows; row += RowMap<WARP>::row_step()) {
    const RowInfo ri = row_info(p, row, L);
    const T* xr = x + row * L;
    T* yr = y + row * L;

    A v[CHUNKS * VEC];
    uint32_t ok_bits = 0;
    A m = neg_inf<A>();
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int j0 = (c * nt + tid) * VEC;  // < 8192: 32-bit in-row offsets
      if (j0 < ri.limit) {                  // skip what causal / key_lengths mask
        const V in = load_vec<T, VEC>(xr, j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          bool ok;
          v[c * VEC + e] = masked_value<T, A>(in.v[e], scale, p, ri.moff, j0 + e, ok);
          ok = ok && (j0 + e < ri.limit);
          if (ok) {
            ok_bits |= 1u << (c * VEC + e);
            m = acc_max(m, v[c * VEC + e]);
          }
        }
      }
    }
    m = RowMap<WARP>::max(m, smem);

    A s = A(0);
#pragma unroll
    for (int i = 0; i < CHUNKS * VEC; ++i) {
      v[i] = ((ok_bits >> i) & 1u) ? acc_exp(v[i] - m) : A(0);
      s += v[i];
    }
    s = RowMap<WARP>::sum(s, smem);
    const A inv = (s == A(0)) ? A(0) : A(1) / s;
    // a masked key is exactly 0, also in a row whose inv is NaN (docs/ops.md)
    store_row<T, VEC, CHUNKS, WARP>(
        yr, L, [&](int i) { return ((ok_bits >> i) & 1u) ? v[i] * inv : A(0); });
  }
}

// Any row length: one block of kLongThreads per row, online (max, sum) in pass 1, write in pass 2.
// With `cache` the raw row is kept in dynamic shared memory between the passes (one global read).
template <typename T, int VEC>
__global__ void __launch_bounds__(kLongThreads, 1)
    softmax_fwd_long_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t L,
                            acc_t<T> scale, MaskLayout p, bool cache) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  T* row_cache = reinterpret_cast<T*>(dyn_smem);
  __shared__ A red_m[32], red_s[32];
  __shared__ A fin_m, fin_s;
  const int64_t step = int64_t(blockDim.x) * VEC;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowInfo ri = row_info(p, row, L);
    const T* xr = x + row * L;
    T* yr = y + row * L;

    // pass 1: running max and sum of this thread's keys
    A m = neg_inf<A>(), s = A(0);
    for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < ri.limit; j0 += step) {
      const V in = load_vec<T, VEC>(xr, j0);
      if (cache) store_vec<T, VEC>(row_cache, j0, in);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        bool ok;
        const A xv = masked_value<T, A>(in.v[e], scale, p, ri.moff, j0 + e, ok);
        if (ok && j0 + e < ri.limit) {
          const A mn = acc_max(m, xv);
          s = s * ((m == mn) ? A(1) : acc_exp(m - mn)) + rel_exp(xv, mn);
          m = mn;
        }
      }
    }
    // block combine of (m, s)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const A m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const A s2 = __shfl_xor_sync(0xffffffffu, s, off);
      online_combine(m, s, m2, s2);
    }
    __syncthreads();  // previous row's readers of fin_m/fin_s and row_cache are done
    if ((threadIdx.x & 31) == 0) {
      red_m[threadIdx.x >> 5] = m;
      red_s[threadIdx.x >> 5] = s;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const int nw = blockDim.x >> 5;
      A mw = threadIdx.x < nw ? red_m[threadIdx.x] : neg_inf<A>();
      A sw = threadIdx.x < nw ? red_s[threadIdx.x] : A(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const A m2 = __shfl_xor_sync(0xffffffffu, mw, off);
        const A s2 = __shfl_xor_sync(0xffffffffu, sw, off);
        online_combine(mw, sw, m2, s2);
      }
      if (threadIdx.x == 0) {
        fin_m = mw;
        fin_s = sw;
      }
    }
    __syncthreads();
    m = fin_m;
    const A inv = finalize_inv(m, fin_s);

    // pass 2: write every key; masked keys and keys at or past `limit` (not read) are exactly 0,
    // also in a row whose inv is NaN (docs/ops.md)
    for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < L; j0 += step) {
      V out;
      if (j0 < ri.limit) {
        const V in = cache ? load_vec<T, VEC>(row_cache, j0) : load_vec<T, VEC>(xr, j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          bool ok;
          const A xv = masked_value<T, A>(in.v[e], scale, p, ri.moff, j0 + e, ok);
          out.v[e] = static_cast<T>((ok && j0 + e < ri.limit) ? acc_exp(xv - m) * inv : A(0));
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = T(0);
      }
      store_vec<T, VEC>(yr, j0, out);
    }
  }
}

// ---- backward kernels ---------------------------------------------------------------------------

// dx = scale * y * (dy - sum(dy * y)), register-resident rows (same mapping as the forward).
template <typename T, int VEC, int CHUNKS, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxRowThreads,
                                  row_min_blocks<T, WARP, VEC>())
    softmax_bwd_regs_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                            int64_t rows, int64_t L, acc_t<T> scale) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  __shared__ A smem[33];
  const int tid = RowMap<WARP>::tid();
  const int nt = RowMap<WARP>::nthreads();
  for (int64_t row = RowMap<WARP>::first_row(); row < rows; row += RowMap<WARP>::row_step()) {
    const T* dyr = dy + row * L;
    const T* yr = y + row * L;
    T* dxr = dx + row * L;
    A g[CHUNKS * VEC], o[CHUNKS * VEC];
    A dot = A(0);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int j0 = (c * nt + tid) * VEC;  // < 8192: 32-bit in-row offsets
      if (j0 < L) {
        const V a = load_vec<T, VEC>(dyr, j0);
        const V b = load_vec<T, VEC>(yr, j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[c * VEC + e] = static_cast<A>(a.v[e]);
          o[c * VEC + e] = static_cast<A>(b.v[e]);
          // a zero probability's dy is not read (NaN there must not reach the row's dot)
          if (o[c * VEC + e] != A(0)) dot += g[c * VEC + e] * o[c * VEC + e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[c * VEC + e] = o[c * VEC + e] = A(0);
      }
    }
    dot = RowMap<WARP>::sum(dot, smem);
    // exactly 0 where y == 0 (a masked key), as the CPU row kernel (docs/ops.md)
    store_row<T, VEC, CHUNKS, WARP>(
        dxr, L, [&](int i) { return o[i] == A(0) ? A(0) : scale * o[i] * (g[i] - dot); });
  }
}

// Any row length: pass 1 reduces the dot product, pass 2 re-reads (L2) and writes.
template <typename T, int VEC>
__global__ void __launch_bounds__(kLongThreads, 1)
    softmax_bwd_long_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                            int64_t rows, int64_t L, acc_t<T> scale) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  __shared__ A smem[33];
  const int64_t step = int64_t(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * L;
    const T* yr = y + row * L;
    T* dxr = dx + row * L;
    A dot = A(0);
    for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < L; j0 += step) {
      const V a = load_vec<T, VEC>(dyr, j0);
      const V b = load_vec<T, VEC>(yr, j0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A yv = static_cast<A>(b.v[e]);
        if (yv != A(0)) dot += static_cast<A>(a.v[e]) * yv;  // a zero probability's dy: unread
      }
    }
    dot = block_allreduce_sum(dot, smem);
    for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < L; j0 += step) {
      const V a = load_vec<T, VEC>(dyr, j0);
      const V b = load_vec<T, VEC>(yr, j0);
      V out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A yv = static_cast<A>(b.v[e]);  // exactly 0 where y == 0 (a masked key)
        out.v[e] = static_cast<T>(yv == A(0) ? A(0) : scale * yv * (static_cast<A>(a.v[e]) - dot));
      }
      store_vec<T, VEC>(dxr, j0, out);
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

template <typename T, int VEC>
void launch_softmax_fwd(const T* x, T* y, int64_t rows, int64_t L, double scale,
                        const MaskLayout& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const acc_t<T> sc = static_cast<acc_t<T>>(scale);
  launch_rows<VEC>(
      rows, L,
      [&](auto chunks, auto warp, unsigned grid, int threads) {
        softmax_fwd_regs_kernel<T, VEC, decltype(chunks)::value, decltype(warp)::value>
            <<<grid, threads, 0, stream>>>(x, y, rows, L, sc, p);
      },
      [&](unsigned grid, int threads) {
        // Cache the row in shared memory when it fits in what one block may opt in to, keeping
        // ~8 KiB for the static reduction buffers.
        const int64_t bytes = L * int64_t(sizeof(T));
        const bool cache = bytes + 8192 <= int64_t(max_smem_optin());
        const int dyn = cache ? static_cast<int>(bytes) : 0;
        auto kernel = softmax_fwd_long_kernel<T, VEC>;
        if (dyn > 48 * 1024) {
          C10_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
        }
        kernel<<<grid, threads, dyn, stream>>>(x, y, rows, L, sc, p, cache);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_softmax_bwd(const T* dy, const T* y, T* dx, int64_t rows, int64_t L, double scale) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const acc_t<T> sc = static_cast<acc_t<T>>(scale);
  launch_rows<VEC>(
      rows, L,
      [&](auto chunks, auto warp, unsigned grid, int threads) {
        softmax_bwd_regs_kernel<T, VEC, decltype(chunks)::value, decltype(warp)::value>
            <<<grid, threads, 0, stream>>>(dy, y, dx, rows, L, sc);
      },
      [&](unsigned grid, int threads) {
        softmax_bwd_long_kernel<T, VEC><<<grid, threads, 0, stream>>>(dy, y, dx, rows, L, sc);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- kernel entries (kernels.h) ----------------------------------------------------------------

void masked_softmax_fwd_cuda(const at::Tensor& x, const at::Tensor& y, const MaskLayout& mask,
                             double scale) {
  const int64_t L = x.size(-1), rows = x.numel() / L;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_softmax_cuda",
                                  [&] {
                                    constexpr int V = vec16<scalar_t>();
                                    const scalar_t* xp = x.const_data_ptr<scalar_t>();
                                    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
                                    if (can_vectorize(L, V, {xp, yp})) {
                                      launch_softmax_fwd<scalar_t, V>(xp, yp, rows, L, scale, mask);
                                    } else {
                                      launch_softmax_fwd<scalar_t, 1>(xp, yp, rows, L, scale, mask);
                                    }
                                  });
}

void masked_softmax_bwd_cuda(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& dx,
                             double scale) {
  const int64_t L = y.size(-1), rows = y.numel() / L;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "masked_softmax_backward_cuda", [&] {
                                    constexpr int V = vec16<scalar_t>();
                                    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
                                    const scalar_t* yp = y.const_data_ptr<scalar_t>();
                                    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
                                    if (can_vectorize(L, V, {dyp, yp, dxp})) {
                                      launch_softmax_bwd<scalar_t, V>(dyp, yp, dxp, rows, L, scale);
                                    } else {
                                      launch_softmax_bwd<scalar_t, 1>(dyp, yp, dxp, rows, L, scale);
                                    }
                                  });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(masked_softmax_fwd, CUDA, &masked_softmax_fwd_cuda);
PYFORMER_REGISTER_KERNEL(masked_softmax_bwd, CUDA, &masked_softmax_bwd_cuda);

}  // namespace cuda
}  // namespace pyformer
