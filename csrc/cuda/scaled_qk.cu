// pyformer CUDA: scaled_qk forward (a tiled batched GEMM with the scale fused) and backward.
//
// What it computes (docs/ops.md):
//   scores = scale * q @ k^T                                   forward
//   dq = scale * grad @ k,  dk = scale * grad^T @ q            backward (cuBLAS, alpha = scale)
//
// Shapes: q (..., Lq, D), k (..., Lk, D) with equal leading dims, flattened to a batch of
// `batch = prod(...)`; scores (..., Lq, Lk) in q's dtype. Any D (including ones no vector width
// divides), non-contiguous inputs copied to contiguous first.
//
// Algorithm: one 64 x 64 tile of scores per block, K (= D) walked in steps.
//   half / bfloat16: tensor cores through WMMA (m16n16k16, float accumulation). 4 warps, each a
//     32 x 32 sub-tile (2 x 2 fragments). q and k tiles (64 x 32) are staged in shared memory with
//     16-byte loads when D % 8 == 0 (scalar, zero-filled loads otherwise), double-buffered through
//     registers so the global loads of step t+1 overlap the MMAs of step t. Both operands are
//     K-major (q rows, k rows), which is exactly WMMA's row_major A and col_major B: no transpose.
//     The accumulators go through shared memory to apply the scale and write 16-byte rows.
//   float32 / float64: a SIMT kernel, 256 threads, each a 4 x 4 register tile of outputs, K steps
//     of 16 staged k-major in shared memory.
//
// Napkin math, attention-sized (B*H = 128, L = 1024, D = 64, bf16): 2*128*1024*1024*64 = 17.2
// GFLOP; reading q and k once is 32 MiB and writing scores 256 MiB, so at D = 64 this op is bound
// by the scores write (~0.09 ms at 3 TB/s) more than by the ~0.02 ms of tensor-core time at ~800
// TFLOP/s. The kernel's job is therefore to stream the output: each block reads 2 x 64 x D inputs
// and writes 64 x 64 outputs as 16-byte stores. This is a straightforward WMMA kernel (no
// cp.async / TMA / wgmma pipeline), so for large D cuBLAS should be faster; attention's
// composition (csrc/host/attention.cpp) uses cuBLAS (at::baddbmm, alpha = scale) for that reason,
// and the benchmark reports both.
//
// Register/spill report: .ci/compile_cuda.sh prints it.
//
// Sections: device helpers, kernels, launchers, kernel entry.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/accumulate.h>

#include <vector>

#include "../host/gemm.h"
#include "common.cuh"

namespace pyformer {
namespace cuda {
namespace {

constexpr int kBM = 64;  // rows of q per tile
constexpr int kBN = 64;  // rows of k per tile
// tensor-core kernel
constexpr int kWmmaBK = 32;
constexpr int kWmmaLds = kWmmaBK + 8;  // +16 bytes per row: no bank conflicts, keeps 32B alignment
constexpr int kWmmaThreads = 128;
// SIMT kernel
constexpr int kSimtBK = 16;
constexpr int kSimtThreads = 256;

// ---- device helpers -----------------------------------------------------------------------------

template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Which tile this block works on: tn fastest, so consecutive blocks share a q tile (L2 reuse).
struct Tile {
  int64_t b;
  int64_t m0;
  int64_t n0;
};
__device__ __forceinline__ Tile tile_of(int64_t t, int64_t tiles_m, int64_t tiles_n) {
  Tile r;
  const int64_t tn = t % tiles_n;
  const int64_t rest = t / tiles_n;
  r.m0 = (rest % tiles_m) * kBM;
  r.b = rest / tiles_m;
  r.n0 = tn * kBN;
  return r;
}

// A 64 x 32 tile of a row-major (rows, D) matrix into registers: VEC elements per load, zeros
// outside the matrix. Thread t loads vectors t, t + 128, ... of the tile in row-major order.
template <typename T, int VEC>
struct TileRegs {
  static constexpr int kVecs = kBM * kWmmaBK / VEC / kWmmaThreads;  // 2 (VEC 8) or 16 (VEC 1)
  Vec<T, VEC> r[kVecs];

  __device__ __forceinline__ void load(const T* __restrict__ src, int64_t rows, int64_t D,
                                       int64_t r0, int64_t k0) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = (i * kWmmaThreads + threadIdx.x) * VEC;
      const int64_t row = r0 + idx / kWmmaBK;
      const int64_t col = k0 + idx % kWmmaBK;
      if (VEC > 1 && row < rows && col < D) {  // D % VEC == 0: the whole vector is inside
        r[i] = *reinterpret_cast<const Vec<T, VEC>*>(src + row * D + col);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          r[i].v[e] = (row < rows && col + e < D) ? src[row * D + col + e] : T(0.f);
      }
    }
  }
  __device__ __forceinline__ void store(T* dst /* [kBM][kWmmaLds] */) const {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = (i * kWmmaThreads + threadIdx.x) * VEC;
      *reinterpret_cast<Vec<T, VEC>*>(dst + (idx / kWmmaBK) * kWmmaLds + idx % kWmmaBK) = r[i];
    }
  }
};

