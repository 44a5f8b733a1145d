// swiglu on CUDA: the kernels behind kernels::swiglu_fwd / _bwd.
//
//   out = silu(gate) * up = gate * sigmoid(gate) * up                     gate, up, out (n,)
//   backward: dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * gate * s, s =
//   sigmoid(gate)
//
// Algorithm: a grid-stride loop over 16-byte vectors of the flat, contiguous tensors (a scalar
// instantiation where n or a pointer does not allow vectors), the math in float32 (float64 for
// float64) with the accurate expf. Napkin math (H100, ~3 TB/s): the forward moves 12 bytes per
// float32 element (6 for half types), the backward 20 (10): a (8192, 11008) float32 forward is
// ~1.1 GB, ~0.4 ms at the bandwidth, the exp and the division hidden under the memory traffic.
#include "common.cuh"

namespace pyformer {
namespace cuda {
namespace {

template <typename A>
__device__ __forceinline__ A sigmoid(A g) {
  return A(1) / (A(1) + acc_exp(-g));
}

template <typename T, int VEC>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ out, int64_t nvec) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Vec<T, VEC> g = load_vec<T, VEC>(gate, i * VEC), u = load_vec<T, VEC>(up, i * VEC);
    Vec<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const A x = static_cast<A>(g.v[e]);
      o.v[e] = static_cast<T>(x * sigmoid(x) * static_cast<A>(u.v[e]));
    }
    store_vec<T, VEC>(out, i * VEC, o);
  }
}

template <typename T, int VEC>
__global__ void swiglu_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ gate,
                                  const T* __restrict__ up, T* __restrict__ dgate,
                                  T* __restrict__ dup, int64_t nvec) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Vec<T, VEC> d = load_vec<T, VEC>(grad, i * VEC), g = load_vec<T, VEC>(gate, i * VEC),
                      u = load_vec<T, VEC>(up, i * VEC);
    Vec<T, VEC> dg, du;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const A dv = static_cast<A>(d.v[e]), x = static_cast<A>(g.v[e]), uv = static_cast<A>(u.v[e]);
      const A s = sigmoid(x);
      dg.v[e] = static_cast<T>(dv * uv * s * (A(1) + x * (A(1) - s)));
      du.v[e] = static_cast<T>(dv * x * s);
    }
    store_vec<T, VEC>(dgate, i * VEC, dg);
    store_vec<T, VEC>(dup, i * VEC, du);
  }
}

constexpr int kThreads = 256;

// Blocks for n / VEC vectors: enough to fill the GPU several times over, grid-stride beyond.
inline unsigned blocks_for(int64_t nvec) {
  const int64_t cap = int64_t(sm_count()) * 8;
  const int64_t need = ceil_div(nvec, kThreads);
  return static_cast<unsigned>(need < 1 ? 1 : (need < cap ? need : cap));
}

void swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_cuda", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (can_vectorize(n, V, {g, u, o})) {
      swiglu_fwd_kernel<scalar_t, V><<<blocks_for(n / V), kThreads, 0, stream>>>(g, u, o, n / V);
    } else {
      swiglu_fwd_kernel<scalar_t, 1><<<blocks_for(n), kThreads, 0, stream>>>(g, u, o, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void swiglu_bwd_cuda(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                     const at::Tensor& dgate, const at::Tensor& dup) {
  const c10::cuda::CUDAGuard guard(gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_backward_cuda", [&] {
        constexpr int V = vec16<scalar_t>();
        const scalar_t* d = grad.const_data_ptr<scalar_t>();
        const scalar_t* g = gate.const_data_ptr<scalar_t>();
        const scalar_t* u = up.const_data_ptr<scalar_t>();
        scalar_t* dg = dgate.mutable_data_ptr<scalar_t>();
        scalar_t* du = dup.mutable_data_ptr<scalar_t>();
        if (can_vectorize(n, V, {d, g, u, dg, du})) {
          swiglu_bwd_kernel<scalar_t, V>
              <<<blocks_for(n / V), kThreads, 0, stream>>>(d, g, u, dg, du, n / V);
        } else {
          swiglu_bwd_kernel<scalar_t, 1>
              <<<blocks_for(n), kThreads, 0, stream>>>(d, g, u, dg, du, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(swiglu_fwd, CUDA, &swiglu_fwd_cuda);
PYFORMER_REGISTER_KERNEL(swiglu_bwd, CUDA, &swiglu_bwd_cuda);

}  // namespace cuda
}  // namespace pyformer
