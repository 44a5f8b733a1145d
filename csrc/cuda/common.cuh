// pyformer CUDA: helpers shared by the kernel files in csrc/cuda/.
//
// What lives here: the accumulator type of each dtype, 16-byte vector loads, warp and block
// reductions, launch-size helpers, the same-device check every op runs, and the declarations of
// the few launchers one kernel file borrows from another (attention.cu calls the masked-softmax
// launchers without re-running their argument checks).
//
// Headers: only c10/cuda/* and ATen/ATen.h, because the CPU torch wheel (used for compile checks
// in CI) lacks ATen/cuda/CUDAContext.h's cuSPARSE header.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

#include "../pyformer.h"

namespace pyformer {
namespace cuda {

// ---- types --------------------------------------------------------------------------------------
// Reductions accumulate in float32, or float64 for float64 input (ops.md).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// A 16-byte (or smaller) aligned vector of N elements, for one wide load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte vector: 8 for half types, 4 for float, 2 for double.
template <typename T> constexpr int vec16() { return 16 / static_cast<int>(sizeof(T)); }

__host__ __device__ inline bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// ---- math ---------------------------------------------------------------------------------------
// expf, not __expf: the float32 bound is 1e-5 relative, and these kernels are memory-bound, so the
// accurate exponential costs no time that shows.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double acc_rsqrt(double x) { return rsqrt(x); }
// fmax ignores a NaN operand; NaN still reaches the output through the sum (see masked_softmax.cu).
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }
template <typename A> __device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}
template <typename A> __device__ __forceinline__ A quiet_nan() {
  return std::numeric_limits<A>::quiet_NaN();
}

// ---- reductions ---------------------------------------------------------------------------------
struct SumOp {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const {
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

// ---- argument checks ----------------------------------------------------------------------------
// Every tensor argument of a CUDA op must sit on the same CUDA device as the first one.
struct NamedTensor {
  const char* name;
  const at::Tensor* t;  // null for an absent optional
};

inline void check_same_cuda_device(const char* op, std::initializer_list<NamedTensor> args) {
  const at::Tensor* first = nullptr;
  const char* first_name = nullptr;
  for (const auto& a : args) {
    if (a.t == nullptr || !a.t->defined()) continue;
    TORCH_CHECK(a.t->is_cuda(), op, ": expected argument '", a.name,
                "' to be a CUDA tensor, but it is on ", a.t->device());
    if (first == nullptr) {
      first = a.t;
      first_name = a.name;
      continue;
    }
    TORCH_CHECK(a.t->device() == first->device(), op, ": expected all tensors on one device, but '",
                a.name, "' is on ", a.t->device(), " and '", first_name, "' on ", first->device());
  }
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// ---- launchers shared across files (no argument checks; callers have run them) ----------------
// masked_softmax.cu
at::Tensor masked_softmax_forward_launch(const at::Tensor& scores,
                                         const std::optional<at::Tensor>& mask, double scale,
                                         bool causal, const std::optional<at::Tensor>& key_lengths);
at::Tensor masked_softmax_backward_launch(const at::Tensor& grad, const at::Tensor& out,
                                          double scale);
// scaled_qk.cu: scale * q @ k^T for contiguous (batch, Lq, D) and (batch, Lk, D).
at::Tensor scaled_qk_launch(const at::Tensor& q3, const at::Tensor& k3, double scale);

}  // namespace cuda
}  // namespace pyformer
