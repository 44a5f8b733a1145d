// pyformer CUDA: helpers shared by the kernel files in csrc/cuda/.
//
// What lives here: the accumulator type of each dtype, 16-byte vector loads and stores, warp and
// block reductions, the row kernels' common frame (layer_norm.cu and masked_softmax.cu: the
// row -> thread mapping, the register-path sizes and the launcher that picks a path by row
// length) and launch-size helpers. The kernel files implement the entries of csrc/kernels.h.
//
// Headers: only c10/cuda/* and ATen/ATen.h, because the CPU torch wheel (used for compile checks
// in CI) lacks ATen/cuda/CUDAContext.h's cuSPARSE header.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>

#include "../kernels.h"

namespace pyformer {
namespace cuda {

// ---- types --------------------------------------------------------------------------------------
// Reductions accumulate in float32, or float64 for float64 input (docs/ops.md).
template <typename T>
using acc_t = at::opmath_type<T>;

// A 16-byte (or smaller) aligned vector of N elements, for one wide load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte vector: 8 for half types, 4 for float, 2 for double.
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

__host__ __device__ inline bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// One Vec of N elements at p + j (p + j aligned to the Vec: callers check with can_vectorize).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p, int64_t j) {
  return *reinterpret_cast<const Vec<T, N>*>(p + j);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, int64_t j, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p + j) = v;
}

// Whether rows of n elements split into vectors of `vec` and every pointer is 16-byte aligned
// (nulls count as aligned), i.e. whether the vectorized instantiation of a kernel may run.
inline bool can_vectorize(int64_t n, int vec, std::initializer_list<const void*> ptrs) {
  if (n % vec != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !is_aligned(p, 16)) return false;
  return true;
}

// ---- math ---------------------------------------------------------------------------------------
// expf, not __expf: the float32 bound is 1e-5 relative, and these kernels are memory-bound, so the
// accurate exponential costs no time that shows.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
// Neumaier's compensated sum: a thread's running sum over a long row (N / (threads * VEC) terms)
// whose error does not grow with the number of terms.
template <typename A>
struct CompensatedSum {
  A sum = A(0), comp = A(0);
  __device__ __forceinline__ void add(A v) {
    const A t = sum + v;
    comp += fabs(sum) >= fabs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  __device__ __forceinline__ A value() const { return sum + comp; }
};

__device__ __forceinline__ float acc_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double acc_rsqrt(double x) { return rsqrt(x); }
// fmax ignores a NaN operand; NaN still reaches the output through the sum (see masked_softmax.cu).
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }
template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}
template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return std::numeric_limits<A>::quiet_NaN();
}

// ---- reductions ---------------------------------------------------------------------------------
struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return acc_max(a, b);
  }
};

// All-reduce over the 32 lanes of a warp (every lane gets the result).
template <typename A, typename Op>
__device__ __forceinline__ A warp_allreduce(A v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// All-reduce over a block whose size is a multiple of 32 (at most 1024); `identity` is the neutral
// element of `op` (0 for a sum, -inf for a max). `smem` holds 33 values. Starts with a
// __syncthreads(), so calls may follow one another with the same smem.
template <typename A, typename Op>
__device__ __forceinline__ A block_allreduce(A v, Op op, A identity, A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_allreduce(v, op);
  __syncthreads();  // the previous call's readers of smem[32] are done
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A w = lane < nwarps ? smem[lane] : identity;
    w = warp_allreduce(w, op);
    if (lane == 0) smem[32] = w;
  }
  __syncthreads();
  return smem[32];
}

template <typename A>
__device__ __forceinline__ A block_allreduce_sum(A v, A* smem) {
  return block_allreduce(v, SumOp{}, A(0), smem);
}
template <typename A>
__device__ __forceinline__ A block_allreduce_max(A v, A* smem) {
  return block_allreduce(v, MaxOp{}, neg_inf<A>(), smem);
}

// ---- launch helpers -----------------------------------------------------------------------------
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over `work` items with `per_block` items per block. Capped so
// it always fits gridDim.x; kernels loop when the cap bites (only for > 2^30 blocks of work).
inline unsigned int grid_for(int64_t work, int64_t per_block) {
  int64_t g = ceil_div(work, per_block);
  if (g < 1) g = 1;
  if (g > (int64_t{1} << 30)) g = int64_t{1} << 30;
  return static_cast<unsigned int>(g);
}

inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n > 0 ? n : 1;
}

inline int max_smem_optin() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return n;
}

// ---- row kernels (layer_norm.cu, masked_softmax.cu) --------------------------------------------
// Both files reduce independent rows of n values with one of four kernels picked by n: a warp per
// row holding the row in registers (a small and a large variant, n <= 32 * VEC * chunks), a block
// of at most kMaxRowThreads threads per row holding it in registers (n <= 8192), or a
// kLongThreads block per row that streams any length. Thread t of a register path holds the
// values (c * nthreads + t) * VEC + e, c < CHUNKS, e < VEC: kRowItems of them at most.
constexpr int kRowItems = 16;         // row values per thread on the register paths
constexpr int kWarpRowsPerBlock = 4;  // warp paths: 4 rows per 128-thread block
constexpr int kMaxRowThreads = 512;   // block path: 512 threads x 16 values = rows up to 8192
constexpr int kLongThreads = 1024;    // the long path's block

