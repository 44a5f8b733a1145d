// apply_rotary on CUDA: the kernel behind kernels::rotary.
//
//   q (B, Hq, L, D), k (B, Hk, L, D): any strides on the first three dims, unit stride along D
//   (outputs likewise); cos, sin (Bc, L, Dr) contiguous in the accumulation type, Bc = 1 or B.
//   Per row x at (b, l) and pair i < Dr/2 ((x[i], x[i + Dr/2]) rotate-half, (x[2i], x[2i + 1])
//   interleaved), with c1, c2, s1, s2 the cos and sin at the pair's positions:
//     forward:    o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2
//     transpose:  o1 = x1 c1 + x2 s2,  o2 = x2 c2 - x1 s1     (the backward)
//   and o = x past Dr (csrc/cpu/rotary.cpp has the same contract).
//
// Algorithm: one block per position (b, l), grid-stride over positions; its threads run over the
// (Hq + Hk) * Dr/2 pairs of that position's rows, consecutive threads on consecutive pairs (for
// rotate-half, consecutive addresses: coalesced), then over the pass-through columns. cos and sin
// are read from global memory: Dr values per position that every head re-reads from L1. Napkin
// math (H100, ~3 TB/s): 8 bytes moved per float32 element of q and k, no reuse to exploit;
// q (4, 32, 2048, 128) + k (4, 8, 2048, 128) float32 is ~340 MB, ~0.1 ms at the bandwidth.
#include "common.cuh"

namespace pyformer {
namespace cuda {
namespace {

template <typename T>
struct RotaryRows {
  const T* x[2];
  T* o[2];
  int64_t heads[2];
  int64_t xs[2][3], os[2][3];  // strides (B, H, L) of the inputs and outputs
};

template <typename T>
__global__ void rotary_kernel(RotaryRows<T> r, const acc_t<T>* __restrict__ cos,
                              const acc_t<T>* __restrict__ sin, int64_t B, int64_t L, int64_t D,
                              int64_t Bc, int64_t Dr, bool interleaved, bool transpose) {
  using A = acc_t<T>;
  const int64_t h = Dr / 2, rows = r.heads[0] + r.heads[1];
  for (int64_t pos = blockIdx.x; pos < B * L; pos += gridDim.x) {
    const int64_t b = pos / L, l = pos % L;
    const A* C = cos + ((Bc == 1 ? 0 : b) * L + l) * Dr;
    const A* S = sin + ((Bc == 1 ? 0 : b) * L + l) * Dr;
    for (int64_t t = threadIdx.x; t < rows * h; t += blockDim.x) {
      const int64_t row = t / h, i = t % h;
      const int w = row < r.heads[0] ? 0 : 1;
      const int64_t hh = w == 0 ? row : row - r.heads[0];
      const T* x = r.x[w] + b * r.xs[w][0] + hh * r.xs[w][1] + l * r.xs[w][2];
      T* o = r.o[w] + b * r.os[w][0] + hh * r.os[w][1] + l * r.os[w][2];
      const int64_t p1 = interleaved ? 2 * i : i, p2 = interleaved ? 2 * i + 1 : i + h;
      const A x1 = static_cast<A>(x[p1]), x2 = static_cast<A>(x[p2]);
      const A a = transpose ? S[p2] : -S[p1], bb = transpose ? -S[p1] : S[p2];
      o[p1] = static_cast<T>(x1 * C[p1] + x2 * a);
      o[p2] = static_cast<T>(x2 * C[p2] + x1 * bb);
    }
    const int64_t rest = D - Dr;
    for (int64_t t = threadIdx.x; t < rows * rest; t += blockDim.x) {
      const int64_t row = t / rest, j = Dr + t % rest;
      const int w = row < r.heads[0] ? 0 : 1;
      const int64_t hh = w == 0 ? row : row - r.heads[0];
      r.o[w][b * r.os[w][0] + hh * r.os[w][1] + l * r.os[w][2] + j] =
          r.x[w][b * r.xs[w][0] + hh * r.xs[w][1] + l * r.xs[w][2] + j];
    }
  }
}

void rotary_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                 const at::Tensor& k_out, const at::Tensor& cos, const at::Tensor& sin,
                 bool interleaved, bool transpose) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = q.size(0), L = q.size(2), D = q.size(3);
  if (B * L == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_cuda", [&] {
    using A = acc_t<scalar_t>;
    RotaryRows<scalar_t> r{};
    const at::Tensor* ins[2] = {&q, &k};
    const at::Tensor* outs[2] = {&q_out, &k_out};
    for (int w = 0; w < 2; ++w) {
      r.x[w] = ins[w]->const_data_ptr<scalar_t>();
      r.o[w] = outs[w]->mutable_data_ptr<scalar_t>();
      r.heads[w] = ins[w]->size(1);
      for (int d = 0; d < 3; ++d) {
        r.xs[w][d] = ins[w]->stride(d);
        r.os[w][d] = outs[w]->stride(d);
      }
    }
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(B * L, int64_t(1) << 30));
    rotary_kernel<scalar_t><<<grid, 128, 0, stream>>>(r, cos.const_data_ptr<A>(),
                                                      sin.const_data_ptr<A>(), B, L, D, cos.size(0),
                                                      cos.size(2), interleaved, transpose);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(rotary, CUDA, &rotary_cuda);

}  // namespace cuda
}  // namespace pyformer
