// attention on CUDA: the dropout keep mask behind kernels::dropout_keep (the rest of attention on
// CUDA is the host's composition of GEMMs around masked_softmax's row kernels).
//
//   keep (numel,) bool: element n kept when word n % 4 of Philox4x32-10(n / 4, seed) is at least
//   floor(p * 2^32) (csrc/philox.h, the definition the CPU kernels and the reference share)
//
// Algorithm: a grid-stride loop, one thread per 4 elements (one Philox call), each writing its
// 4 bytes. Napkin math (H100, ~3 TB/s): 1 byte per element written and 10 rounds of two 32-bit
// multiplies per 4 elements; a (8, 16, 1024, 1024) mask is 134 MB, ~45 us at the bandwidth, and
// 34 M Philox calls, 0.7 G 32-bit multiplies, ~50 us at 64 per SM per clock on 132 SMs: the
// kernel is about as bound by the multiplies as by the write, both small beside the GEMMs'.
#include "../philox.h"
#include "common.cuh"

namespace pyformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void dropout_keep_kernel(bool* __restrict__ keep, int64_t n, uint64_t seed,
                                    uint64_t threshold) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), seed);
#pragma unroll
    for (int w = 0; w < 4; ++w)
      if (g * 4 + w < n) keep[g * 4 + w] = r.x[w] >= threshold;
  }
}

void dropout_keep_cuda(const at::Tensor& keep, const Dropout& drop) {
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = keep.numel();
  dropout_keep_kernel<<<grid_for((n + 3) / 4, kThreads), kThreads, 0, stream>>>(
      keep.mutable_data_ptr<bool>(), n, drop.seed, dropout_threshold(drop.p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYFORMER_REGISTER_KERNEL(dropout_keep, CUDA, &dropout_keep_cuda);

}  // namespace cuda
}  // namespace pyformer