// ---- kernels ------------------------------------------------------------------------------------

// Tensor cores: out[b] = scale * q[b] @ k[b]^T, half or bfloat16 in, float accumulate.
// Needs sm_80 (bfloat16 WMMA); pyformer builds for sm_80 and sm_90, and scaled_qk_launch calls
// cuBLAS instead on an older GPU.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWmmaThreads)
    scaled_qk_wmma_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ out,
                          int64_t batch, int64_t Lq, int64_t Lk, int64_t D, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using WT = typename WmmaType<T>::type;
  constexpr int kStage = kBM * kWmmaLds;
  __shared__ __align__(32) T a_s[2 * kStage];
  __shared__ __align__(32) T b_s[2 * kStage];
  __shared__ __align__(32) float c_s[kBM * (kBN + 4)];

  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32;  // warp's sub-tile origin within the block tile
  const int wn = (warp & 1) * 32;
  const int64_t tiles_m = ceil_div(Lq, kBM);
  const int64_t tiles_n = ceil_div(Lk, kBN);
  const int64_t tiles = batch * tiles_m * tiles_n;
  const int ksteps = static_cast<int>((D + kWmmaBK - 1) / kWmmaBK);

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = tile_of(t, tiles_m, tiles_n);
    const T* qb = q + tile.b * Lq * D;
    const T* kb = k + tile.b * Lk * D;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    TileRegs<T, VEC> ra, rb;
    ra.load(qb, Lq, D, tile.m0, 0);
    rb.load(kb, Lk, D, tile.n0, 0);
    __syncthreads();  // the previous tile's readers of a_s / b_s / c_s are done
    ra.store(a_s);
    rb.store(b_s);
    __syncthreads();

    for (int s = 0; s < ksteps; ++s) {
      const int cur = s & 1;
      if (s + 1 < ksteps) {  // prefetch step s+1 into registers while the MMAs of step s run
        ra.load(qb, Lq, D, tile.m0, int64_t(s + 1) * kWmmaBK);
        rb.load(kb, Lk, D, tile.n0, int64_t(s + 1) * kWmmaBK);
      }
      const WT* as = reinterpret_cast<const WT*>(a_s + cur * kStage);
      const WT* bs = reinterpret_cast<const WT*>(b_s + cur * kStage);
#pragma unroll
      for (int kk = 0; kk < kWmmaBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], as + (wm + i * 16) * kWmmaLds + kk, kWmmaLds);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], bs + (wn + j * 16) * kWmmaLds + kk, kWmmaLds);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      if (s + 1 < ksteps) {
        // The other stage was last read in step s-1, and every thread passed the barrier at the
        // end of step s-1 after that, so it is free to overwrite.
        ra.store(a_s + (cur ^ 1) * kStage);
        rb.store(b_s + (cur ^ 1) * kStage);
      }
      __syncthreads();
    }

    // epilogue: accumulators -> shared -> scaled, converted, bounds-checked rows of `out`
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(c_s + (wm + i * 16) * (kBN + 4) + wn + j * 16, acc[i][j], kBN + 4,
                                wmma::mem_row_major);
    __syncthreads();
    T* ob = out + tile.b * Lq * Lk;
    const bool vec_out = (Lk % 8 == 0);
    if (vec_out) {
      for (int idx = threadIdx.x * 8; idx < kBM * kBN; idx += kWmmaThreads * 8) {
        const int r = idx / kBN, c = idx % kBN;
        const int64_t row = tile.m0 + r, col = tile.n0 + c;
        if (row < Lq && col < Lk) {
          Vec<T, 8> o;
#pragma unroll
          for (int e = 0; e < 8; ++e) o.v[e] = static_cast<T>(scale * c_s[r * (kBN + 4) + c + e]);
          *reinterpret_cast<Vec<T, 8>*>(ob + row * Lk + col) = o;
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < kBM * kBN; idx += kWmmaThreads) {
        const int r = idx / kBN, c = idx % kBN;
        const int64_t row = tile.m0 + r, col = tile.n0 + c;
        if (row < Lq && col < Lk)
          ob[row * Lk + col] = static_cast<T>(scale * c_s[r * (kBN + 4) + c]);
      }
    }
  }