// Explicit minimum blocks per SM for the row kernels' __launch_bounds__. Without it, ptxas 13 for
// sm_90 aims at full occupancy and trades registers for small spills. The vectorized float/half
// kernels get a 64-register budget (8 x 128-thread warp-row blocks, or 2 x 512-thread row blocks
// per SM); the scalar fallback (VEC 1: a 64-bit address per load) and double (two registers per
// value) get twice that, trading occupancy for no spills.
template <typename T, bool WARP, int VEC>
constexpr int row_min_blocks() {
  int b = WARP ? 8 : 2;
  if (VEC == 1) b /= 2;
  if (sizeof(T) == 8) b /= 2;
  return b < 1 ? 1 : b;
}

// Row -> thread mapping of the register kernels: WARP = one warp per row (kWarpRowsPerBlock rows
// per block), else one block per row. Rows loop grid-stride; in the block variant all threads of
// a block share a row, so the loop condition is uniform and the reductions' __syncthreads() are
// safe.
template <bool WARP>
struct RowMap {
  __device__ __forceinline__ static int64_t first_row() {
    return WARP ? int64_t(blockIdx.x) * kWarpRowsPerBlock + (threadIdx.x >> 5) : blockIdx.x;
  }
  __device__ __forceinline__ static int64_t row_step() {
    return WARP ? int64_t(gridDim.x) * kWarpRowsPerBlock : gridDim.x;
  }
  __device__ __forceinline__ static int tid() { return WARP ? (threadIdx.x & 31) : threadIdx.x; }
  __device__ __forceinline__ static int nthreads() { return WARP ? 32 : blockDim.x; }
  // The in-row offset of this thread's chunk c: (c * nthreads + tid) * vec, below 8192 on the
  // register paths, so 32-bit.
  __device__ __forceinline__ static int col(int c, int vec) {
    return (c * nthreads() + tid()) * vec;
  }
  // All-reduces over the row's threads; `smem` (33 values) is used only by the block variant.
  template <typename A>
  __device__ __forceinline__ static A sum(A v, A* smem) {
    return allreduce(v, SumOp{}, A(0), smem);
  }
  template <typename A>
  __device__ __forceinline__ static A max(A v, A* smem) {
    return allreduce(v, MaxOp{}, neg_inf<A>(), smem);
  }
  template <typename A, typename Op>
  __device__ __forceinline__ static A allreduce(A v, Op op, A identity, A* smem) {
    if constexpr (WARP) {
      return warp_allreduce(v, op);
    } else {
      return block_allreduce(v, op, identity, smem);
    }
  }
};

// The write pass of a register kernel whose outputs need only its registers: this thread's value
// i = c * VEC + e becomes f(i), stored at in-row offset col(c, VEC) + e (chunks at or past n are
// skipped), one vector per chunk.
template <typename T, int VEC, int CHUNKS, bool WARP, typename F>
__device__ __forceinline__ void store_row(T* yr, int64_t n, F f) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int j0 = RowMap<WARP>::col(c, VEC);
    if (j0 < n) {
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<T>(f(c * VEC + e));
      store_vec<T, VEC>(yr, j0, out);
    }
  }
}

// Chunk counts of the register paths for a vector width: the small warp variant (n <= 128, or
// 256 for VEC 8), the large warp variant (n <= 512) and the block variant (n <= 8192).
template <int VEC>
constexpr int small_chunks() {
  return VEC >= 4 ? 1 : 4 / VEC;
}
template <int VEC>
constexpr int row_chunks() {
  return kRowItems / VEC;
}

// Threads (a multiple of 32) of the block path for rows of n values, `items` per thread.
inline int block_threads_for(int64_t n, int items) {
  int64_t t = ceil_div(n, items);
  t = ceil_div(t, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : t);
}

// Picks the path for `rows` rows of n values read VEC at a time and launches it: the register
// paths through regs(chunks, warp, grid, threads), where chunks is a
// std::integral_constant<int, CHUNKS> and warp a std::bool_constant<WARP> to instantiate the
// kernel with, and longer rows through long_rows(grid, threads). BLOCK = false sends the block
// path's rows to long_rows too (for instantiations whose block variant would spill).
// The caller runs C10_CUDA_KERNEL_LAUNCH_CHECK() afterwards.
template <int VEC, bool BLOCK = true, typename Regs, typename Long>
void launch_rows(int64_t rows, int64_t n, Regs&& regs, Long&& long_rows) {
  constexpr int CS = small_chunks<VEC>();
  constexpr int CR = row_chunks<VEC>();
  const unsigned warp_grid = grid_for(rows, kWarpRowsPerBlock);
  if (n <= int64_t(32) * VEC * CS) {
    regs(std::integral_constant<int, CS>{}, std::true_type{}, warp_grid, 32 * kWarpRowsPerBlock);
  } else if (n <= int64_t(32) * VEC * CR) {
    regs(std::integral_constant<int, CR>{}, std::true_type{}, warp_grid, 32 * kWarpRowsPerBlock);
  } else if (BLOCK && n <= int64_t(kMaxRowThreads) * VEC * CR) {
    if constexpr (BLOCK) {
      regs(std::integral_constant<int, CR>{}, std::false_type{}, grid_for(rows, 1),
           block_threads_for(n, VEC * CR));
    }
  } else {
    long_rows(grid_for(rows, 1), kLongThreads);
  }
}

}  // namespace cuda
}  // namespace pyformer
