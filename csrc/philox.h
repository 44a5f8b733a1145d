// Attention dropout's counter-based generator, one definition for the CPU and CUDA kernels.
//
// Element (row, j) of the (B, H, Lq, Lk) probabilities, row = (b * H + h) * Lq + i, has the index
// n = row * Lk + j. Its 32-bit word is word n % 4 of Philox4x32-10 (Salmon et al., "Parallel
// random numbers: as easy as 1, 2, 3", SC'11; the generator of curand and of torch's CUDA
// dropout) with key = the 64-bit seed and counter = (n / 4 as 64 bits, 0, 0); the element is
// kept when word >= threshold = floor(p * 2^32), so with probability 1 - p (p = 1 keeps
// nothing). The pattern depends only on (seed, p, the shape), not on the dtype, the device, the
// algorithm (bmm or flash), the blocking or the thread count: the flash backward regenerates the
// forward's mask instead of saving it, and both algorithms drop the same elements for one seed.
// pyformer.reference.dropout_keep is the same definition written independently in torch ops.
//
// Napkin math: 10 rounds of two 32x32 -> 64-bit multiplies per 4 elements.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYFORMER_HD __host__ __device__ __forceinline__
#else
#define PYFORMER_HD inline
#endif

namespace pyformer {

// The dropout of one call: keep probability 1 - p, and the Philox key.
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  bool on() const { return p > 0; }
};

struct Philox4 {
  uint32_t x[4];
};

// Philox4x32-10 of the counter (lo, hi, 0, 0) under the key seed.
PYFORMER_HD Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout keeps an element with probability 1 - p and scales it by 1 / (1 - p) (0 when p == 1).
PYFORMER_HD double dropout_keep_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// floor(p * 2^32): a word at or above it keeps its element (2^32 for p = 1: none is kept).
PYFORMER_HD uint64_t dropout_threshold(double p) {
  return p >= 1.0 ? (uint64_t(1) << 32) : static_cast<uint64_t>(p * 4294967296.0);
}

// Keep factors of the elements [n, n + count) into f: keep_scale where kept, 0 where dropped.
template <typename T>
inline void dropout_factors(uint64_t n, int64_t count, uint64_t seed, uint64_t threshold,
                            T keep_scale, T* f) {
  int64_t e = 0;
  while (e < count) {
    const uint64_t idx = n + static_cast<uint64_t>(e);
    const Philox4 r = philox4x32_10(idx >> 2, seed);
    for (unsigned w = static_cast<unsigned>(idx & 3); w < 4 && e < count; ++w, ++e)
      f[e] = r.x[w] >= threshold ? keep_scale : T(0);
  }
}

}  // namespace pyformer