#else
  __trap();  // below sm_80 (no bfloat16 WMMA); pyformer builds for sm_80 and newer
#endif
}

// SIMT: float32 (and float64), 256 threads as 16 x 16, each a 4 x 4 tile of outputs.
template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    scaled_qk_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ out,
                          int64_t batch, int64_t Lq, int64_t Lk, int64_t D, acc_t<T> scale) {
  using A = acc_t<T>;
  __shared__ A a_s[kSimtBK][kBM + 4];  // k-major: a_s[kk][m]
  __shared__ A b_s[kSimtBK][kBN + 4];
  const int tx = threadIdx.x % 16;  // output columns tx*4 .. tx*4+3
  const int ty = threadIdx.x / 16;  // output rows ty*4 .. ty*4+3
  const int64_t tiles_m = ceil_div(Lq, kBM);
  const int64_t tiles_n = ceil_div(Lk, kBN);
  const int64_t tiles = batch * tiles_m * tiles_n;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = tile_of(t, tiles_m, tiles_n);
    const T* qb = q + tile.b * Lq * D;
    const T* kb = k + tile.b * Lk * D;
    A acc[4][4] = {};
    for (int64_t k0 = 0; k0 < D; k0 += kSimtBK) {
      __syncthreads();  // previous readers of a_s / b_s are done
      // 64 x 16 elements per operand, 4 per thread; a warp reads 2 rows x 16 consecutive k
#pragma unroll
      for (int i = 0; i < kBM * kSimtBK / kSimtThreads; ++i) {
        const int idx = i * kSimtThreads + threadIdx.x;
        const int r = idx / kSimtBK, kk = idx % kSimtBK;
        const int64_t col = k0 + kk;
        const int64_t qr = tile.m0 + r, kr = tile.n0 + r;
        a_s[kk][r] = (qr < Lq && col < D) ? static_cast<A>(qb[qr * D + col]) : A(0);
        b_s[kk][r] = (kr < Lk && col < D) ? static_cast<A>(kb[kr * D + col]) : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSimtBK; ++kk) {
        A a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = a_s[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = b_s[kk][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    T* ob = out + tile.b * Lq * Lk;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = tile.m0 + ty * 4 + i;
      if (row >= Lq) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = tile.n0 + tx * 4 + j;
        if (col < Lk) ob[row * Lk + col] = static_cast<T>(scale * acc[i][j]);
      }
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

// The current device's compute capability (major).
int compute_major() {
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major;
}

unsigned int tile_grid(int64_t batch, int64_t Lq, int64_t Lk) {
  return grid_for(batch * ceil_div(Lq, kBM) * ceil_div(Lk, kBN), 1);
}

// out = scale * q3 @ k3^T for contiguous q3 (batch, Lq, D), k3 (batch, Lk, D); out non-empty
// and D > 0 (the host's contract).
void scaled_qk_fwd_cuda(const at::Tensor& q3, const at::Tensor& k3, const at::Tensor& out,
                        double scale) {
  const int64_t batch = q3.size(0), Lq = q3.size(1), D = q3.size(2), Lk = k3.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = tile_grid(batch, Lq, Lk);
  const auto st = q3.scalar_type();
  if ((st == at::kHalf || st == at::kBFloat16) && compute_major() < 8) {
    // below sm_80 the WMMA kernel is compiled to a trap (no bfloat16 WMMA there): cuBLAS instead
    at::Tensor o = out;
    host::scaled_bmm_out(o, q3, k3.transpose(1, 2), scale);
  } else if (st == at::kHalf || st == at::kBFloat16) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "scaled_qk_cuda", [&] {
      const scalar_t* qp = q3.const_data_ptr<scalar_t>();
      const scalar_t* kp = k3.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      if (D % 8 == 0 && is_aligned(qp, 16) && is_aligned(kp, 16)) {
        scaled_qk_wmma_kernel<scalar_t, 8><<<grid, kWmmaThreads, 0, stream>>>(
            qp, kp, op, batch, Lq, Lk, D, static_cast<float>(scale));
      } else {
        scaled_qk_wmma_kernel<scalar_t, 1><<<grid, kWmmaThreads, 0, stream>>>(
            qp, kp, op, batch, Lq, Lk, D, static_cast<float>(scale));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(st, "scaled_qk_cuda", [&] {
      scaled_qk_simt_kernel<scalar_t><<<grid, kSimtThreads, 0, stream>>>(
          q3.const_data_ptr<scalar_t>(), k3.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), batch, Lq, Lk, D, static_cast<acc_t<scalar_t>>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

PYFORMER_REGISTER_KERNEL(scaled_qk_fwd, CUDA, &scaled_qk_fwd_cuda);

}  // namespace cuda
}  // namespace pyformer
